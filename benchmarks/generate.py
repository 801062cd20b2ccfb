"""Generation benchmark: 16 frames from the bundled model with its default steps and CFG.

    python benchmarks/generate.py --json out.json [--model DIR|random] [--frames 16]

Prints a table and writes JSON with: device, model, dtype, frames (RGB), latent_frames, steps, cfg,
seconds (generation + decode, model load excluded), frames_per_s (RGB), ms_per_latent_frame,
model_fps (the fps the video plays at), realtime (frames_per_s / model_fps: >= 1 means one
session is made at least as fast as it plays; issue 14's target on the 2-core CPU), load_seconds,
compiled and compile_seconds (`--compile on`: the frame steps compiled first, not timed).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from lumos.pipeline import Pipeline
from report import emit


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: bundled) or 'random'")
    p.add_argument("--prompt", default="a red sneaker moves left")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's")
    p.add_argument("--guidance-steps", type=int, default=None, help="CFG steps (model's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="auto (default), float32 or bfloat16")
    p.add_argument("--compile", default="off", help="compile the frame steps: off, on, auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    pipe = Pipeline.from_folder(args.model, device=args.device, dtype=args.dtype)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.compiled(args.compile)
    compile_s = time.perf_counter() - t0
    pipe.set_sampling(guidance_steps=args.guidance_steps)
    runs = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        video = pipe.text_to_video(
            args.prompt, frames=args.frames, steps=args.steps, cfg=args.cfg, seed=r
        )
        runs.append(time.perf_counter() - t0)
    secs = min(runs)
    s = pipe.settings
    res = {
        "device": str(pipe.device)
        if pipe.device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "model": args.model or "bundled",
        "dtype": str(next(pipe.model.parameters()).dtype).removeprefix("torch."),
        "frames": int(video.shape[0]),
        "latent_frames": pipe.latent_frames(args.frames),
        "steps": args.steps or s.steps,
        "cfg": args.cfg if args.cfg is not None else s.cfg_video,
        "guidance_steps": s.guidance_steps,
        "seconds": secs,
        "frames_per_s": video.shape[0] / secs,
        "ms_per_latent_frame": secs * 1e3 / pipe.latent_frames(args.frames),
        "model_fps": s.fps,
        "realtime": video.shape[0] / secs / s.fps,
        "load_seconds": load,
        "compiled": pipe.model.compiled is not None,
        "compile_seconds": compile_s,
    }
    emit(res, args.json)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
