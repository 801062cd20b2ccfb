"""Engine benchmark: per-frame cost with and without the KV cache, and the per-step forward.

Frames are latent frames (one frame block of the sequence).

    python benchmarks/engine.py --preset tiny --json out.json
    python benchmarks/engine.py --preset 1b --layers 2 --grid 48x84     # 672x384, CPU-sized
    python benchmarks/engine.py --preset 1b --grid 48x84 --device cuda  # GPU: adds MFU figures

Prints a table and writes JSON with: device, preset, frame_tokens, context_frames, steps,
ms_per_frame_cached, ms_per_frame_recompute, kv_speedup, tokens_per_s, peak_mem_bytes, and on
CUDA also step_ms, step_tflops, matmul_peak_tflops, step_mfu (batched-CFG per-step forward of
one frame block against the cache, vs the GPU's measured bf16 matmul peak).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import torch

from lumos.config import SamplerConfig, model_preset
from lumos.model import build_model
from lumos.sampler import VideoRequest, VideoState, block_forward, code_logits, generate, prefill
from lumos.sequence import Layout
from report import emit, sync


def _peak_mem(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def time_frames(model, layout, args, use_cache: bool) -> float:
    """Seconds per generated latent frame after `context` history frames (prefill and the
    first, warm-up frame not counted)."""
    g = torch.Generator().manual_seed(0)
    given = torch.randint(
        0, layout.vocab.codebook_size, (args.context, layout.h, layout.w), generator=g
    )
    req = VideoRequest(list(range(1, 21)), args.frames + 1, given=given, generator=g)
    sc = SamplerConfig(steps=args.steps, cfg=args.cfg)
    stamps: list[float] = []

    def stamp(f: int, codes) -> None:
        sync(args.device)
        stamps.append(time.perf_counter())

    generate(model, layout, [req], sc, on_frame=stamp, use_cache=use_cache)
    return (stamps[-1] - stamps[0]) / args.frames


def matmul_peak_tflops(device: str) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def step_mfu(model, layout, args) -> dict:
    """Time one batched-CFG step forward (2 rows x one frame block) against a filled cache."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    given = torch.randint(
        0, layout.vocab.codebook_size, (args.context, layout.h, layout.w), generator=g
    )
    sc = SamplerConfig(steps=1, cfg=args.cfg)
    st = VideoState(layout, sc, list(range(1, 21)), 2, 12, given, g, cfg.rope, args.device)
    cache = prefill(model, layout, st.prefill_rows(), st.capacity(1))
    st.begin_frame()
    offsets = layout.code_offsets.to(args.device)

    def one_step() -> None:
        code_logits(model, block_forward(model, st.step_tokens(), st.block_pos, cache), offsets)

    with torch.inference_mode():
        for _ in range(3):
            one_step()
        sync(args.device)
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            one_step()
        sync(args.device)
    dt = (time.perf_counter() - t0) / reps
    rows, n = st.n_rows, layout.block_len
    ctx = max(cache.lengths) + n
    dense = cfg.num_params() - 2 * cfg.vocab_size * cfg.dim  # per-token matmul params
    head = layout.n_codes * cfg.dim * layout.vocab.codebook_size  # visual rows only
    attn = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * n * ctx  # QK^T and PV
    flops = 2 * rows * (dense * n + head + attn)
    peak = matmul_peak_tflops(args.device)
    tflops = flops / dt / 1e12
    return {
        "step_ms": dt * 1e3,
        "step_tflops": tflops,
        "matmul_peak_tflops": peak,
        "step_mfu": tflops / peak,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (CPU-sized 1b)")
    p.add_argument("--grid", default=None, help="latent grid HxW (default: 16x16, 1b: 48x84)")
    p.add_argument("--context", type=int, default=8, help="history frames in the cache")
    p.add_argument("--frames", type=int, default=2, help="frames timed")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=15.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA)")
    p.add_argument("--no-recompute", action="store_true", help="skip the (slow) recompute run")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    over = {"n_layers": args.layers} if args.layers else {}
    cfg = model_preset(args.preset, **over)
    grid = args.grid or ("48x84" if args.preset in ("1b", "3b") else "16x16")
    h, w = (int(x) for x in grid.lower().split("x"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    torch.manual_seed(0)
    model = build_model(cfg, device=args.device, dtype=dtype).eval()
    layout = Layout(cfg.vocab_spec, h, w, cfg.rope_scales)

    cached = time_frames(model, layout, args, use_cache=True)
    recompute = float("nan") if args.no_recompute else time_frames(model, layout, args, False)
    rows = 2 if args.cfg != 1.0 else 1
    cpu = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    res = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu,
        "preset": args.preset,
        "n_layers": cfg.n_layers,
        "dtype": str(dtype).replace("torch.", ""),
        "grid": f"{h}x{w}",
        "frame_tokens": layout.block_len,
        "context_frames": args.context,
        "steps": args.steps,
        "ms_per_frame_cached": cached * 1e3,
        "ms_per_frame_recompute": recompute * 1e3,
        "kv_speedup": recompute / cached,
        "tokens_per_s": rows * layout.block_len * (args.steps + 1) / cached,
        "peak_mem_bytes": _peak_mem(args.device),
    }
    if args.device.startswith("cuda"):
        res.update(step_mfu(model, layout, args))
    emit(res, args.json)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
