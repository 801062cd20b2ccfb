"""`lumos prepare-data`: build what the bundled model is trained on, and export a trained model.

Steps (each skipped when its output exists), with progress lines on stdout:
1. train our FSQ video tokenizer (:data:`BUNDLED_VISUAL`, the shipped `fmnist64-lite` recipe:
   GroupNorm, lr 2e-3, 2,000 steps x 32 frames of 2,000 train clips) -> DIR/tokenizer
2. train a byte-level BPE on the training captions -> DIR/text_tokenizer.json (asked for 512
   ids; the caption language saturates at 366)
3. pre-tokenise video clips and one-frame images into memory-mapped shards
   -> DIR/shards/{video,image}, labelled with the tokenizer's name

`export_bundle(run, data, dest)` assembles a pipeline folder (pipeline.json, model/, tokenizer/,
text_tokenizer.json) from a training run and its data folder. pipeline.json takes the clip
geometry from the data folder (data.json), fps and the duration token from the run's training
settings, and the sampling defaults from a named preset of :data:`SAMPLING_PRESETS` (default
`fmnist`: the ones chosen for the bundled model) with `--steps` / `--cfg` / `--tau0` overrides,
so an export never silently undoes them. A guidance-distilled run (`lumos train --distill-cfg`)
exports CFG 1 unless `--cfg` says otherwise: its conditional row alone samples the guided
distribution.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from lumos.data import MovingFashionConfig, MovingFashionDataset
from lumos.settings import PipelineSettings
from lumos.tokenizers import (
    FSQTokenizerConfig,
    FSQVideoTokenizer,
    evaluate_reconstruction,
    train_bpe,
    train_tokenizer,
)

# the bundled tokenizer: the fmnist64 layout with half the widths at high resolution, 3x cheaper
# to train on CPU (0.48 s vs 1.44 s per batch of 32 frames on one thread), with GroupNorm (stable
# at lr 2e-3, where the norm-free preset diverges)
BUNDLED_VISUAL = FSQTokenizerConfig(
    channels=(16, 32, 64, 128),
    levels=(8, 5, 5, 5),
    spatial=8,
    temporal=1,
    image_size=64,
    num_res_blocks=1,
    temporal_kernel=1,
    norm_groups=8,
    norm="group",
    name="fmnist64-lite",
)
TOKENIZER_LR = 2e-3  # the bundled tokenizer's peak learning rate (warm-up, cosine decay to 10%)
TOKENIZER_CLIPS = 2000  # train clips whose frames the tokenizer trains on
TOKENIZER_BATCH = 32  # frames per tokenizer step
VISUAL_PRESET = BUNDLED_VISUAL.name

#: Sampling defaults written into an exported pipeline.json, by name. `fmnist`: the bundled
#: model's (16 MaskGIT steps for 64 codes a frame; CFG 4 and tau0 0 chosen on seen prompts,
#: docs/MODEL_CARD.md).
SAMPLING_PRESETS: dict[str, dict[str, float | int]] = {
    "fmnist": {"steps": 16, "cfg_video": 4.0, "cfg_image": 4.0, "tau0": 0.0},
}

T = TypeVar("T")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _progress(items: Iterable[T], total: int, label: str, every: int = 500) -> Iterator[T]:
    """Yield `items`, printing `label: i/total (rate, ETA)` every `every` items and at the end."""
    t0 = time.time()
    i = 0
    for i, item in enumerate(items, start=1):
        yield item
        if i % every == 0 or i == total:
            dt = time.time() - t0
            eta = dt / i * (total - i)
            _say(f"{label}: {i}/{total} ({i / max(dt, 1e-9):.1f}/s, {dt:.0f} s, ETA {eta:.0f} s)")


def _frames(n_clips: int, seed: int, frames: int) -> torch.Tensor:
    """uint8 [n_clips * frames, 64, 64, 3] frames of training clips."""
    ds = MovingFashionDataset(MovingFashionConfig(frames=frames), "train", n_clips, seed=seed)
    return torch.from_numpy(np.concatenate([ds[i].video for i in range(n_clips)]))


def _tokenizer_log(steps: int, seen: dict[str, float]) -> Callable[[dict[str, float]], None]:
    t0 = time.time()

    def log(rec: dict[str, float]) -> None:
        seen["lr_peak"] = max(seen.get("lr_peak", 0.0), rec["lr"])
        dt = time.time() - t0
        eta = dt / rec["step"] * (steps - rec["step"])
        _say(
            f"tokenizer: step {rec['step']}/{steps} loss {rec['loss']:.4f} "
            f"PSNR {rec['psnr']:.2f} dB lr {rec['lr']:.2e} ({dt:.0f} s, ETA {eta:.0f} s)"
        )

    return log


def prepare(
    out: str | Path,
    videos: int = 6000,
    images: int = 6000,
    frames: int = 16,
    tokenizer_steps: int = 2000,
    text_vocab: int = 512,
    seed: int = 0,
    device: str = "cpu",
    tokenizer_clips: int = TOKENIZER_CLIPS,
    eval_clips: int = 64,
    log_every: int = 50,
    late: float = 0.0,
) -> dict[str, Any]:
    """Build DIR/tokenizer, DIR/text_tokenizer.json and DIR/shards/{video,image}; see the module
    docstring. `late`: the fraction of video clips that are windows from late in a long video
    (:class:`~lumos.data.MovingFashionConfig`). Returns the report also written to
    DIR/data.json."""
    cfg = MovingFashionConfig(frames=frames, late=late)  # ValueError before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    tok_dir = out / "tokenizer"
    if not (tok_dir / "config.json").is_file():
        t0 = time.time()
        _say(f"tokenizer: rendering {tokenizer_clips} train clips x {frames} frames")
        data = _frames(tokenizer_clips, seed + 1, frames)
        seen: dict[str, float] = {}
        metrics = train_tokenizer(
            BUNDLED_VISUAL,
            data,
            steps=tokenizer_steps,
            lr=TOKENIZER_LR,
            batch=TOKENIZER_BATCH,
            device=device,
            out_dir=tok_dir,
            log_every=log_every,
            log_fn=_tokenizer_log(tokenizer_steps, seen),
        )
        held = MovingFashionDataset(cfg, "heldout", eval_clips, seed=seed + 2)
        vids = torch.from_numpy(np.stack([held[i].video for i in range(eval_clips)]))
        tok = FSQVideoTokenizer.load(tok_dir)
        rec = evaluate_reconstruction(tok, list(vids))
        report["tokenizer"] = {
            "steps": tokenizer_steps,
            "seconds": time.time() - t0,
            "heldout_psnr": rec["psnr"],
            "heldout_ssim": rec["ssim"],
            "train_final_loss": metrics.get("final_loss"),
            "lr": TOKENIZER_LR,
            "lr_peak_seen": seen.get("lr_peak"),
            "batch": TOKENIZER_BATCH,
            "clips": tokenizer_clips,
        }
        (tok_dir / "eval.json").write_text(json.dumps(report["tokenizer"], indent=2))
        _say(f"tokenizer: {report['tokenizer']}")
    visual = FSQVideoTokenizer.load(tok_dir, device=device).eval()

    text_file = out / "text_tokenizer.json"
    vid_ds = MovingFashionDataset(cfg, "train", videos, seed=seed)
    img_ds = MovingFashionDataset(cfg, "train", images, seed=seed, images=True)
    if not text_file.is_file():
        caps = [vid_ds[i].caption for i in range(min(videos, 4000))]
        caps += [img_ds[i].caption for i in range(min(images, 2000))]
        bpe = train_bpe(caps, text_vocab)
        bpe.save(text_file)
        _say(f"text tokenizer: {bpe.vocab_size} ids (asked for {text_vocab})")
    from lumos.tokenizers import TextTokenizer

    text = TextTokenizer.from_file(text_file)

    from lumos.data import write_shards

    @torch.no_grad()
    def encode(video: np.ndarray) -> torch.Tensor:
        return visual.encode(torch.from_numpy(np.ascontiguousarray(video)).to(device)).cpu()

    for name, ds in (("video", vid_ds), ("image", img_ds)):
        dest = out / "shards" / name
        if (dest / "manifest.json").is_file():
            continue
        t0 = time.time()
        clips = _progress((ds[i] for i in range(len(ds))), len(ds), f"shards/{name}")
        write_shards(
            clips,
            encode,
            text.encode,
            dest,
            codebook_size=visual.codebook_size,
            tokenizer_name=visual.config.name,
        )
        _say(f"shards/{name}: {len(ds)} clips in {time.time() - t0:.0f}s")
    meta = {"frames": frames, "size": cfg.size, "videos": videos, "images": images}
    meta |= {"seed": seed, "late": late}
    (out / "data.json").write_text(json.dumps({**meta, **report}))
    return report


def sampling_defaults(
    preset: str = "fmnist", overrides: dict[str, float | int | None] | None = None
) -> dict[str, float | int]:
    """The sampling keys of pipeline.json: :data:`SAMPLING_PRESETS` ``preset`` with the non-None
    ``overrides`` (``steps``, ``cfg_video``, ``cfg_image``, ``tau0``) applied and validated."""
    if preset not in SAMPLING_PRESETS:
        raise ValueError(f"unknown sampling preset {preset!r}; known: {sorted(SAMPLING_PRESETS)}")
    out = dict(SAMPLING_PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in out:
            raise ValueError(f"unknown sampling key {key!r}; known: {sorted(out)}")
        if value is not None:
            out[key] = type(out[key])(value)
    if out["steps"] < 1:
        raise ValueError(f"steps must be >= 1, got {out['steps']}")
    if out["cfg_video"] < 0 or out["cfg_image"] < 0:
        raise ValueError("cfg must be >= 0")
    if out["tau0"] < 0:
        raise ValueError(f"tau0 must be >= 0, got {out['tau0']}")
    return out


def export_bundle(
    run: str | Path,
    data: str | Path,
    dest: str | Path,
    fps: int | None = None,
    sampling: str = "fmnist",
    overrides: dict[str, float | int | None] | None = None,
) -> Path:
    """Assemble a pipeline folder from a training run (run/latest) and its data folder.

    ``dest`` is replaced when it is an existing pipeline folder (holds pipeline.json) or empty;
    any other existing path is refused, so nothing else is deleted. pipeline.json: see the module
    docstring (``fps`` None: the run's training fps).
    """
    run, data, dest = Path(run), Path(data), Path(dest)
    src = run / "latest" if (run / "latest").is_dir() else run
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {src}")
    for need in (data / "tokenizer" / "config.json", data / "text_tokenizer.json"):
        if not need.is_file():
            raise FileNotFoundError(f"{need} not found (run `lumos prepare-data --out {data}`)")
    if dest.exists() and not (dest / "pipeline.json").is_file():
        if not dest.is_dir() or any(dest.iterdir()):
            raise FileExistsError(
                f"{dest} exists and is not a pipeline folder; refusing to replace"
            )
    train = json.loads((src / "config.json").read_text()).get("train", {})
    meta = json.loads((data / "data.json").read_text()) if (data / "data.json").is_file() else {}
    size = int(meta.get("size", 64))
    if train.get("distill_cfg"):  # guidance distilled: the conditional row alone (CFG 1)
        overrides = {"cfg_video": 1.0, "cfg_image": 1.0} | {
            k: v for k, v in (overrides or {}).items() if v is not None
        }
    settings: dict[str, Any] = {
        "height": size,
        "width": size,
        "frames": int(meta.get("frames", 16)),
        "fps": int(fps if fps is not None else train.get("fps", 8)),
        "duration": int(train.get("duration", 2)),  # the duration token the model trained with
        **sampling_defaults(sampling, overrides),
    }
    PipelineSettings.from_dict(settings)  # validate before touching dest
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "model").mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(src / f, dest / "model" / f)
    shutil.copytree(data / "tokenizer", dest / "tokenizer", ignore=shutil.ignore_patterns("*.pt"))
    shutil.copy2(data / "text_tokenizer.json", dest / "text_tokenizer.json")
    (dest / "pipeline.json").write_text(json.dumps(settings, indent=2) + "\n")
    return dest


def tokenizer_main(argv: list[str] | None = None) -> int:
    """`lumos train-tokenizer`: train our FSQ video tokenizer and report held-out PSNR/SSIM."""
    p = argparse.ArgumentParser(prog="lumos train-tokenizer", description=tokenizer_main.__doc__)
    p.add_argument("--out", required=True, help="folder for config.json + model.safetensors")
    p.add_argument(
        "--preset",
        default=VISUAL_PRESET,
        help=f"{VISUAL_PRESET} (the bundled tokenizer's recipe, default) or a tokenizer preset",
    )
    p.add_argument(
        "--data", default=None, help="a folder/CSV of your videos (default: Moving FMNIST)"
    )
    p.add_argument("--clips", type=int, default=TOKENIZER_CLIPS)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=TOKENIZER_BATCH)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak lr (default: {TOKENIZER_LR} for the bundled recipe, else the trainer's 5e-4)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.preset == VISUAL_PRESET:
        preset: FSQTokenizerConfig | str = BUNDLED_VISUAL
        lr = TOKENIZER_LR if a.lr is None else a.lr
    else:
        try:
            preset = FSQTokenizerConfig.preset(a.preset)
        except ValueError as e:
            p.error(str(e))
        lr = 5e-4 if a.lr is None else a.lr
    if a.data:
        from lumos.data import VideoFolderDataset

        try:
            ds = VideoFolderDataset(a.data, size=64, frames=a.frames)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        n = min(len(ds), a.clips)
        data = torch.from_numpy(np.concatenate([ds[i].video for i in range(n)]))
        held = [torch.from_numpy(ds[i].video) for i in range(max(0, len(ds) - 8), len(ds))]
    else:
        data = _frames(a.clips, a.seed + 1, a.frames)
        cfg = MovingFashionConfig(frames=a.frames)
        hd = MovingFashionDataset(cfg, "heldout", 32, seed=a.seed + 2)
        held = [torch.from_numpy(hd[i].video) for i in range(32)]
    train_tokenizer(
        preset,
        data,
        steps=a.steps,
        batch=a.batch,
        lr=lr,
        device=a.device,
        out_dir=a.out,
        log_fn=_tokenizer_log(a.steps, {}),
    )
    rec = evaluate_reconstruction(FSQVideoTokenizer.load(a.out), held)
    print(f"held-out reconstruction: PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f}")
    (Path(a.out) / "eval.json").write_text(json.dumps(rec, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lumos prepare-data", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/fmnist")
    p.add_argument("--videos", type=int, default=6000)
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--tokenizer-steps", type=int, default=2000)
    p.add_argument("--text-vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--late",
        type=float,
        default=0.0,
        help="fraction of video clips that are windows from late in a long video (items "
        "anywhere, either sign along the captioned axis; the first 8 frames are history)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--export", nargs=2, metavar=("RUN", "DEST"), help="export RUN to DEST instead")
    p.add_argument(
        "--sampling",
        default="fmnist",
        choices=sorted(SAMPLING_PRESETS),
        help="--export: sampling defaults preset for pipeline.json",
    )
    p.add_argument("--steps", type=int, default=None, help="--export: override the preset's steps")
    p.add_argument("--cfg", type=float, default=None, help="--export: override CFG (video+image)")
    p.add_argument("--tau0", type=float, default=None, help="--export: override tau0")
    a = p.parse_args(argv)
    if a.export:
        overrides = {"steps": a.steps, "cfg_video": a.cfg, "cfg_image": a.cfg, "tau0": a.tau0}
        try:
            dest = export_bundle(a.export[0], a.out, a.export[1], None, a.sampling, overrides)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            print(f"lumos prepare-data: {e}", file=sys.stderr)
            return 2
        print(f"exported {dest}")
        return 0
    try:
        prepare(
            a.out,
            a.videos,
            a.images,
            a.frames,
            a.tokenizer_steps,
            a.text_vocab,
            a.seed,
            a.device,
            late=a.late,
        )
    except ValueError as e:
        print(f"lumos prepare-data: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
