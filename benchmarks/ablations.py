"""Paper ablations at our scale: MM-RoPE vs 1-D / naive 3-D RoPE, tube vs random masking.

    python benchmarks/ablations.py --out runs/ablations --steps 140 --json results.json
    python benchmarks/ablations.py --out runs/probe --steps 5 --runs mm-tube --no-eval  # timing

Every run trains the same model preset ("fmnist") from the same initialisation (seed), with the
same steps, batch, learning rate, warm-up, data order and per-sample mask draws (video-only
batches), on the same training subset: the first N - val_clips clips of the video shards
(re-written to OUT/data/train with lumos.data.write_shards; the trainer reads a whole shard
folder). The last `val_clips` clips are held out and scored identically for every run:

- validation masks are FIXED: per clip, one generator seeded by (val_seed, clip) draws a tube
  mask and a random mask, both at ratio `val_ratio` (default 0.85, inside the training range
  [0.7, 1]); the text is always kept (no dropout). Every run sees exactly the same masked
  inputs, so the scores differ only by the weights.
- val loss = mean cross-entropy over all masked code tokens (the training loss definition);
  per-frame val loss = the same mean restricted to latent frame k = 0..15;
  imbalance = loss(frame 0) - mean loss(frames 8..15). method.md section 5 predicts that
  random-mask training makes later frames cheap under random-masked inputs (the unmasked
  copies of a slot in neighbouring frames leak the answer), i.e. a large positive imbalance,
  and that tube training keeps it balanced.
- per-clip losses give a paired standard error for each run's difference to the reference
  (evaluation noise only: one training seed per run measures no seed-to-seed noise; the
  run "mm-tube-s1" repeats the reference with seed 1 to show it).

Training losses come from each run's metrics.jsonl (interval means logged every
`--log-every` steps): the final training loss is the mean over the last 10% of the steps,
and the first and last logged per-frame losses show how the frame-wise curve evolves. Training
losses are NOT comparable across masking schemes (random masking is an easier task); the
fixed-mask validation losses are.

Writes OUT/<run>/ (the trainer's latest/, metrics.jsonl, run.json), prints a markdown table,
and writes --json (relative paths go under OUT). Runs one training at a time on one thread
(--threads). Run names are ROPE-SCHEME[-sSEED] (e.g. 1d-tube, mm-random, mm-tube-s1). With
--reuse, runs whose OUT/<run>/latest already holds a finished checkpoint of the same training
config are not retrained, and their validation is taken from the previous --json file when the
weights digest and the validation settings match.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lumos.checkpoint import load_model
from lumos.data import ShardDataset, write_shards
from lumos.diffusion import (
    Sample,
    ardf_loss,
    collate,
    masked_sample,
    pad_to,
    random_mask,
    tube_mask,
)
from lumos.masks import frame_causal_dense
from lumos.sequence import Layout
from lumos.train import train, train_preset

DEFAULT_DATA = "data/fmnist/shards/video"  # made by `lumos prepare-data --out data/fmnist`
DEFAULT_RUNS = "mm-tube,1d-tube,3d-tube,mm-random,mm-tube-s1"  # -s1: seed repeat (noise)
REFERENCE = "mm-tube"
VAL_SCHEMES = ("tube", "random")
SHOW_FRAMES = (0, 3, 7, 11, 15)


# =========================================================================== data


def split_shards(src: str, out: Path, n_val: int) -> tuple[Path, range]:
    """Write the first N - n_val clips of `src` to out/ (same codes, text ids and captions);
    return that folder and the held-out index range of `src`."""
    ds = ShardDataset(src)
    n_train = len(ds) - n_val
    if n_train < 1 or n_val < 1:
        raise ValueError(f"{src} has {len(ds)} clips: cannot hold out {n_val}")
    val = range(n_train, len(ds))
    man = out / "manifest.json"
    if man.is_file():
        m = json.loads(man.read_text())
        if m.get("num_samples") == n_train and m.get("metadata", {}).get("source") == str(src):
            return out, val
    ids: list[list[int]] = []  # write_shards calls encode_video then encode_text per clip

    def clips():
        for i in range(n_train):
            codes, text_ids = ds[i]
            ids.append(text_ids)
            yield codes.numpy(), ds.caption(i)

    write_shards(
        clips(),
        encode_video=lambda codes: codes,
        encode_text=lambda caption: ids[-1],
        out_dir=out,
        codebook_size=ds.codebook_size,
        tokenizer_name=ds.tokenizer,
        metadata={
            "source": str(src),
            "subset": f"[0, {n_train})",
            "held_out": f"[{n_train}, {len(ds)})",
        },
        overwrite=True,
    )
    return out, val


# =========================================================================== evaluation


def fixed_sample(
    layout: Layout, codes: torch.Tensor, text_ids: list[int], m: torch.Tensor, dur: int, fps: int
) -> Sample:
    """The AR-DF sample of make_sample, with the text kept and a given [n, L_f] content mask."""
    return masked_sample(layout, layout.video(text_ids, codes, dur, fps, close=True), m)


def val_masks(
    n_frames: int, lf: int, ratio: float, seed: int, clip: int
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + clip)
    return {
        "tube": tube_mask(n_frames, lf, ratio, g),
        "random": random_mask(n_frames, lf, ratio, g),
    }


@torch.no_grad()
def evaluate(
    run_dir: Path, ds: ShardDataset, clips: range, args: argparse.Namespace
) -> dict[str, dict]:
    """Fixed-mask validation of OUT/<run>/latest: per scheme, loss, per-frame loss, per-clip."""
    model, _ = load_model(run_dir / "latest")
    model.eval()
    cfg = model.cfg
    vocab = cfg.vocab_spec
    lay = json.loads((run_dir / "latest" / "config.json").read_text())["layout"]
    dur, fps = lay["duration"], lay["fps"]
    layouts: dict[tuple[int, int], Layout] = {}
    idx = list(clips)
    res = {}
    for scheme in VAL_SCHEMES:
        fsum = torch.zeros(0, dtype=torch.float64)
        fcnt = torch.zeros(0, dtype=torch.float64)
        per_clip: list[float] = []
        tot_s, tot_n = 0.0, 0
        for b0 in range(0, len(idx), args.eval_batch):
            samples = []
            for i in idx[b0 : b0 + args.eval_batch]:
                codes, text_ids = ds[i]
                t, h, w = codes.shape
                layout = layouts.setdefault((h, w), Layout(vocab, h, w, cfg.rope_scales))
                m = val_masks(t, layout.content_len, args.val_ratio, args.val_seed, i)[scheme]
                samples.append(fixed_sample(layout, codes, text_ids, m, dur, fps))
            batch = collate(samples, cfg.rope, vocab.pad)
            ce, row, frame = masked_ce(model, batch)  # [N] each
            b = len(samples)
            s_sum = torch.zeros(b, dtype=torch.float64).index_add_(0, row, ce)
            s_cnt = torch.zeros(b, dtype=torch.float64).index_add_(0, row, torch.ones_like(ce))
            per_clip.extend((s_sum / s_cnt.clamp_min(1)).tolist())
            n = max(int(frame.max()) + 1, fsum.numel())
            fsum = pad_to(fsum, n).index_add_(0, frame, ce)
            fcnt = pad_to(fcnt, n).index_add_(0, frame, torch.ones_like(ce))
            tot_s += float(ce.sum())
            tot_n += ce.numel()
        per_frame = (fsum / fcnt.clamp_min(1)).tolist()
        late = per_frame[8:16] if len(per_frame) >= 16 else per_frame[len(per_frame) // 2 :]
        res[scheme] = {
            "loss": tot_s / max(tot_n, 1),
            "tokens": tot_n,
            "per_frame": per_frame,
            "imbalance": per_frame[0] - float(np.mean(late)),
            "per_clip": per_clip,
        }
    return res


def masked_ce(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One forward with the frame-causal mask: the AR-DF loss terms (lumos.diffusion's
    masked_visual_loss), with the sample row and latent frame of each term. Returns float64
    ce [N], long row [N], long frame [N]."""
    out = ardf_loss(model, batch, mask=frame_causal_dense(batch["frame"], batch["valid"]))
    return out["per_token"].double(), out["rows"], out["frames"]


