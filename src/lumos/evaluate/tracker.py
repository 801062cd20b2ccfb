"""The colour tracker of the evaluator: where each captioned colour is, frame by frame.

Every pixel whose brightness (max over channels) reaches a threshold is given the colour of
:data:`~lumos.data.COLOURS` with the nearest hue (largest cosine between RGB vectors); the black
background is ignored. Per colour and frame, the item-sized window holding most of that colour's
pixels locates the item (the colour counts as present if the window holds enough pixels and most
of the colour's pixels in the frame, and the frame has a mostly black background, so coloured
noise does not count); its centroid and bounding box follow, and a 28x28 grayscale crop (max over
channels / the colour's scale) centred on the box is classified. The direction is the sign of the
larger component of the centroid velocity fitted over the first half of the clip (before any
bounce); identity consistency is the fraction of frames where the colour is present and the
predicted class equals the item's majority class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lumos.data import CLASSES, COLOURS
from lumos.evaluate.classifier import FashionClassifier, load_classifier

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], np.float32)  # [K, 3]
_COLOUR_UNIT = _COLOUR_RGB / np.linalg.norm(_COLOUR_RGB, axis=1, keepdims=True)  # [K, 3]
_COLOUR_SCALE = _COLOUR_RGB.max(axis=1)  # [K] brightness of a white (255) FMNIST pixel


@dataclass
class ItemTrack:
    """What the tracker found of one colour in a clip of ``T`` frames.

    ``present`` bool ``[T]``; ``centroids`` float ``[T, 2]`` (y, x; NaN when absent);
    ``boxes`` int ``[T, 4]`` (y0, x0, y1, x1 inclusive; -1 when absent); ``crops`` float
    ``[T, 28, 28]`` in [0, 1] (zeros when absent); ``probs`` ``[T, 10]`` classifier
    probabilities and ``features`` ``[T, D]`` penultimate features of the crops; ``preds``
    ``[T]`` per-frame class index (-1 when absent); ``cls`` the majority class name (None if
    never present); ``direction`` (None if not measurable); ``velocity`` (dy, dx) px/frame;
    ``consistency`` fraction of frames present with ``preds == majority``.
    """

    colour: str
    present: np.ndarray
    centroids: np.ndarray
    boxes: np.ndarray
    crops: np.ndarray
    probs: np.ndarray
    features: np.ndarray
    preds: np.ndarray
    cls: str | None
    direction: str | None
    velocity: tuple[float, float]
    consistency: float

    @property
    def present_fraction(self) -> float:
        return float(self.present.mean()) if self.present.size else 0.0


def _as_video(video: Any) -> np.ndarray:
    if isinstance(video, Tensor):
        video = video.detach().cpu().numpy()
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be uint8 [T, H, W, 3], got {video.shape}")
    return video


def assign_colours(video: np.ndarray, threshold: float = 48.0) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel the index into ``COLOURS`` of the nearest hue, -1 below ``threshold``.

    ``video`` uint8 ``[T, H, W, 3]``. Returns ``(labels int8 [T, H, W], brightness float32
    [T, H, W])`` where brightness is the max over channels and the hue match is the largest
    cosine between the pixel's RGB vector and the colours' RGB vectors.
    """
    v = _as_video(video).astype(np.float32)  # [T, H, W, 3]
    bright = v.max(axis=-1)  # [T, H, W]
    norm = np.linalg.norm(v, axis=-1, keepdims=True)  # [T, H, W, 1]
    cos = (v / np.maximum(norm, 1e-6)) @ _COLOUR_UNIT.T  # [T, H, W, K]
    labels = cos.argmax(axis=-1).astype(np.int8)  # [T, H, W]
    labels[bright < threshold] = -1
    return labels, bright


def _box_sums(mask: np.ndarray, k: int) -> np.ndarray:
    """Sum of ``mask [T, H, W]`` over every ``k x k`` window: ``[T, H-k+1, W-k+1]``."""
    c = np.pad(mask.astype(np.int32).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    return c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]


def _crop(gray: np.ndarray, cy: float, cx: float, side: int, out: int) -> np.ndarray:
    """Square ``side`` crop of ``gray [H, W]`` centred at (cy, cx), zero padded, -> [out, out]."""
    h, w = gray.shape
    y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
    patch = np.zeros((side, side), np.float32)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + side), min(w, x0 + side)
    if ye > ys and xe > xs:
        patch[ys - y0 : ye - y0, xs - x0 : xe - x0] = gray[ys:ye, xs:xe]
    if side != out:
        t = torch.from_numpy(patch)[None, None]  # [1, 1, side, side]
        patch = F.interpolate(t, size=(out, out), mode="area").numpy()[0, 0]
    return patch


