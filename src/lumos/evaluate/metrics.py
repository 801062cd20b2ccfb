"""Scores of generated clips: per-clip scores against the caption, features, Frechet distance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lumos.data import CLASSES, DIRECTION_VECTORS, ItemSpec
from lumos.evaluate.classifier import FashionClassifier, load_classifier
from lumos.evaluate.tracker import ItemTrack, _as_video, track_items

JUMP_FRACTION = 0.125  # a centroid step over 1/8 of the frame width (8 px at 64) is a jump
METRICS = ("class_accuracy", "colour_accuracy", "direction_accuracy", "identity_consistency")


def _specs(specs: Sequence[Any]) -> list[ItemSpec]:
    return [s if isinstance(s, ItemSpec) else ItemSpec(*s) for s in specs]


def _jump_rate(centroids: np.ndarray, present: np.ndarray, width: int) -> float | None:
    """Fraction of consecutive present frames whose centroid ``[T, 2]`` moves more than
    ``JUMP_FRACTION`` of the frame width (items move 1-3 px a frame at 64 px: 8 px is a jump)."""
    both = present[1:] & present[:-1]  # [T-1]
    if not both.any():
        return None
    step = np.linalg.norm(np.diff(centroids, axis=0), axis=1)[both]  # [n]
    return float((step > JUMP_FRACTION * width).mean())


def score_clip(
    video: Any,
    specs: Sequence[ItemSpec | Sequence[Any]],
    classifier: FashionClassifier | None = None,
    tracks: dict[str, ItemTrack] | None = None,
    **track_kw: Any,
) -> dict[str, Any]:
    """Score one clip (uint8 ``[T, H, W, 3]``) against its caption's items.

    ``specs``: ``(class, colour, direction[, speed])`` per item (e.g. from
    :func:`~lumos.data.parse_caption_items`). Per item: ``colour_present`` (the colour is found
    in at least half of the frames), ``class_correct`` (present and majority class right),
    ``direction_correct`` (present and direction right; None for still items or 1-frame
    clips) and ``identity_consistency`` (see :class:`ItemTrack`). The clip's
    ``class_accuracy``, ``colour_accuracy``, ``direction_accuracy`` and
    ``identity_consistency`` are means over its items (direction: over items with one, None if
    none); ``all_correct`` whether every item got class, colour and direction right. Each item
    also lists ``frame_classes``, the class predicted in each frame (None where the colour is
    absent), for :func:`confusion` and :func:`per_frame`, its asked ``speed`` and ``jump_rate``
    (see :func:`motion`).
    """
    specs = _specs(specs)
    if not specs:
        raise ValueError("specs must name at least one item")
    video = _as_video(video)
    if tracks is None:
        tracks = track_items(video, [s.colour for s in specs], classifier, **track_kw)
    items = []
    for s in specs:
        tr = tracks[s.colour]
        present = tr.present_fraction >= 0.5
        scored_dir = s.direction is not None and video.shape[0] > 1
        items.append(
            {
                "class": s.cls,
                "colour": s.colour,
                "direction": s.direction,
                "pred_class": tr.cls,
                "pred_direction": tr.direction,
                "velocity": [round(v, 3) for v in tr.velocity],
                "present_fraction": tr.present_fraction,
                "colour_present": float(present),
                "class_correct": float(present and tr.cls == s.cls),
                "direction_correct": (
                    float(present and tr.direction == s.direction) if scored_dir else None
                ),
                "identity_consistency": tr.consistency,
                "frame_classes": [CLASSES[int(c)] if c >= 0 else None for c in tr.preds],
                "speed": s.speed,
                "jump_rate": _jump_rate(tr.centroids, tr.present, video.shape[2]),
            }
        )
    dirs = [it["direction_correct"] for it in items if it["direction_correct"] is not None]
    return {
        "class_accuracy": float(np.mean([it["class_correct"] for it in items])),
        "colour_accuracy": float(np.mean([it["colour_present"] for it in items])),
        "direction_accuracy": float(np.mean(dirs)) if dirs else None,
        "identity_consistency": float(np.mean([it["identity_consistency"] for it in items])),
        "all_correct": float(
            all(
                it["class_correct"] and it["colour_present"] and it["direction_correct"] != 0.0
                for it in items
            )
        ),
        "items": items,
    }


@torch.no_grad()
def clip_features(
    video: Any,
    specs: Sequence[ItemSpec | Sequence[Any]] | None = None,
    classifier: FashionClassifier | None = None,
    tracks: dict[str, ItemTrack] | None = None,
) -> dict[str, np.ndarray]:
    """Classifier features of a clip for the Frechet distances.

    ``"items"``: ``[T * n_items, D]`` features of the tracker's crop of each spec's colour in
    every frame (a blank crop where the colour is missing, so missing items cost distance);
    ``"frames"``: ``[T, D]`` features of the whole frames (max over channels, resized to 28).
    """
    video = _as_video(video)
    classifier = classifier or load_classifier()
    out: dict[str, np.ndarray] = {}
    if specs is not None:
        specs = _specs(specs)
        if tracks is None:
            tracks = track_items(video, [s.colour for s in specs], classifier)
        out["items"] = np.concatenate([tracks[s.colour].features for s in specs])
    gray = torch.from_numpy(video.max(axis=-1).astype(np.float32) / 255.0)[:, None]  # [T,1,H,W]
    gray = F.interpolate(gray, size=(28, 28), mode="area")  # [T, 1, 28, 28]
    out["frames"] = classifier.features(gray).numpy()
    return out


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(m)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (FID's formula, computed
    with symmetric eigendecompositions, so singular covariances of small sets are fine).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N>=2, D] of one D, got {a.shape}, {b.shape}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _sqrt_psd(sa)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0, None)).sum()
    return float(max(0.0, mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross))


def confusion(items: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Asked class -> {predicted majority class, or ``"none"`` when the colour is not found in
    half of the frames: count} over :func:`score_clip` items (rows: every asked class)."""
    out: dict[str, dict[str, int]] = {}
    for it in items:
        pred = it["pred_class"] if it["colour_present"] and it["pred_class"] else "none"
        row = out.setdefault(it["class"], {})
        row[pred] = row.get(pred, 0) + 1
    return {c: out[c] for c in CLASSES if c in out}


