"""The Fashion-MNIST classifier of the evaluator: model, training, accuracy, loading.

A small CNN (:class:`FashionClassifier`, ~130k parameters) of the ten Fashion-MNIST classes,
trained on the real FMNIST train split (grayscale 28x28) by :func:`train_classifier` and shipped
in ``assets/classifier/`` (``classifier.safetensors`` + ``classifier.json`` holding its t10k test
accuracy); :func:`load_classifier` reads it. Its penultimate activations
(:meth:`FashionClassifier.features`, 128-d) are the feature space of the Frechet distance.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lumos.data import CLASSES, load_fashion_mnist

CLASSIFIER_DIR = Path(__file__).resolve().parents[1] / "assets" / "classifier"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"

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
    out_dir: str | Path | None = None,
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
            "`lumos eval --train-classifier --classifier DIR` or train_classifier(DIR)"
        )
    meta = json.loads(mpath.read_text(encoding="utf-8"))
    model = FashionClassifier(**meta["config"])
    model.load_state_dict(load_file(str(wpath)))
    model.eval()
    model.meta = meta
    if cache:
        _CLASSIFIER_CACHE[key] = model
    return model