def _direction(
    centroids: np.ndarray, present: np.ndarray, min_speed: float
) -> tuple[str | None, tuple[float, float]]:
    """Direction from the centroid velocity fitted over the first half of the clip."""
    t = len(centroids)
    half = math.ceil((t - 1) / 2)  # frames 0..half move in the captioned direction
    idx = np.flatnonzero(present[: half + 1])
    if t < 2 or len(idx) < 2:
        return None, (0.0, 0.0)
    ts = idx.astype(np.float64)
    ts -= ts.mean()
    c = centroids[idx].astype(np.float64)  # [n, 2]
    vel = (ts[:, None] * (c - c.mean(0))).sum(0) / (ts**2).sum()  # [2] (dy, dx)
    dy, dx = float(vel[0]), float(vel[1])
    if max(abs(dy), abs(dx)) < min_speed:
        return None, (dy, dx)
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), (dy, dx)
    return ("down" if dy > 0 else "up"), (dy, dx)


@torch.no_grad()
def track_items(
    video: Any,
    colours: Sequence[str] | None = None,
    classifier: FashionClassifier | None = None,
    threshold: float = 48.0,
    min_pixels: int = 15,
    min_fraction: float = 0.75,
    min_background: float = 0.5,
    item_size: int | None = None,
    min_speed: float = 0.3,
) -> dict[str, ItemTrack]:
    """Track the items of ``video`` (uint8 ``[T, H, W, 3]``) by colour.

    ``colours``: the colour names to track (default: all of :data:`COLOURS`). ``threshold``:
    brightness (max channel, 0..255) below which a pixel is background; ``min_pixels`` /
    ``min_fraction``: a colour is present in a frame when the best item-sized window
    (``item_size + 4`` px; ``item_size`` defaults to 28 at 64 px, scaled with the frame) holds
    at least that many of its pixels and that fraction of all its pixels in the frame, and at
    least ``min_background`` of the frame is black background (below ``threshold``; items
    cover at most ~40% of a real frame, so frames of coloured noise hold no item).
    ``min_speed``: px/frame below which no direction is reported. Returns ``{colour: track}``.
    """
    video = _as_video(video)
    classifier = classifier or load_classifier()
    colours = list(COLOURS) if colours is None else list(dict.fromkeys(colours))
    t, h, w, _ = video.shape
    item = item_size or max(4, round(28 * min(h, w) / 64))
    win = min(h, w, item + 4)
    labels, bright = assign_colours(video, threshold)  # [T, H, W] x2
    dim = bright < threshold  # [T, H, W]: hue unreliable; kept in every colour's crop
    scene = dim.reshape(t, -1).mean(1) >= min_background  # [T] a black background
    out: dict[str, ItemTrack] = {}
    for name in colours:
        if name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; known: {list(COLOURS)}")
        k = _COLOUR_NAMES.index(name)
        mask = labels == k  # [T, H, W]
        sums = _box_sums(mask, win)  # [T, H-win+1, W-win+1]
        flat = sums.reshape(t, -1)
        best = flat.argmax(1)  # [T]
        in_win = flat[np.arange(t), best]  # [T]
        total = mask.reshape(t, -1).sum(1)  # [T]
        present = (in_win >= min_pixels) & (in_win >= min_fraction * np.maximum(total, 1))
        present &= scene
        gray = np.where(mask | dim, bright / _COLOUR_SCALE[k], 0.0).clip(0, 1)  # [T, H, W]
        centroids = np.full((t, 2), np.nan)
        boxes = np.full((t, 4), -1, np.int64)
        crops = np.zeros((t, 28, 28), np.float32)
        for f in np.flatnonzero(present):
            wy, wx = divmod(int(best[f]), sums.shape[2])
            ys, xs = np.nonzero(mask[f, wy : wy + win, wx : wx + win])
            ys, xs = ys + wy, xs + wx
            centroids[f] = (ys.mean(), xs.mean())
            y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
            boxes[f] = (y0, x0, y1, x1)
            side = max(item, y1 - y0 + 1, x1 - x0 + 1)
            crops[f] = _crop(gray[f], (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2, side, 28)
        x = torch.from_numpy(crops).unsqueeze(1)  # [T, 1, 28, 28]
        feats = classifier.features(x)  # [T, D]
        probs = classifier.head(feats).softmax(-1).numpy()  # [T, 10]
        preds = np.where(present, probs.argmax(1), -1)  # [T]
        if present.any():
            votes = np.bincount(preds[present], minlength=len(CLASSES))  # [10]
            tied = np.flatnonzero(votes == votes.max())
            majority = int(tied[probs[present][:, tied].mean(0).argmax()])
            cls = CLASSES[majority]
            consistency = float((preds == majority).mean())
        else:
            cls, consistency = None, 0.0
        direction, vel = _direction(centroids, present, min_speed)
        out[name] = ItemTrack(
            name,
            present,
            centroids,
            boxes,
            crops,
            probs,
            feats.numpy(),
            preds,
            cls,
            direction,
            vel,
            consistency,
        )
    return out
