"""Running an evaluation: the prompts, a clip per prompt and seed, scores aggregated per split.

:func:`evaluate` generates with a pipeline; :func:`evaluate_real` scores real clips from
:func:`~lumos.data.make_clip` with the prompts' specs (the ceiling of every score, and a check of
the tracker); :func:`evaluate_tokenizer` the same real clips through the pipeline's visual
tokenizer (the ceiling of a model on those codes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lumos.data import ItemSpec, MovingFashionConfig, eval_prompts, make_clip
from lumos.evaluate.classifier import FashionClassifier, load_classifier
from lumos.evaluate.metrics import (
    clip_features,
    confusion,
    frechet_distance,
    motion,
    per_frame,
    score_clip,
)
from lumos.evaluate.tracker import _as_video, track_items


def select_prompts(
    split: str = "heldout", n_prompts: int | None = None
) -> list[tuple[str, list[ItemSpec]]]:
    """``n_prompts`` of :func:`~lumos.data.eval_prompts` (``split``), evenly spaced over the
    list so that a subset mixes one- and two-item prompts (None: all of them)."""
    prompts = eval_prompts(split)
    if n_prompts is None or n_prompts >= len(prompts):
        return prompts
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    idx = np.unique(np.round(np.linspace(0, len(prompts) - 1, n_prompts)).astype(int))
    return [prompts[i] for i in idx]


def _data_split(split: str) -> str:
    if split == "heldout":
        return "heldout"
    if split in ("seen", "test", "train"):
        return "test"
    raise ValueError(f"split must be 'seen' or 'heldout', got {split!r}")


def _real_clip(specs: list[ItemSpec], split: str, frames: int, seed: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7919, index])
    cfg = MovingFashionConfig(frames=frames)
    return make_clip(rng, cfg, _data_split(split), spec=specs).video  # [T, 64, 64, 3]


def check_window(window_from: int | None, frames: int) -> None:
    """ValueError unless ``window_from`` (RGB frames scored from) is None or in [0, frames)."""
    if window_from is not None and not 0 <= window_from < frames:
        raise ValueError(f"window_from must be in [0, {frames}), got {window_from}")


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    return list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _aggregate(
    scores: list[dict[str, Any]],
    feats: list[dict[str, np.ndarray]],
    ref_feats: list[dict[str, np.ndarray]],
) -> dict[str, Any]:
    items = [it for s in scores for it in s["items"]]
    dirs = [it["direction_correct"] for it in items if it["direction_correct"] is not None]
    out: dict[str, Any] = {
        "n_clips": len(scores),
        "n_items": len(items),
        "class_accuracy": float(np.mean([it["class_correct"] for it in items])),
        "colour_accuracy": float(np.mean([it["colour_present"] for it in items])),
        "direction_accuracy": float(np.mean(dirs)) if dirs else None,
        "identity_consistency": float(np.mean([it["identity_consistency"] for it in items])),
        "all_correct": float(np.mean([s["all_correct"] for s in scores])),
        "confusion": confusion(items),
        "per_frame": per_frame(items),
        "motion": motion(items),
    }
    for key, name in (("items", "frechet_distance"), ("frames", "frechet_distance_frames")):
        a = np.concatenate([f[key] for f in feats])
        b = np.concatenate([f[key] for f in ref_feats])
        out[name] = frechet_distance(a, b) if min(len(a), len(b)) >= 2 else None
    return out


def _run(
    make_video: Callable[[str, list[ItemSpec], int, int], np.ndarray],
    split: str,
    n_prompts: int | None,
    seeds: int | Sequence[int],
    frames: int,
    classifier: FashionClassifier | None,
    ref_seed: int,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    classifier = classifier or load_classifier()
    prompts = select_prompts(split, n_prompts)
    scores, feats, ref_feats, per_clip = [], [], [], []
    start = time.time()
    for p, (caption, specs) in enumerate(prompts):
        for seed in _seed_list(seeds):
            video = _as_video(make_video(caption, specs, p, seed))
            tracks = track_items(video, [s.colour for s in specs], classifier)
            sc = score_clip(video, specs, classifier, tracks=tracks)
            scores.append(sc)
            feats.append(clip_features(video, specs, classifier, tracks=tracks))
            ref = _real_clip(specs, split, video.shape[0], ref_seed + seed, p)
            ref_feats.append(clip_features(ref, specs, classifier))
            per_clip.append({"prompt": caption, "seed": seed, **sc})
        if log:
            log(f"  [{split}] {p + 1}/{len(prompts)} prompts ({time.time() - start:.0f} s)")
    out = _aggregate(scores, feats, ref_feats)
    out.update({"split": split, "n_prompts": len(prompts), "frames": frames, "clips": per_clip})
    return out


def evaluate(
    pipeline: Any,
    split: str = "heldout",
    n_prompts: int | None = None,
    seeds: int | Sequence[int] = 1,
    frames: int | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    classifier: FashionClassifier | None = None,
    log: Callable[[str], None] | None = None,
    window_from: int | None = None,
) -> dict[str, Any]:
    """Generate a clip per prompt (and seed) of ``eval_prompts(split)`` and score them.

    ``window_from``: score only the RGB frames ``[window_from, frames)`` of each clip (quality
    late in a long video, e.g. frames 240..255 of 256; the real reference clips are as long as
    the scored part).

    ``pipeline``: a :class:`lumos.pipeline.Pipeline` (anything with ``text_to_video(prompt,
    frames, steps=, cfg=, seed=) -> uint8 [T, H, W, 3]``). ``split``: ``"seen"`` or
    ``"heldout"``; ``n_prompts``: how many (evenly spaced, see :func:`select_prompts`; None:
    all 48); ``seeds``: a count (0..n-1) or a list of seeds. Returns the means over items of
    ``class_accuracy``, ``colour_accuracy``, ``direction_accuracy``,
    ``identity_consistency``, the fraction of clips ``all_correct``, the Frechet distances
    ``frechet_distance`` (item crops) and ``frechet_distance_frames`` (whole frames) to real
    clips of the same specs, counts, ``"confusion"`` (asked class -> predicted class counts)
    and ``"per_frame"`` (presence, class and identity per frame; see
    :func:`~lumos.evaluate.metrics.per_frame`), ``"motion"`` (how directions go wrong, measured
    speeds, position jumps; :func:`~lumos.evaluate.metrics.motion`), and the per-clip scores
    under ``"clips"``.
    """
    frames = frames or getattr(getattr(pipeline, "settings", None), "frames", 16)

    check_window(window_from, frames)

    def make(caption: str, specs: list[ItemSpec], p: int, seed: int) -> np.ndarray:
        video = pipeline.text_to_video(caption, frames=frames, steps=steps, cfg=cfg, seed=seed)
        return _as_video(video)[window_from or 0 :]

    return _run(make, split, n_prompts, seeds, frames, classifier, 10_000, log)


def evaluate_real(
    split: str = "heldout",
    n_prompts: int | None = None,
    seeds: int | Sequence[int] = 1,
    frames: int = 16,
    classifier: FashionClassifier | None = None,
    log: Callable[[str], None] | None = None,
    window_from: int | None = None,
) -> dict[str, Any]:
    """The scores of :func:`evaluate` on *real* clips (:func:`~lumos.data.make_clip` with the
    prompts' specs): the ceiling of every score and a check of the tracker. The Frechet
    distances compare these clips with a second, independent set of real clips (their floor).
    ``window_from``: score only frames ``[window_from, frames)`` of each clip, as
    :func:`evaluate` does (the real late-window ceiling: items have bounced by then).
    """
    check_window(window_from, frames)

    def make(caption: str, specs: list[ItemSpec], p: int, seed: int) -> np.ndarray:
        return _real_clip(specs, split, frames, seed, p)[window_from or 0 :]

    return _run(make, split, n_prompts, seeds, frames, classifier, 10_000, log)


def evaluate_tokenizer(
    pipeline: Any,
    split: str = "heldout",
    n_prompts: int | None = None,
    seeds: int | Sequence[int] = 1,
    frames: int = 16,
    classifier: FashionClassifier | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The scores of :func:`evaluate_real`'s real clips after a round trip through the
    pipeline's visual tokenizer (``pipeline.visual.encode`` then ``pipeline.decode``): the
    ceiling of a model that predicts the real clips' codes exactly."""
    import torch

    def make(caption: str, specs: list[ItemSpec], p: int, seed: int) -> np.ndarray:
        real = _real_clip(specs, split, frames, seed, p)  # [T, H, W, 3]
        with torch.no_grad():
            codes = pipeline.visual.encode(torch.from_numpy(real))  # [t, h, w]
            return _as_video(pipeline.decode(codes))[:frames]

    return _run(make, split, n_prompts, seeds, frames, classifier, 10_000, log)