# =========================================================================== training logs


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def train_summary(recs: list[dict], steps: int) -> dict:
    """Final training loss (mean of interval means over the last 10% of steps) and the first
    and last logged per-frame training losses."""
    tail = [r for r in recs if r["step"] > steps - max(steps // 10, 1)] or recs[-1:]
    first, last = recs[0], recs[-1]

    def imb(pf: list) -> float | None:
        if len(pf) < 16 or pf[0] is None or any(v is None for v in pf[8:16]):
            return None
        return pf[0] - float(np.mean(pf[8:16]))

    return {
        "final_train_loss": float(np.mean([r["loss"] for r in tail])),
        "first_step": first["step"],
        "last_step": last["step"],
        "train_per_frame_first": first["per_frame_loss"],
        "train_per_frame_last": last["per_frame_loss"],
        "train_imbalance_first": imb(first["per_frame_loss"]),
        "train_imbalance_last": imb(last["per_frame_loss"]),
        "curve": [(r["step"], r["loss"]) for r in recs],
        "train_imbalance_curve": [(r["step"], imb(r["per_frame_loss"])) for r in recs],
    }


# =========================================================================== driver


def run_config(name: str, args: argparse.Namespace):
    rope, scheme, *rest = name.split("-")
    seed = int(rest[0][1:]) if rest else args.seed  # e.g. mm-tube-s1
    return train_preset(
        "fmnist",
        rope=rope,
        scheme=scheme,
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=args.warmup,
        log_every=args.log_every,
        ckpt_every=0,
        seed=seed,
        num_workers=0,
    )


def _finished(run_dir: Path, cfg) -> bool:
    p = run_dir / "latest" / "config.json"
    if not p.is_file() or not (run_dir / "run.json").is_file():
        return False
    saved = json.loads(p.read_text())
    return saved.get("step") == cfg.steps and saved.get("train") == json.loads(
        json.dumps(cfg.to_dict())
    )


def _paired(ref: list[float], other: list[float]) -> tuple[float, float]:
    d = np.asarray(other) - np.asarray(ref)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def fmt_table(results: dict) -> str:
    ref = results["runs"].get(REFERENCE)
    lines = [
        "| run | rope | scheme | s/step | train loss (last 10%) | val tube@r | val random@r "
        "| Δ val tube vs ref (±SE) | Δ val random vs ref (±SE) | imbalance random-val "
        "| imbalance tube-val | train imbalance first → last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        v = r["val"]
        deltas = []
        for sch in VAL_SCHEMES:
            if ref is not None and name != REFERENCE:
                d, se = _paired(ref["val"][sch]["per_clip"], v[sch]["per_clip"])
                deltas.append(f"{d:+.4f} ± {se:.4f}")
            else:
                deltas.append("—")
        ti0, ti1 = r["train_imbalance_first"], r["train_imbalance_last"]
        tis = "n/a" if ti0 is None or ti1 is None else f"{ti0:+.3f} → {ti1:+.3f}"
        lines.append(
            f"| {name} | {r['rope']} | {r['scheme']} | {r['seconds_per_step']:.2f} "
            f"| {r['final_train_loss']:.4f} | {v['tube']['loss']:.4f} | {v['random']['loss']:.4f} "
            f"| {deltas[0]} | {deltas[1]} | {v['random']['imbalance']:+.4f} "
            f"| {v['tube']['imbalance']:+.4f} "
            f"| {tis} |"
        )
    ratio = results["config"]["val_ratio"]
    lines[0] = lines[0].replace("@r", f"@{ratio}")
    return "\n".join(lines)


def fmt_frames(results: dict) -> str:
    cols = " | ".join(f"f{k}" for k in SHOW_FRAMES)
    sep = "|".join(["---"] * (len(SHOW_FRAMES) + 2))
    out = [f"| run | curve | {cols} |", f"|{sep}|"]
    for name, r in results["runs"].items():
        rows = [
            (f"train step {r['first_step']}", r["train_per_frame_first"]),
            (f"train step {r['last_step']}", r["train_per_frame_last"]),
            ("val tube", r["val"]["tube"]["per_frame"]),
            ("val random", r["val"]["random"]["per_frame"]),
        ]
        for label, pf in rows:
            vals = " | ".join(
                "—" if k >= len(pf) or pf[k] is None else f"{pf[k]:.3f}" for k in SHOW_FRAMES
            )
            out.append(f"| {name} | {label} | {vals} |")
    return "\n".join(out)


def fmt_train_imbalance(results: dict) -> str:
    """Training-loss imbalance (frame 0 - mean frames 8..15) at every log, one row per run."""
    any_run = next(iter(results["runs"].values()))
    steps = [st for st, _ in any_run["train_imbalance_curve"]]
    out = [
        "| run | " + " | ".join(str(st) for st in steps) + " | mean of last half |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for name, r in results["runs"].items():
        vals = [v for _, v in r["train_imbalance_curve"]]
        half = [v for v in vals[len(vals) // 2 :] if v is not None]
        cells = " | ".join("—" if v is None else f"{v:+.2f}" for v in vals)
        tail = f"{np.mean(half):+.3f}" if half else "—"
        out.append(f"| {name} | {cells} | {tail} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--steps", type=int, default=140)
    p.add_argument("--json", default="results.json", help="results file (relative: under --out)")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of ROPE-SCHEME[-sSEED]")
    p.add_argument("--data", default=DEFAULT_DATA, help="video shard folder")
    p.add_argument("--val-clips", type=int, default=300)
    p.add_argument("--val-ratio", type=float, default=0.85)
    p.add_argument("--val-seed", type=int, default=1234)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="skip runs already trained (same cfg)")
    p.add_argument("--no-eval", action="store_true", help="train only (timing probes)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir, val_idx = split_shards(args.data, out / "data" / "train", args.val_clips)
    print(
        f"data: train {train_dir} ({val_idx.start} clips), held out {args.data}"
        f"[{val_idx.start}:{val_idx.stop}] ({time.perf_counter() - t0:.1f}s)",
        file=sys.stderr,
    )
    val_ds = ShardDataset(args.data)

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    jpath = Path(args.json)
    if not jpath.is_absolute():
        jpath = out / jpath
    old_runs: dict = {}  # --reuse: validation of unchanged weights under the same val config
    if args.reuse and jpath.is_file():
        old = json.loads(jpath.read_text())
        keys = ("val_clips", "val_ratio", "val_seed", "val_data")
        cur = {
            "val_clips": [val_idx.start, val_idx.stop],
            "val_ratio": args.val_ratio,
            "val_seed": args.val_seed,
            "val_data": args.data,
        }
        if all(old.get("config", {}).get(k) == cur[k] for k in keys):
            old_runs = old.get("runs", {})
    results = {
        "config": {
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "seed": args.seed,
            "threads": args.threads,
            "model": "fmnist",
            "train_data": str(train_dir),
            "train_clips": val_idx.start,
            "val_data": args.data,
            "val_clips": [val_idx.start, val_idx.stop],
            "val_ratio": args.val_ratio,
            "val_seed": args.val_seed,
            "torch": torch.__version__,
        },
        "runs": {},
    }
    for name in names:
        cfg = run_config(name, args)
        run_dir = out / name
        if args.reuse and _finished(run_dir, cfg):
            info = json.loads((run_dir / "run.json").read_text())
            print(f"[{name}] reusing finished run", file=sys.stderr)
        else:
            t = time.perf_counter()
            res = train(cfg, str(train_dir), None, str(run_dir), device="cpu", progress=False)
            dt = time.perf_counter() - t
            info = {
                "train_seconds": dt,
                "seconds_per_step": dt / cfg.steps,
                "weights_digest": res["weights_digest"],
                "config": cfg.to_dict(),
            }
            (run_dir / "run.json").write_text(json.dumps(info, indent=1))
            print(
                f"[{name}] trained {cfg.steps} steps in {dt:.0f}s "
                f"({dt / cfg.steps:.2f} s/step), last loss {res['losses'][-1]:.4f}",
                file=sys.stderr,
            )
        r = {
            "rope": cfg.rope,
            "scheme": cfg.scheme,
            "seed": cfg.seed,
            "train_seconds": info["train_seconds"],
            "seconds_per_step": info["seconds_per_step"],
            "weights_digest": info["weights_digest"],
            **train_summary(read_metrics(run_dir), cfg.steps),
        }
        prev = old_runs.get(name, {})
        if args.reuse and "val" in prev and prev.get("weights_digest") == r["weights_digest"]:
            r["val"], r["eval_seconds"] = prev["val"], prev.get("eval_seconds")
            print(f"[{name}] reusing validation from {jpath}", file=sys.stderr)
        elif not args.no_eval:
            t = time.perf_counter()
            r["val"] = evaluate(run_dir, val_ds, val_idx, args)
            r["eval_seconds"] = time.perf_counter() - t
            print(
                f"[{name}] val tube {r['val']['tube']['loss']:.4f} random "
                f"{r['val']['random']['loss']:.4f} ({r['eval_seconds']:.0f}s)",
                file=sys.stderr,
            )
        results["runs"][name] = r

    if all("val" in r for r in results["runs"].values()):
        results["table"] = fmt_table(results)
        results["frames_table"] = fmt_frames(results)
        results["train_imbalance_table"] = fmt_train_imbalance(results)
        for key in ("table", "frames_table", "train_imbalance_table"):
            print(results[key])
            print()
    jpath.write_text(json.dumps(results, indent=1))
    print(f"wrote {jpath}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
