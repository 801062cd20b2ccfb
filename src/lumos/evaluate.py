"""Evaluation of text-to-video models on Moving Fashion-MNIST prompts (``lumos eval``).

Three parts:

1. **Classifier**: a small CNN (:class:`FashionClassifier`, ~130k parameters) of the ten
   Fashion-MNIST classes, trained on the real FMNIST train split (grayscale 28x28) by
   :func:`train_classifier` and shipped in ``assets/classifier/`` (``classifier.safetensors`` +
   ``classifier.json`` holding its t10k test accuracy); :func:`load_classifier` reads it. Its
   penultimate activations (:meth:`FashionClassifier.features`, 128-d) are the feature space of
   the Frechet distance.
2. **Tracker** (:func:`track_items`): every pixel whose brightness (max over channels) reaches a
   threshold is given the colour of :data:`~lumos.data.COLOURS` with the nearest hue (largest
   cosine between RGB vectors); the black background is ignored. Per colour and frame, the
   item-sized window holding most of that colour's pixels locates the item (the colour counts as
   present if the window holds enough pixels and most of the colour's pixels in the frame, and
   the frame has a mostly black background, so coloured noise does not count); its centroid
   and bounding box follow, and a 28x28 grayscale crop (max over channels / the colour's scale)
   centred on the box is classified.
   The direction is the sign of the larger component of the centroid velocity fitted over the
   first half of the clip (before any bounce); identity consistency is the fraction of frames
   where the colour is present and the predicted class equals the item's majority class.
3. **Scores**: :func:`score_clip` (one clip against its caption's item specs),
   :func:`evaluate` (generate a clip per prompt of :func:`~lumos.data.eval_prompts` and
   aggregate, plus Frechet distances to real clips of the same specs), :func:`evaluate_real`
   (the same on real clips from :func:`~lumos.data.make_clip`: the ceiling of every score, and a
   check of the tracker) and :func:`main` (the ``lumos eval`` command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lumos.data import (
    CLASSES,
    COLOURS,
    ItemSpec,
    MovingFashionConfig,
    eval_prompts,
    load_fashion_mnist,
    make_clip,
)
from lumos.devices import DTYPE_CHOICES

__all__ = [
    "CLASSIFIER_DIR",
    "FashionClassifier",
    "train_classifier",
    "load_classifier",
    "classifier_accuracy",
    "ItemTrack",
    "assign_colours",
    "track_items",
    "score_clip",
    "clip_features",
    "frechet_distance",
    "select_prompts",
    "evaluate",
    "evaluate_real",
    "main",
]

CLASSIFIER_DIR = Path(__file__).parent / "assets" / "classifier"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
METRICS = ("class_accuracy", "colour_accuracy", "direction_accuracy", "identity_consistency")

# =========================================================================== classifier


class FashionClassifier(nn.Module):
    """Three 3x3 conv blocks (conv-BN-ReLU-maxpool) and a 2-layer head.

    Input: float ``[N, 1, 28, 28]`` in ``[0, 1]`` (grayscale / 255). ``forward`` gives logits
    ``[N, 10]``; :meth:`features` the penultimate activations ``[N, feature_dim]``.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, n_classes: int = 10) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "n_classes": n_classes}
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        # 28 -> 14 -> 7 -> 3
        self.body = nn.Sequential(block(1, w), block(w, 2 * w), block(2 * w, 2 * w))
        self.fc = nn.Linear(2 * w * 9, feature_dim)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """``[N, 1, 28, 28]`` -> penultimate features ``[N, feature_dim]`` (after ReLU)."""
        h = self.body(x).flatten(1)  # [N, 2w*9]
        return F.relu(self.fc(h))  # [N, D]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))  # [N, n_classes]


def _to_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 28, 28]`` in [0, 1]."""
    x = images if isinstance(images, Tensor) else torch.from_numpy(np.array(images, np.uint8))
    return (x.float() / 255.0).unsqueeze(1)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shift (+-2 px), scale (0.9..1.1) and contrast (0.7..1) of ``[N, 1, 28, 28]``.

    Makes the classifier tolerant of the tracker's crops (off-centre by a pixel or two,
    generated items slightly larger or dimmer than the originals).
    """
    n = x.shape[0]
    scale = torch.empty(n).uniform_(0.9, 1.1, generator=gen)  # [N]
    shift = torch.randint(-2, 3, (n, 2), generator=gen).float() * (2.0 / 28)  # [N, 2] (x, y)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / scale
    theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [N, 28, 28, 2]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.0, generator=gen)
    return out * contrast


