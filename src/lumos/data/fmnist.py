"""Reading Fashion-MNIST from its IDX files (Debian ``dataset-fashion-mnist``), cached."""

from __future__ import annotations

import gzip
import math
import os
import struct
import threading
from pathlib import Path

import numpy as np

from lumos.data.vocab import CLASSES

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_ENV = "LUMOS_FMNIST_DIR"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FMNIST_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_FMNIST_LOCK = threading.Lock()


def _fmnist_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FMNIST_ENV) or FMNIST_DEFAULT_DIR)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read a gzipped big-endian IDX file (``ndim`` dimensions of uint8)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    head = 4 + 4 * ndim
    if len(data) < head:
        raise ValueError(f"{path} is truncated")
    got_magic, *dims = struct.unpack(f">{1 + ndim}I", data[:head])
    if got_magic != magic:
        raise ValueError(f"{path}: bad IDX magic {got_magic} (expected {magic})")
    arr = np.frombuffer(data, dtype=np.uint8, offset=head)
    if arr.size != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} values, found {arr.size}")
    return arr.reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST: ``(images uint8 [N, 28, 28], labels int64 [N])``.

    ``split``: ``"train"`` (60,000) or ``"test"`` (10,000; ``"t10k"`` also accepted).
    ``root``: folder with the four ``*-ubyte.gz`` files; defaults to ``$LUMOS_FMNIST_DIR``,
    else ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
    Results are cached per process and returned **read-only** (copy before editing).
    """
    split = {"t10k": "test"}.get(split, split)
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _fmnist_root(root)
    key = (str(base.resolve()), split)
    with _FMNIST_LOCK:
        if key in _FMNIST_CACHE:
            return _FMNIST_CACHE[key]
        img_path, lbl_path = (base / name for name in _FMNIST_FILES[split])
        for p in (img_path, lbl_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file not found: {p}. Install the data with "
                    f"`apt-get install dataset-fashion-mnist` (files go to {FMNIST_DEFAULT_DIR}),"
                    f" or point ${FMNIST_ENV} / root= at a folder holding {_FMNIST_FILES[split]}"
                )
        images = _read_idx(img_path, 2051, 3)  # [N, 28, 28] uint8
        labels = _read_idx(lbl_path, 2049, 1).astype(np.int64)  # [N]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{img_path}: {images.shape[0]} images but {labels.shape[0]} labels")
        images.flags.writeable = False
        labels.flags.writeable = False
        _FMNIST_CACHE[key] = (images, labels)
        return images, labels


_CLASS_INDEX_CACHE: dict[tuple[str, str], list[np.ndarray]] = {}


def _class_indices(split: str, root: str | os.PathLike | None) -> list[np.ndarray]:
    """Per class, the indices ``int64 [n_c]`` of the FMNIST images with that label."""
    key = (str(_fmnist_root(root).resolve()), split)
    if key not in _CLASS_INDEX_CACHE:
        _, labels = load_fashion_mnist(split, root)
        _CLASS_INDEX_CACHE[key] = [np.flatnonzero(labels == c) for c in range(len(CLASSES))]
    return _CLASS_INDEX_CACHE[key]