def per_frame(items: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per frame, over :func:`score_clip` items of one clip length: the fraction where the colour
    is found (``present``), the frame's class is the asked one (``class``) and it is the item's
    majority class (``identity``). Empty lists when the items' lengths differ."""
    lengths = {len(it["frame_classes"]) for it in items}
    if len(lengths) != 1:
        return {"present": [], "class": [], "identity": []}
    fc = np.array([it["frame_classes"] for it in items], dtype=object)  # [N, T]
    asked = np.array([it["class"] for it in items], dtype=object)[:, None]  # [N, 1]
    major = np.array([it["pred_class"] for it in items], dtype=object)[:, None]  # [N, 1]
    present = fc != None  # noqa: E711 (elementwise on an object array)
    return {
        "present": present.mean(0).round(4).tolist(),
        "class": (present & (fc == asked)).mean(0).round(4).tolist(),
        "identity": (present & (fc == major)).mean(0).round(4).tolist(),
    }


def motion(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the motion of :func:`score_clip` items (found, with an asked direction) goes wrong.

    ``kinds``: counts of ``right``, ``static`` (no measurable motion), ``opposite`` and
    ``other_axis`` directions; ``speed_px``: mean measured px/frame of the rightly moving items
    per asked speed word; ``jump_rate``: mean fraction of frame pairs whose centroid jumps
    (position not continuous: the item vanishes and reappears elsewhere, or changes shape).
    """
    kinds = {"right": 0, "static": 0, "opposite": 0, "other_axis": 0}
    speeds: dict[str, list[float]] = {}
    for it in items:
        if not it["colour_present"] or it["direction"] is None:
            continue
        got, want = it["pred_direction"], it["direction"]
        if got == want:
            kinds["right"] += 1
            speeds.setdefault(str(it.get("speed")), []).append(max(map(abs, it["velocity"])))
        elif got is None:
            kinds["static"] += 1
        elif np.dot(DIRECTION_VECTORS[got], DIRECTION_VECTORS[want]) < 0:
            kinds["opposite"] += 1
        else:
            kinds["other_axis"] += 1
    jumps = [it["jump_rate"] for it in items if it.get("jump_rate") is not None]
    return {
        "kinds": kinds,
        "speed_px": {k: round(float(np.mean(v)), 3) for k, v in sorted(speeds.items())},
        "jump_rate": round(float(np.mean(jumps)), 4) if jumps else None,
    }
