"""`lumos train`: flags over a preset (or the checkpoint's config on --resume)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from lumos.train.config import TRAIN_PRESETS, TrainConfig, train_preset
from lumos.train.loop import train

# =========================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumos train",
        description="Train a Lumos model with the AR-DF objective on pre-tokenised shards "
        "(run under torchrun for several processes).",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(TRAIN_PRESETS),
        help="train preset (default: fmnist; on --resume: the checkpoint's config)",
    )
    p.add_argument("--data", required=True, help="video shard folder (lumos.data.write_shards)")
    p.add_argument("--image-data", default=None, help="image shard folder for joint training")
    p.add_argument("--out", required=True, help="run folder (latest/, tb/, metrics.jsonl)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--max-steps", type=int, help="at most this many steps in this invocation")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, dest="warmup_steps")
    p.add_argument("--decay", choices=["constant", "cosine", "linear"], help="lr after the warm-up")
    p.add_argument("--min-lr-ratio", type=float, help="final lr of a decay, as a fraction of --lr")
    p.add_argument("--batch-size", type=int, help="videos per process per video step")
    p.add_argument("--image-batch-size", type=int, help="images per process per image step")
    p.add_argument("--schedule", help="joint schedule IMAGES:VIDEOS steps per cycle, e.g. 1:1")
    p.add_argument("--rope", choices=["mm", "1d", "3d"])
    p.add_argument("--scheme", choices=["tube", "random", "independent"])
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--peak-flops", type=float, help="per-device peak FLOP/s (logs MFU)")
    p.add_argument("--init-from", help="model folder to start from (ours or official)")
    p.add_argument(
        "--grow-layers",
        type=int,
        help="with --init-from: deepen the model to N layers (new layers start as identities)",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        help="keep an EMA of the weights for sampling in OUT/latest/ema (e.g. 0.999; 0: off)",
    )
    p.add_argument(
        "--distill-cfg",
        type=float,
        help="guidance distillation: train the --init-from model's conditional row to sample "
        "what CFG at this scale samples (the export then runs CFG 1, one row a step)",
    )
    p.add_argument(
        "--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_FLAG_FIELDS = (
    "steps",
    "lr",
    "warmup_steps",
    "decay",
    "min_lr_ratio",
    "batch_size",
    "image_batch_size",
    "rope",
    "scheme",
    "seed",
    "log_every",
    "ckpt_every",
    "num_workers",
    "peak_flops",
    "init_from",
    "grow_layers",
    "ema_decay",
    "distill_cfg",
    "activation_checkpointing",
    "compile",
    "bf16",
)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset (or, on --resume, the checkpoint's config) with the given flags applied."""
    base: TrainConfig | None = None
    if args.resume and args.preset is None:
        path = Path(args.out) / "latest" / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text()).get("train")
            base = TrainConfig.from_dict(saved) if saved else None
    if base is None:
        base = train_preset(args.preset or "fmnist")
    changes = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f) is not None}
    if args.schedule is not None:
        try:
            i, v = (int(x) for x in args.schedule.split(":"))
        except ValueError:
            raise ValueError(f"--schedule must be IMAGES:VIDEOS, got {args.schedule!r}") from None
        changes.update(image_steps=i, video_steps=v)
    return base.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        res = train(
            cfg,
            args.data,
            args.image_data,
            args.out,
            resume=args.resume,
            device=args.device,
            max_steps=args.max_steps,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"lumos train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    last = res["losses"][-1] if res["losses"] else float("nan")
    tps = res["tokens_per_s"]
    line = (
        f"[rank {res['rank']}/{res['world_size']}] done step={res['step']} loss={last:.6f} "
        f"tokens_per_s={tps if tps is None else round(tps, 1)} weights={res['weights_digest']}\n"
    )
    sys.stdout.write(line)  # one write per rank: lines of several ranks do not interleave
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
