"""The `lumos` command: serve | worker | generate | train | train-tokenizer | eval | bench.

Subcommands import their modules lazily so `lumos generate` does not load Ray or FastAPI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lumos.devices import COMPILE_CHOICES, DTYPE_CHOICES
from lumos.settings import add_sampling_flags, sampling_overrides


def _generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from lumos.pipeline import Pipeline
    from lumos.video import read_image, read_video, write_video

    out = Path(args.output)
    if out.suffix.lower() not in (".mp4", ".gif", ".png"):
        raise SystemExit(f"lumos generate: output {out} must end in .mp4, .gif or .png")
    if not args.prompt.strip():
        raise SystemExit("lumos generate: the prompt is empty")
    if args.image is not None and args.extend is not None:
        raise SystemExit("lumos generate: give --image or --extend, not both")
    pipe = Pipeline.from_folder(
        args.model,
        device=args.device,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        resolution=args.resolution,
        compile=args.compile,
    )
    try:
        pipe.set_sampling(**sampling_overrides(args))
        pipe.sampler_config(args.steps, args.cfg)  # a bad --steps / --cfg fails here, named
    except ValueError as e:
        raise SystemExit(f"lumos generate: {e}") from None
    s = pipe.settings
    if args.frames is not None:
        frames = args.frames
    else:
        frames = 1 if out.suffix.lower() == ".png" and args.extend is None else s.frames
    if frames < 1 or (s.max_frames is not None and frames > s.max_frames):
        cap = s.max_frames or "any"
        raise SystemExit(f"lumos generate: --frames must be in [1, {cap}] RGB frames")
    kw = {"steps": args.steps, "cfg": args.cfg, "seed": args.seed}
    given, prior = None, 0  # given: latent codes the video starts from; prior: their RGB frames
    if args.extend is not None:  # continue an existing clip by `frames` RGB frames
        clip = torch.from_numpy(read_video(args.extend, size=(s.height, s.width)).copy())
        given = pipe.visual.encode(clip)  # [t0, h, w]
        prior = pipe.visual.rgb_frames(given.shape[0])
        n_latent = max(1, -(-frames // pipe.visual.temporal))
        total = pipe.visual.rgb_frames(given.shape[0] + n_latent)
    else:
        n_latent = 1 if frames == 1 else pipe.latent_frames(frames)
        total = frames
    if args.image is not None:
        if frames < 2:
            raise SystemExit("lumos generate: --image needs --frames >= 2 and a video output")
        img = torch.from_numpy(read_image(args.image, size=(s.height, s.width)).copy())
        given = pipe.encode_image(img)
        n_latent -= 1
    bar = tqdm(total=n_latent, unit="frame", desc="generating", disable=args.quiet)
    video_codes = pipe.generate_codes(
        args.prompt,
        n_latent,
        given=given,
        image=frames == 1 and given is None,
        rgb_frames=total,
        on_frame=lambda i, c: bar.update(1),
        **kw,
    )
    bar.close()
    video = pipe.decode(video_codes)[: prior + frames if args.extend else frames]
    write_video(out, video.numpy(), fps=s.fps)
    print(f"wrote {out} ({video.shape[0]} frames, {s.width}x{s.height})")
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    import runpy

    roots = [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
    root = next((r for r in roots if (r / f"{args.name}.py").is_file()), None)
    if root is None:
        raise SystemExit(
            f"lumos bench: no benchmark {args.name!r}: benchmarks ship with the source "
            "repository (run from a checkout, or from a folder that holds benchmarks/)"
        )
    script = root / f"{args.name}.py"
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(root))  # benchmarks share benchmarks/report.py
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `lumos` parser. Subcommands other than generate/bench parse their own flags (in their
    modules' `main(argv)`); here they only take the rest of the command line."""
    p = argparse.ArgumentParser(prog="lumos", description="Lumos: autoregressive video generation")
    p.add_argument("--version", action="version", version=f"lumos {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="text/image to video or image, or continue a video")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.mp4", help=".mp4, .gif or .png")
    g.add_argument(
        "--frames", type=int, default=None, help="RGB frames to make (default: the model's)"
    )
    g.add_argument("--steps", type=int, default=None, help="diffusion steps per frame (model's)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image", default=None, help="first frame (image-to-video)")
    g.add_argument("--extend", default=None, help="a video file to continue by --frames RGB frames")
    g.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    g.add_argument(
        "--resolution",
        default=None,
        help="WIDTHxHEIGHT (official checkpoints: 448x256 default, or 672x384)",
    )
    add_sampling_flags(g)
    g.add_argument("--tokenizer", default=None, help="visual tokenizer folder (official models)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto: bfloat16 on GPUs and CPUs with hardware bf16 (AVX512-BF16, AMX), else float32",
    )
    g.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_CHOICES,
        help="compile the frame steps first (~30-60 s on 2 cores; auto: on AMX CPUs in bf16); "
        "pays for long videos",
    )
    g.add_argument("-q", "--quiet", action="store_true")

    for name, help_ in (
        ("train", "train a Lumos model (AR-DF)"),
        ("train-tokenizer", "train the built-in FSQ video tokenizer"),
        ("eval", "evaluate a model on Moving Fashion-MNIST prompts"),
        ("serve", "run the service (local Ray + SQLite by default)"),
        ("worker", "join this host's GPUs to a running cluster"),
        ("prepare-data", "build and pre-tokenise the Moving Fashion-MNIST shards"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="run a benchmark from benchmarks/")
    b.add_argument("name")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lumos")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if args.cmd == "generate":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            return _generate(args)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"lumos generate: {e}") from None
    if args.cmd == "bench":
        return _bench(args, argv[argv.index(args.name) + 1 :])
    module = {
        "train": "lumos.train",
        "train-tokenizer": "lumos.prepare",
        "eval": "lumos.evaluate",
        "serve": "lumos.api.serve",
        "worker": "lumos.cluster.serve",
        "prepare-data": "lumos.prepare",
    }[args.cmd]
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise SystemExit(f"lumos {args.cmd}: not available in this build ({e.name})") from None
    entry = {"worker": "worker_main", "train-tokenizer": "tokenizer_main"}.get(args.cmd, "main")
    fn = getattr(mod, entry)
    return int(fn(argv[argv.index(args.cmd) + 1 :]) or 0)  # the words after the subcommand


if __name__ == "__main__":
    sys.exit(main())
