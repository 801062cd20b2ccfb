"""Training data for Lumos: Moving Fashion-MNIST, users' video folders and token shards.

**Moving Fashion-MNIST** is our synthetic text-to-video world. Each clip is ``T`` frames of a
black ``size x size`` canvas on which 1..``max_items`` *real* Fashion-MNIST images (read from
the Debian package ``dataset-fashion-mnist``) are colourised (grayscale x an RGB colour; two
items are composited with a per-pixel ``max``) and move in a straight line, bouncing off the
walls. Every item is a triple ``(class, colour, direction)`` plus a speed.

Caption grammar (lower case, no final period; built by :func:`build_caption`, inverted by
:func:`parse_caption`)::

    video caption := clause (" while " clause)*
    clause        := ARTICLE " " COLOUR " " CLASS " " VERB [" " SPEED]
    image caption := noun (" and " noun)*          (1-frame clips, no motion)
    noun          := ARTICLE " " COLOUR " " CLASS
    ARTICLE       := "a" | "an"                      ("an" before a vowel: "an orange bag")
    COLOUR        := red | green | blue | yellow | cyan | magenta | orange | white
    CLASS         := t-shirt | trouser | pullover | dress | coat | sandal | shirt | sneaker
                   | bag | ankle boot
    VERB          := "moves left" | "moves right" | "rises" | "falls"
                     (directions left / right / up / down; "rises" = up the screen)
    SPEED         := "slowly" | "quickly"            (1 / 3 pixels per frame by default)

e.g. ``"a red sneaker moves left quickly while a blue bag falls slowly"`` and, for images,
``"a red sneaker and a blue bag"``. The speed word is included unless
``MovingFashionConfig.caption_speed`` is false. The verb names the *initial* direction:
items start far enough from the wall ahead to keep that direction for at least the first
half of the clip, then bounce (reverse) at the borders.

**Held-out combinations** (:data:`HELD_OUT`): the 32 of the 320 ``(class, colour, direction)``
triples with ``(class_index + 3 * colour_index + direction_index) % 10 == 0`` (indices into
:data:`CLASSES`, :data:`COLOURS`, :data:`DIRECTIONS`). They never appear in the ``"train"``
split; every class, colour and direction, and every *pair* of them, still does. Splits:
``"train"`` (seen triples, FMNIST train images), ``"test"`` (seen triples, FMNIST test
images), ``"heldout"`` (only held-out triples, FMNIST test images).

**Users' data**: :class:`VideoFolderDataset` reads a folder of videos with same-stem ``.txt``
captions, or a CSV with ``path,caption`` columns.

**Token shards**: :func:`write_shards` stores pre-tokenised clips (video codes from a
tokenizer callable, text ids from a text tokenizer callable) as flat memory-mappable ``.npy``
files; :class:`ShardDataset` reads them back with ``np.load(mmap_mode="r")``.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lumos.video import VIDEO_EXTENSIONS, read_video

__all__ = [
    "FMNIST_DEFAULT_DIR",
    "FMNIST_ENV",
    "CLASSES",
    "COLOURS",
    "DIRECTIONS",
    "DIRECTION_VERBS",
    "DIRECTION_VECTORS",
    "SPEEDS",
    "HELD_OUT",
    "SPLITS",
    "load_fashion_mnist",
    "is_held_out",
    "ItemSpec",
    "Item",
    "Clip",
    "MovingFashionConfig",
    "build_caption",
    "make_clip",
    "MovingFashionDataset",
    "collate_clips",
    "parse_caption",
    "parse_caption_items",
    "eval_prompts",
    "VideoFolderDataset",
    "write_shards",
    "ShardDataset",
]

# =========================================================================== Fashion-MNIST

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


# =========================================================================== vocabulary

#: Fashion-MNIST labels 0..9 as caption words.
CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
#: Colour name -> RGB multiplier of the grayscale image. Distinct hues (+ white).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 40, 40),
    "green": (40, 220, 40),
    "blue": (60, 90, 255),
    "yellow": (255, 230, 30),
    "cyan": (30, 230, 230),
    "magenta": (240, 50, 240),
    "orange": (255, 140, 20),
    "white": (255, 255, 255),
}
#: Motion directions, in screen terms ("up" is towards row 0).
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: Direction -> caption verb phrase.
DIRECTION_VERBS: dict[str, str] = {
    "left": "moves left",
    "right": "moves right",
    "up": "rises",
    "down": "falls",
}
#: Direction -> unit step ``(dy, dx)`` in (row, column) pixels.
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
#: Speed adverb -> default pixels per frame (at ``size=64``; see MovingFashionConfig.speeds).
SPEEDS: dict[str, int] = {"slowly": 1, "quickly": 3}

SPLITS = ("train", "test", "heldout")
_SPLIT_IDS = {"train": 0, "test": 1, "heldout": 2}
_CLASS_IDX = {c: i for i, c in enumerate(CLASSES)}
_COLOUR_IDX = {c: i for i, c in enumerate(COLOURS)}
_DIR_IDX = {d: i for i, d in enumerate(DIRECTIONS)}

Triple = tuple[str, str, str]

#: The 32 held-out (class, colour, direction) triples (10% of 320), see the module docstring.
HELD_OUT: frozenset[Triple] = frozenset(
    (cls, col, d)
    for ci, cls in enumerate(CLASSES)
    for ki, col in enumerate(COLOURS)
    for di, d in enumerate(DIRECTIONS)
    if (ci + 3 * ki + di) % 10 == 0
)


def is_held_out(cls: str, colour: str, direction: str | None) -> bool:
    """Whether ``(cls, colour, direction)`` is in :data:`HELD_OUT` (images never are)."""
    return direction is not None and (cls, colour, direction) in HELD_OUT


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# =========================================================================== clips


class ItemSpec(NamedTuple):
    """What an item is: class, colour, direction (``None`` for images), speed name or None."""

    cls: str
    colour: str
    direction: str | None = None
    speed: str | None = None

    @property
    def triple(self) -> tuple[str, str, str | None]:
        return (self.cls, self.colour, self.direction)


@dataclass
class Item:
    """One object in a clip, with its trajectory (for the evaluator's tracker).

    ``positions``: ``int64 [T, 2]`` top-left corner ``(y, x)`` (row, column) of the item's
    ``size x size`` box in each frame. ``direction`` / ``speed`` are the *initial* (captioned)
    ones; both are ``None`` for 1-frame image clips. ``image_index`` indexes the FMNIST split
    the image came from (``"train"`` for the train split, ``"test"`` otherwise).
    """

    cls: str
    colour: str
    direction: str | None
    speed: str | None
    positions: np.ndarray
    image_index: int = -1
    size: int = 28
    speed_px: int = 0

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def spec(self) -> ItemSpec:
        return ItemSpec(self.cls, self.colour, self.direction, self.speed)

    @property
    def triple(self) -> tuple[str, str, str | None]:
        return (self.cls, self.colour, self.direction)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (key ``"class"`` for :attr:`cls`)."""
        return {
            "class": self.cls,
            "colour": self.colour,
            "rgb": list(self.rgb),
            "direction": self.direction,
            "speed": self.speed,
            "speed_px": self.speed_px,
            "size": self.size,
            "image_index": self.image_index,
            "positions": self.positions.tolist(),
        }


@dataclass
class Clip:
    """A captioned clip: ``video`` is ``uint8 [T, H, W, 3]`` (``T == 1`` for images)."""

    video: np.ndarray
    caption: str
    items: list[Item] = field(default_factory=list)
    split: str = ""


@dataclass
class MovingFashionConfig:
    """Settings of the Moving Fashion-MNIST generator.

    ``size``: canvas side (pixels); ``frames``: clip length ``T``; ``min_items..max_items``
    objects per clip; ``item_size``: side of each (resized) 28x28 FMNIST image; ``speeds``:
    adverb -> pixels per frame; ``held_out``: triples excluded from ``"train"``; ``seed``:
    default dataset seed; ``caption_speed``: put the speed adverb in captions;
    ``distinct_colours``: sampled items of one clip get different colours; ``fmnist_root``:
    folder of the FMNIST files (default: see :func:`load_fashion_mnist`).
    """

    size: int = 64
    frames: int = 16
    max_items: int = 2
    min_items: int = 1
    item_size: int = 28
    speeds: dict[str, int] = field(default_factory=lambda: dict(SPEEDS))
    held_out: frozenset[Triple] = HELD_OUT
    seed: int = 0
    caption_speed: bool = True
    distinct_colours: bool = True
    fmnist_root: str | None = None

    def __post_init__(self) -> None:
        self.held_out = frozenset(tuple(t) for t in self.held_out)
        self.speeds = dict(self.speeds)
        if not 1 <= self.item_size <= self.size:
            raise ValueError(f"need 1 <= item_size <= size, got {self.item_size}, {self.size}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"need 1 <= min_items <= max_items, got {self.min_items}..")
        if self.distinct_colours and self.max_items > len(COLOURS):
            raise ValueError(f"max_items > {len(COLOURS)} colours with distinct_colours=True")
        room = self.size - self.item_size
        for name, px in self.speeds.items():
            if name not in SPEEDS:
                raise ValueError(f"unknown speed {name!r}; known: {list(SPEEDS)}")
            if not 0 < px <= room:
                raise ValueError(f"speed {name}={px} px/frame must be in 1..{room} (size-item)")
        for t in self.held_out:
            _check_triple(*t)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (e.g. for a checkpoint); inverse of :meth:`from_dict`."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["held_out"] = sorted(list(t) for t in self.held_out)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MovingFashionConfig:
        d = dict(d)
        if "held_out" in d:
            d["held_out"] = frozenset(tuple(t) for t in d["held_out"])
        return cls(**d)


def _check_triple(cls: str, colour: str, direction: str | None) -> None:
    if cls not in _CLASS_IDX:
        raise ValueError(f"unknown class {cls!r}; known: {list(CLASSES)}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {list(COLOURS)}")
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {list(DIRECTIONS)}")


def build_caption(specs: Sequence[ItemSpec | Sequence[Any]], with_speed: bool = True) -> str:
    """Caption for items ``(class, colour, direction[, speed])`` (see the module grammar).

    If every item has ``direction=None`` this is an image caption (``"a red bag and ..."``);
    otherwise every item needs a direction. ``with_speed=False`` drops the speed adverbs.
    """
    items = [ItemSpec(*s) for s in specs]
    if not items:
        raise ValueError("a caption needs at least one item")
    for s in items:
        _check_triple(s.cls, s.colour, s.direction)
        if s.speed is not None and s.speed not in SPEEDS:
            raise ValueError(f"unknown speed {s.speed!r}; known: {list(SPEEDS)}")
    nouns = [f"{_article(s.colour)} {s.colour} {s.cls}" for s in items]
    if all(s.direction is None for s in items):
        return " and ".join(nouns)
    if any(s.direction is None for s in items):
        raise ValueError("either all items or none must have a direction")
    clauses = []
    for noun, s in zip(nouns, items):
        clause = f"{noun} {DIRECTION_VERBS[s.direction]}"
        if with_speed and s.speed is not None:
            clause += f" {s.speed}"
        clauses.append(clause)
    return " while ".join(clauses)


def _alt(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_VERB_TO_DIR = {v: d for d, v in DIRECTION_VERBS.items()}
_PHRASE_RE = re.compile(
    rf"(?:a|an)\s+(?P<colour>{_alt(COLOURS)})\s+(?P<cls>{_alt(CLASSES)})"
    rf"(?:\s+(?P<verb>{_alt(_VERB_TO_DIR)}))?(?:\s+(?P<speed>{_alt(SPEEDS)}))?"
)


def parse_caption_items(caption: str) -> list[ItemSpec]:
    """Parse a caption of the module grammar into :class:`ItemSpec` s (speed may be None).

    Case, extra spaces and a final period are tolerated. Raises ``ValueError`` otherwise.
    """
    text = " ".join(caption.lower().strip().rstrip(".").split())
    if not text:
        raise ValueError("empty caption")
    out = []
    for phrase in re.split(r"\s+(?:while|and)\s+|\s*,\s*", text):
        m = _PHRASE_RE.fullmatch(phrase)
        if m is None:
            raise ValueError(f"cannot parse {phrase!r} in caption {caption!r}")
        verb = m.group("verb")
        if verb is None and m.group("speed") is not None:
            raise ValueError(f"speed without a verb in {phrase!r}")
        direction = _VERB_TO_DIR[verb] if verb else None
        out.append(ItemSpec(m.group("cls"), m.group("colour"), direction, m.group("speed")))
    return out


def parse_caption(caption: str) -> list[tuple[str, str, str | None]]:
    """Inverse of the caption builder: ``[(class, colour, direction), ...]`` in caption order.

    ``direction`` is ``None`` for image captions. Raises ``ValueError`` if unparseable.
    """
    return [s.triple for s in parse_caption_items(caption)]


def _item_image(split: str, index: int, cfg: MovingFashionConfig) -> np.ndarray:
    """FMNIST image ``index`` of ``split`` as ``uint8 [item_size, item_size]``."""
    images, _ = load_fashion_mnist(split, cfg.fmnist_root)
    img = images[index]  # [28, 28]
    if cfg.item_size != img.shape[0]:
        pil = Image.fromarray(np.asarray(img), mode="L")
        img = np.asarray(pil.resize((cfg.item_size, cfg.item_size), Image.Resampling.BICUBIC))
    return img


def _trajectory(
    rng: np.random.Generator, cfg: MovingFashionConfig, direction: str | None, speed_px: int, t: int
) -> np.ndarray:
    """Top-left positions ``int64 [T, 2]`` (y, x), bouncing off the canvas borders.

    The start is drawn so that the item keeps its initial direction for at least half the
    clip (or crosses the whole free range) before its first bounce.
    """
    room = cfg.size - cfg.item_size  # positions live in [0, room]
    pos = rng.integers(0, room + 1, size=2)  # [2] (y, x)
    if direction is None:
        return np.tile(pos, (t, 1)).astype(np.int64)  # [T, 2]
    dy, dx = DIRECTION_VECTORS[direction]
    axis = 0 if dy else 1
    sign = dy or dx
    run = min(room, speed_px * math.ceil((t - 1) / 2))  # distance needed before the wall
    ahead = int(rng.integers(run, room + 1))  # distance to the wall we move towards
    pos[axis] = ahead if sign < 0 else room - ahead
    vel = np.zeros(2, np.int64)
    vel[axis] = sign * speed_px
    out = np.empty((t, 2), np.int64)  # [T, 2]
    out[0] = pos
    for i in range(1, t):
        pos = pos + vel
        for a in range(2):
            if pos[a] < 0:
                pos[a], vel[a] = -pos[a], -vel[a]
            elif pos[a] > room:
                pos[a], vel[a] = 2 * room - pos[a], -vel[a]
        out[i] = pos
    return out


def _sample_specs(
    rng: np.random.Generator, cfg: MovingFashionConfig, split: str, images: bool
) -> list[ItemSpec]:
    """Draw the items of a clip for ``split`` (honouring held-out rules and colour clash)."""
    n = int(rng.integers(cfg.min_items, cfg.max_items + 1))
    speeds = sorted(cfg.speeds)
    held = sorted(cfg.held_out)
    specs: list[ItemSpec] = []
    used: set[str] = set()
    for _ in range(n):
        colours = [c for c in COLOURS if not (cfg.distinct_colours and c in used)]
        if split == "heldout":
            pool = [h for h in held if h[1] in colours]
            if not pool:
                raise ValueError("no held-out triple available (cfg.held_out empty?)")
            cls, colour, direction = pool[int(rng.integers(len(pool)))]
        else:
            while True:
                cls = CLASSES[int(rng.integers(len(CLASSES)))]
                colour = colours[int(rng.integers(len(colours)))]
                direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
                if images or (cls, colour, direction) not in cfg.held_out:
                    break
        speed = speeds[int(rng.integers(len(speeds)))]
        if images:
            direction, speed = None, None
        specs.append(ItemSpec(cls, colour, direction, speed))
        used.add(colour)
    return specs


def make_clip(
    rng: np.random.Generator | int,
    cfg: MovingFashionConfig | None = None,
    split: str = "train",
    spec: Sequence[ItemSpec | Sequence[Any]] | None = None,
    images: bool = False,
) -> Clip:
    """Render one Moving Fashion-MNIST clip.

    ``rng``: a numpy Generator (or an int seed). ``split``: ``"train"`` (FMNIST train images,
    never a held-out triple), ``"test"`` (seen triples, FMNIST test images) or ``"heldout"``
    (held-out triples only, FMNIST test images). ``spec``: force the items as
    ``(class, colour, direction[, speed])`` tuples / :class:`ItemSpec` (a ``None`` speed is
    drawn at random); a forced held-out triple raises ``ValueError`` in ``"train"``, a seen one
    in ``"heldout"``. ``images=True`` (or ``cfg.frames == 1``) makes a 1-frame still clip with
    an image caption and no motion (directions are ignored).
    Returns a :class:`Clip` with ``video`` ``uint8 [T, size, size, 3]``.
    """
    cfg = cfg or MovingFashionConfig()
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    images = images or cfg.frames == 1
    t = 1 if images else cfg.frames
    speeds = sorted(cfg.speeds)

    if spec is None:
        specs = _sample_specs(rng, cfg, split, images)
    else:
        specs = []
        for s in spec:
            s = ItemSpec(*s)
            _check_triple(*s.triple)
            if images:
                s = ItemSpec(s.cls, s.colour, None, None)
            else:
                if s.direction is None:
                    raise ValueError(f"video item {s} needs a direction")
                if s.speed is None:
                    s = s._replace(speed=speeds[int(rng.integers(len(speeds)))])
                elif s.speed not in cfg.speeds:
                    raise ValueError(f"unknown speed {s.speed!r}; known: {speeds}")
                held = s.triple in cfg.held_out
                if split == "train" and held:
                    raise ValueError(f"{s.triple} is held out and cannot be used in 'train'")
                if split == "heldout" and not held:
                    raise ValueError(f"{s.triple} is not a held-out triple ('heldout' split)")
            specs.append(s)
        if not specs:
            raise ValueError("spec must name at least one item")

    fm_split = "train" if split == "train" else "test"
    per_class = _class_indices(fm_split, cfg.fmnist_root)
    video = np.zeros((t, cfg.size, cfg.size, 3), np.uint8)  # [T, H, W, 3], black
    items: list[Item] = []
    for s in specs:
        candidates = per_class[_CLASS_IDX[s.cls]]
        index = int(candidates[int(rng.integers(len(candidates)))])
        gray = _item_image(fm_split, index, cfg).astype(np.uint16)  # [S, S]
        rgb = np.asarray(COLOURS[s.colour], np.uint16)  # [3]
        patch = ((gray[:, :, None] * rgb + 127) // 255).astype(np.uint8)  # [S, S, 3]
        speed_px = cfg.speeds[s.speed] if s.speed is not None else 0
        pos = _trajectory(rng, cfg, s.direction, speed_px, t)  # [T, 2] (y, x)
        k = cfg.item_size
        for f, (y, x) in enumerate(pos):
            region = video[f, y : y + k, x : x + k]  # [S, S, 3] view
            np.maximum(region, patch, out=region)
        items.append(
            Item(s.cls, s.colour, s.direction, s.speed, pos, index, cfg.item_size, speed_px)
        )
    caption = build_caption([it.spec for it in items], with_speed=cfg.caption_speed)
    return Clip(video=video, caption=caption, items=items, split=split)


class MovingFashionDataset(Dataset):
    """Deterministic map-style dataset of Moving Fashion-MNIST clips.

    Item ``i`` is ``make_clip(default_rng([seed, split_id, images, i]), cfg, split)``: the same
    clip every time, in any process or worker. ``images=True`` yields 1-frame clips (for
    text-to-image). Items are :class:`Clip` s; use :func:`collate_clips` in a DataLoader.
    """

    def __init__(
        self,
        cfg: MovingFashionConfig | None = None,
        split: str = "train",
        length: int = 10_000,
        seed: int | None = None,
        images: bool = False,
    ) -> None:
        self.cfg = cfg or MovingFashionConfig()
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.split = split
        self.length = int(length)
        self.seed = self.cfg.seed if seed is None else int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.images = images

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        """The generator that draws item ``index``."""
        entropy = [self.seed, _SPLIT_IDS[self.split], int(self.images), index]
        return np.random.default_rng(entropy)

    def __getitem__(self, index: int) -> Clip:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        return make_clip(self.rng(index), self.cfg, self.split, images=self.images)


def collate_clips(batch: Sequence[Clip]) -> dict[str, Any]:
    """DataLoader collate: ``{"video": uint8 [B, T, H, W, 3], "caption": [str], "items"}``."""
    videos = torch.from_numpy(np.stack([c.video for c in batch]))  # [B, T, H, W, 3]
    return {
        "video": videos,
        "caption": [c.caption for c in batch],
        "items": [c.items for c in batch],
    }


def eval_prompts(
    split: str = "heldout", images: bool = False, with_speed: bool = True
) -> list[tuple[str, list[ItemSpec]]]:
    """Fixed evaluation prompts: ``[(caption, [ItemSpec, ...]), ...]``.

    ``split="heldout"``: each of the 32 :data:`HELD_OUT` triples alone, then 16 two-item
    prompts pairing held-out triples. ``split="seen"`` (or ``"test"``/``"train"``): 32 seen
    triples (every 9th of the sorted seen triples) alone, then 16 two-item prompts of seen
    triples. Speeds alternate slowly/quickly; pairs always have distinct colours.
    ``images=True``: the same items as image prompts (no direction/speed, duplicates dropped).
    Deterministic: no random numbers are involved.
    """

    def key(t: Triple) -> tuple[int, int, int]:
        return (_CLASS_IDX[t[0]], _COLOUR_IDX[t[1]], _DIR_IDX[t[2]])

    if split == "heldout":
        triples = sorted(HELD_OUT, key=key)
    elif split in ("seen", "test", "train"):
        seen = sorted(
            ((c, k, d) for c in CLASSES for k in COLOURS for d in DIRECTIONS),
            key=key,
        )
        seen = [t for t in seen if t not in HELD_OUT]
        triples = seen[::9][:32]
    else:
        raise ValueError(f"split must be 'seen' or 'heldout', got {split!r}")
    speeds = ["slowly", "quickly"]
    groups: list[list[ItemSpec]] = []
    for i, t in enumerate(triples):
        groups.append([ItemSpec(*t, speeds[i % 2])])
    n = len(triples)
    for i in range(16):
        a = triples[(2 * i) % n]
        j = (2 * i + n // 2 + 1) % n
        while triples[j][1] == a[1]:  # distinct colours
            j = (j + 1) % n
        groups.append([ItemSpec(*a, speeds[i % 2]), ItemSpec(*triples[j], speeds[(i + 1) % 2])])
    out: list[tuple[str, list[ItemSpec]]] = []
    seen_captions: set[str] = set()
    for g in groups:
        if images:
            g = [ItemSpec(s.cls, s.colour) for s in g]
        cap = build_caption(g, with_speed=with_speed)
        if cap in seen_captions:
            continue
        seen_captions.add(cap)
        out.append((cap, g))
    return out


# =========================================================================== users' videos


class VideoFolderDataset(Dataset):
    """Users' captioned videos, read with :func:`lumos.video.read_video`.

    ``root`` is either a folder (searched recursively) of video files, each with a caption in
    a sidecar ``.txt`` file of the same stem (``clip1.mp4`` + ``clip1.txt``), or a ``.csv``
    file with columns ``path,caption`` (paths relative to the CSV's folder). Each item is a
    :class:`Clip` (``items`` empty, ``split="user"``) with ``video`` ``uint8 [T, size, size,
    3]``: resampled to ``fps`` (None: source rate), the first ``frames`` frames, padded by
    repeating the last frame when the video is shorter (``frames=None``: all frames).
    Missing files or captions raise ``FileNotFoundError`` at construction.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | tuple[int, int] = 64,
        frames: int | None = 16,
        fps: float | None = None,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        self.size = size
        self.frames = frames
        self.fps = fps
        if frames is not None and frames < 1:
            raise ValueError(f"frames must be >= 1 or None, got {frames}")
        exts = tuple(e.lower() for e in extensions)
        if self.root.is_file() and self.root.suffix.lower() == ".csv":
            self.samples = self._from_csv(self.root)
        elif self.root.is_dir():
            self.samples = self._from_folder(self.root, exts)
        elif not self.root.exists():
            raise FileNotFoundError(f"video folder / CSV not found: {self.root}")
        else:
            raise ValueError(f"{self.root} is neither a folder nor a .csv file")
        if not self.samples:
            raise ValueError(f"no videos with extensions {exts} found in {self.root}")

    @staticmethod
    def _from_folder(root: Path, exts: tuple[str, ...]) -> list[tuple[Path, str]]:
        videos = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        samples, missing = [], []
        for p in videos:
            txt = p.with_suffix(".txt")
            if not txt.is_file():
                missing.append(str(txt))
                continue
            caption = txt.read_text(encoding="utf-8").strip()
            if not caption:
                raise ValueError(f"empty caption file {txt}")
            samples.append((p, caption))
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(
                f"missing caption file(s) {missing[:5]}{more}: every video needs a sidecar "
                ".txt of the same stem holding its caption"
            )
        return samples

    @staticmethod
    def _from_csv(csv_path: Path) -> list[tuple[Path, str]]:
        base = csv_path.parent
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "path" not in fields or "caption" not in fields:
                raise ValueError(f"{csv_path} needs columns 'path' and 'caption', got {fields}")
            reader.fieldnames = fields
            samples, missing = [], []
            for line, row in enumerate(reader, start=2):
                rel, caption = (row.get("path") or "").strip(), (row.get("caption") or "").strip()
                if not rel or not caption:
                    raise ValueError(f"{csv_path}:{line}: empty path or caption")
                p = Path(rel) if Path(rel).is_absolute() else base / rel
                if not p.is_file():
                    missing.append(str(p))
                samples.append((p, caption))
        if missing:
            raise FileNotFoundError(f"{csv_path}: video file(s) not found: {missing[:5]}")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Clip:
        path, caption = self.samples[index]
        video = read_video(path, size=self.size, fps=self.fps, max_frames=self.frames)
        if self.frames is not None and video.shape[0] < self.frames:
            pad = np.repeat(video[-1:], self.frames - video.shape[0], axis=0)  # [P, H, W, 3]
            video = np.concatenate([video, pad])  # [frames, H, W, 3]
        return Clip(video=video, caption=caption, items=[], split="user")


# =========================================================================== token shards

SHARD_FORMAT = "lumos-shards"
SHARD_VERSION = 1
MANIFEST = "manifest.json"
# index columns: code offset, t, h, w, text offset, text length
_INDEX_COLS = 6


def _clip_parts(clip: Any) -> tuple[Any, str]:
    if isinstance(clip, Clip):
        return clip.video, clip.caption
    if isinstance(clip, dict):
        return clip["video"], clip["caption"]
    video, caption = clip
    return video, caption


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def write_shards(
    clips: Iterable[Any],
    encode_video: Callable[[np.ndarray], Any],
    encode_text: Callable[[str], Sequence[int]],
    out_dir: str | os.PathLike,
    shard_size: int = 4096,
    codebook_size: int | None = None,
    tokenizer_name: str | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pre-tokenise clips into memory-mappable shards; returns the manifest.

    ``clips``: :class:`Clip` s, ``(video, caption)`` pairs or ``{"video", "caption"}`` dicts.
    ``encode_video(uint8 [T, H, W, 3]) -> int codes [t, h, w]`` (LongTensor or array; a 2-D
    ``[h, w]`` result is taken as ``t == 1``); ``encode_text(str) -> list[int]``.
    Per shard ``k`` in ``out_dir``: ``shard_{k:05d}.codes.npy`` (all codes flat; ``uint16``
    when ``codebook_size <= 65536``, else ``int32``), ``.text.npy`` (text ids flat, ``int32``),
    ``.index.npy`` (``int64 [n, 6]``: code offset, t, h, w, text offset, text length) and
    ``.captions.json``; then ``manifest.json`` (written last) with the codebook size, the
    grid ``[t, h, w]`` (``null`` if it varies), counts, tokenizer name and ``metadata``.
    ``codebook_size=None`` infers ``max code + 1`` and picks the dtype per shard.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        if not overwrite:
            raise FileExistsError(f"{out / MANIFEST} exists; pass overwrite=True to replace it")
        (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in out.glob("shard_*"):
            old.unlink()

    shards: list[dict[str, Any]] = []
    grids: set[tuple[int, int, int]] = set()
    max_code = -1
    totals = {"codes": 0, "text": 0, "samples": 0}
    buf_codes: list[np.ndarray] = []  # each flat [t*h*w]
    buf_text: list[np.ndarray] = []  # each flat [L]
    buf_shape: list[tuple[int, int, int]] = []
    buf_caps: list[str] = []

    def flush() -> None:
        nonlocal buf_codes, buf_text, buf_shape, buf_caps
        if not buf_shape:
            return
        k = len(shards)
        stem = f"shard_{k:05d}"
        codes = np.concatenate(buf_codes)  # [sum t*h*w] int64
        text = np.concatenate(buf_text) if buf_text else np.zeros(0, np.int64)  # [sum L]
        hi = codebook_size if codebook_size is not None else int(codes.max(initial=0)) + 1
        dtype = np.uint16 if hi <= 2**16 else np.int32
        n = len(buf_shape)
        index = np.zeros((n, _INDEX_COLS), np.int64)  # [n, 6]
        code_lens = np.array([c.size for c in buf_codes], np.int64)  # [n]
        text_lens = np.array([x.size for x in buf_text], np.int64)  # [n]
        index[:, 0] = np.cumsum(code_lens) - code_lens
        index[:, 1:4] = np.array(buf_shape, np.int64)
        index[:, 4] = np.cumsum(text_lens) - text_lens
        index[:, 5] = text_lens
        _save_npy(out / f"{stem}.codes.npy", codes.astype(dtype))
        _save_npy(out / f"{stem}.text.npy", text.astype(np.int32))
        _save_npy(out / f"{stem}.index.npy", index)
        (out / f"{stem}.captions.json").write_text(json.dumps(buf_caps), encoding="utf-8")
        shards.append(
            {
                "stem": stem,
                "count": n,
                "codes_dtype": np.dtype(dtype).name,
                "num_codes": int(codes.size),
                "num_text_tokens": int(text.size),
            }
        )
        buf_codes, buf_text, buf_shape, buf_caps = [], [], [], []

    for clip in clips:
        video, caption = _clip_parts(clip)
        codes = encode_video(video)
        if hasattr(codes, "detach"):
            codes = codes.detach().cpu().numpy()
        codes = np.asarray(codes)
        if codes.ndim == 2:
            codes = codes[None]  # [h, w] -> [1, h, w]
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(
                f"encode_video must return integer codes [t, h, w], got "
                f"{codes.dtype} {tuple(codes.shape)}"
            )
        codes = codes.astype(np.int64)  # [t, h, w]
        if codes.size and codes.min() < 0:
            raise ValueError("encode_video returned negative codes")
        if codebook_size is not None and codes.size and codes.max() >= codebook_size:
            raise ValueError(f"code {int(codes.max())} >= codebook_size {codebook_size}")
        ids = np.asarray(list(encode_text(caption)), dtype=np.int64)  # [L]
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= 2**31)):
            raise ValueError("encode_text must return a list of non-negative int32 ids")
        max_code = max(max_code, int(codes.max(initial=-1)))
        grids.add(tuple(int(s) for s in codes.shape))
        buf_codes.append(codes.reshape(-1))
        buf_text.append(ids)
        buf_shape.append(tuple(int(s) for s in codes.shape))
        buf_caps.append(caption)
        totals["codes"] += codes.size
        totals["text"] += ids.size
        totals["samples"] += 1
        if len(buf_shape) >= shard_size:
            flush()
    flush()

    manifest = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "codebook_size": codebook_size if codebook_size is not None else max_code + 1,
        "codebook_size_inferred": codebook_size is None,
        "grid": list(next(iter(grids))) if len(grids) == 1 else None,
        "num_samples": totals["samples"],
        "num_shards": len(shards),
        "num_codes": totals["codes"],
        "num_text_tokens": totals["text"],
        "tokenizer": tokenizer_name,
        "shards": shards,
        "metadata": metadata or {},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


class ShardDataset(Dataset):
    """Reads :func:`write_shards` output lazily via ``np.load(mmap_mode="r")``.

    ``ds[i] -> (codes LongTensor [t, h, w], text_ids list[int])``. Attributes: ``manifest``,
    ``codebook_size``, ``grid`` (``[t, h, w]`` or None), ``tokenizer``. Safe to pickle into
    DataLoader workers (the memory maps are reopened in each process).
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.root = Path(out_dir)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {self.root} (run write_shards first)")
        self.manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
        if self.manifest.get("format") != SHARD_FORMAT:
            raise ValueError(f"{mpath} is not a {SHARD_FORMAT} manifest")
        self.codebook_size: int = self.manifest["codebook_size"]
        self.grid: list[int] | None = self.manifest["grid"]
        self.tokenizer: str | None = self.manifest.get("tokenizer")
        self._shards = self.manifest["shards"]
        counts = [s["count"] for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._captions: dict[int, list[str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}  # do not pickle memory maps (they would be copied)
        state["_captions"] = {}
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k not in self._open:
            stem = self._shards[k]["stem"]
            self._open[k] = tuple(
                np.load(self.root / f"{stem}.{part}.npy", mmap_mode="r")
                for part in ("codes", "text", "index")
            )
        return self._open[k]

    def shape(self, index: int) -> tuple[int, int, int]:
        """Code grid ``(t, h, w)`` of sample ``index``."""
        k, j = self._locate(index)
        row = self._arrays(k)[2][j]
        return int(row[1]), int(row[2]), int(row[3])

    def caption(self, index: int) -> str:
        """Original caption of sample ``index``."""
        k, j = self._locate(index)
        if k not in self._captions:
            path = self.root / f"{self._shards[k]['stem']}.captions.json"
            self._captions[k] = json.loads(path.read_text(encoding="utf-8"))
        return self._captions[k][j]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int]]:
        k, j = self._locate(index)
        codes, text, idx = self._arrays(k)
        off, t, h, w, toff, tlen = (int(v) for v in idx[j])
        flat = np.asarray(codes[off : off + t * h * w], dtype=np.int64)  # [t*h*w] copy
        ids = np.asarray(text[toff : toff + tlen], dtype=np.int64).tolist()  # [L]
        return torch.from_numpy(flat).reshape(t, h, w), ids