@torch.no_grad()
def classifier_accuracy(
    model: FashionClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` on uint8 ``images [N, 28, 28]`` with ``labels [N]``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(_to_input(images[i : i + batch_size]))  # [B, 10]
        correct += int((logits.argmax(1).numpy() == np.asarray(labels[i : i + batch_size])).sum())
    return correct / max(1, len(images))


def train_classifier(
    out_dir: str | Path | None = CLASSIFIER_DIR,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 32,
    feature_dim: int = 128,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train :class:`FashionClassifier` on the FMNIST train split; test on t10k.

    AdamW with a one-cycle schedule, light augmentation (:func:`_augment`) on half of each
    batch. Saves ``classifier.safetensors`` and ``classifier.json`` (config, ``test_accuracy``,
    epochs, seed, train time) to ``out_dir`` (None: do not save). Returns the metadata dict
    (``{"test_accuracy": ..., ...}``). Runs on the CPU with torch's current thread count.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    x_all = _to_input(train_x.copy())  # [60000, 1, 28, 28]
    y_all = torch.from_numpy(train_y.copy())  # [60000]
    model = FashionClassifier(width, feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x_all), batch_size):
            idx = perm[i : i + batch_size]
            x, y = x_all[idx], y_all[idx]
            half = x.shape[0] // 2
            x = torch.cat([_augment(x[:half], gen), x[half:]])
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        if log:
            acc = classifier_accuracy(model, test_x, test_y)
            log(
                f"epoch {epoch + 1}/{epochs}: loss {total / n:.4f}, t10k accuracy {acc:.4f} "
                f"({time.time() - start:.0f} s)"
            )
    model.eval()
    meta = {
        "format": "lumos-fmnist-classifier",
        "config": model.config,
        "classes": list(CLASSES),
        "test_accuracy": classifier_accuracy(model, test_x, test_y),
        "test_split": "t10k",
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "train_seconds": round(time.time() - start, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "input": "grayscale 28x28, float in [0, 1] (uint8 / 255), shape [N, 1, 28, 28]",
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": meta["format"]})
        os.chmod(out / WEIGHTS_FILE, 0o644)  # package data: readable by everyone
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    model.meta = meta
    return meta


_CLASSIFIER_CACHE: dict[str, FashionClassifier] = {}


def load_classifier(folder: str | Path | None = None, cache: bool = True) -> FashionClassifier:
    """Load the trained classifier (default: the bundled ``assets/classifier/``), in eval mode.

    The returned module has ``.meta`` (the JSON metadata, with ``test_accuracy``). Cached per
    folder unless ``cache=False``.
    """
    folder = Path(folder) if folder is not None else CLASSIFIER_DIR
    key = str(folder.resolve())
    if cache and key in _CLASSIFIER_CACHE:
        return _CLASSIFIER_CACHE[key]
    wpath, mpath = folder / WEIGHTS_FILE, folder / META_FILE
    if not wpath.is_file() or not mpath.is_file():
        raise FileNotFoundError(
            f"no classifier in {folder} (need {WEIGHTS_FILE} and {META_FILE}); train one with "
            "`lumos eval --train-classifier` or lumos.evaluate.train_classifier()"
        )
    meta = json.loads(mpath.read_text(encoding="utf-8"))
    model = FashionClassifier(**meta["config"])
    model.load_state_dict(load_file(str(wpath)))
    model.eval()
    model.meta = meta
    if cache:
        _CLASSIFIER_CACHE[key] = model
    return model


# =========================================================================== tracker

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


# =========================================================================== scores


def _specs(specs: Sequence[Any]) -> list[ItemSpec]:
    return [s if isinstance(s, ItemSpec) else ItemSpec(*s) for s in specs]


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
    none); ``all_correct`` whether every item got class, colour and direction right.
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
) -> dict[str, Any]:
    """Generate a clip per prompt (and seed) of ``eval_prompts(split)`` and score them.

    ``pipeline``: a :class:`lumos.pipeline.Pipeline` (anything with ``text_to_video(prompt,
    frames, steps=, cfg=, seed=) -> uint8 [T, H, W, 3]``). ``split``: ``"seen"`` or
    ``"heldout"``; ``n_prompts``: how many (evenly spaced, see :func:`select_prompts`; None:
    all 48); ``seeds``: a count (0..n-1) or a list of seeds. Returns the means over items of
    ``class_accuracy``, ``colour_accuracy``, ``direction_accuracy``,
    ``identity_consistency``, the fraction of clips ``all_correct``, the Frechet distances
    ``frechet_distance`` (item crops) and ``frechet_distance_frames`` (whole frames) to real
    clips of the same specs, counts, and the per-clip scores under ``"clips"``.
    """
    frames = frames or getattr(getattr(pipeline, "settings", None), "frames", 16)

    def make(caption: str, specs: list[ItemSpec], p: int, seed: int) -> np.ndarray:
        return _as_video(
            pipeline.text_to_video(caption, frames=frames, steps=steps, cfg=cfg, seed=seed)
        )

    return _run(make, split, n_prompts, seeds, frames, classifier, 10_000, log)


def evaluate_real(
    split: str = "heldout",
    n_prompts: int | None = None,
    seeds: int | Sequence[int] = 1,
    frames: int = 16,
    classifier: FashionClassifier | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The scores of :func:`evaluate` on *real* clips (:func:`~lumos.data.make_clip` with the
    prompts' specs): the ceiling of every score and a check of the tracker. The Frechet
    distances compare these clips with a second, independent set of real clips (their floor).
    """

    def make(caption: str, specs: list[ItemSpec], p: int, seed: int) -> np.ndarray:
        return _real_clip(specs, split, frames, seed, p)

    return _run(make, split, n_prompts, seeds, frames, classifier, 10_000, log)


# =========================================================================== CLI


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A text table of ``{row name: evaluate() result}``."""
    cols = [
        ("clips", "n_clips"),
        ("class", "class_accuracy"),
        ("colour", "colour_accuracy"),
        ("direction", "direction_accuracy"),
        ("identity", "identity_consistency"),
        ("all", "all_correct"),
        ("FD items", "frechet_distance"),
        ("FD frames", "frechet_distance_frames"),
    ]
    rows = [["split", *(c for c, _ in cols)]]
    for name, r in results.items():
        rows.append([name, *(_fmt(r.get(k)) for _, k in cols)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(wd) for cell, wd in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lumos eval``: score a model (or real clips) on the evaluation prompts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="lumos eval", description="evaluate a model on Moving Fashion-MNIST prompts"
    )
    p.add_argument("--model", default=None, help="model folder, or 'random' (default: bundled)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--split", default="seen,heldout", help="comma list of seen, heldout")
    p.add_argument("--prompts", type=int, default=None, help="prompts per split (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="clips (seeds) per prompt")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: model's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: model's)")
    p.add_argument("--frames", type=int, default=None, help="RGB frames (default: model's)")
    p.add_argument("--temperature", type=float, default=None, help="code temperature (model's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (model's)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (model's)")
    p.add_argument("--tau0", type=float, default=None, help="MaskGIT confidence noise (model's)")
    p.add_argument(
        "--history-mask",
        type=float,
        default=None,
        help="AR-DF inference masking of committed frames, in [0, 1) (model's)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--real", action="store_true", help="also score real clips (the ceiling)")
    p.add_argument("--real-only", action="store_true", help="score real clips only, no model")
    p.add_argument("--classifier", default=None, help="classifier folder (default: bundled)")
    p.add_argument(
        "--train-classifier", action="store_true", help="(re)train the classifier and exit"
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs for --train-classifier")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    if args.train_classifier:
        meta = train_classifier(args.classifier or CLASSIFIER_DIR, args.epochs, args.seed, log=log)
        print(f"classifier t10k test accuracy: {meta['test_accuracy']:.4f}")
        return 0

    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    for s in splits:
        if s not in ("seen", "heldout"):
            p.error(f"--split: unknown split {s!r} (use seen, heldout)")
    if args.prompts is not None and args.prompts < 1:
        p.error("--prompts must be >= 1")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    try:
        classifier = load_classifier(args.classifier)
    except FileNotFoundError as e:
        raise SystemExit(f"lumos eval: {e}") from None
    seeds = list(range(args.seed, args.seed + args.seeds))
    results: dict[str, Any] = {
        "classifier": {
            "test_accuracy": classifier.meta.get("test_accuracy"),
            "path": str(Path(args.classifier) if args.classifier else CLASSIFIER_DIR),
        },
        "model": args.model or "bundled",
        "settings": {
            "splits": splits,
            "prompts": args.prompts,
            "seeds": seeds,
            "steps": args.steps,
            "cfg": args.cfg,
            "frames": args.frames,
            "dtype": args.dtype,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "tau0": args.tau0,
            "history_mask": args.history_mask,
        },
        "splits": {},
    }
    rows: dict[str, dict[str, Any]] = {}
    if not args.real_only:
        from lumos.pipeline import Pipeline

        try:
            pipe = Pipeline.from_folder(args.model, device=args.device, dtype=args.dtype)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"lumos eval: {e}") from None
        try:
            pipe.set_sampling(
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                tau0=args.tau0,
                history_mask=args.history_mask,
            )
        except ValueError as e:
            p.error(str(e))
        frames = args.frames or pipe.settings.frames
        results["settings"]["frames"] = frames
        for s in splits:
            r = evaluate(
                pipe, s, args.prompts, seeds, frames, args.steps, args.cfg, classifier, log
            )
            results["splits"][s] = r
            rows[s] = r
    if args.real or args.real_only:
        frames = results["settings"]["frames"] or 16
        results["real"] = {}
        for s in splits:
            r = evaluate_real(s, args.prompts, seeds, frames, classifier, log)
            results["real"][s] = r
            rows[f"real {s}"] = r
    print(f"classifier t10k accuracy: {_fmt(results['classifier']['test_accuracy'])}")
    print(format_table(rows))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
