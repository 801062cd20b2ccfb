"""Rendering Moving Fashion-MNIST clips: items, trajectories, :func:`make_clip`, the dataset."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lumos.data.captions import build_caption
from lumos.data.fmnist import _class_indices, load_fashion_mnist
from lumos.data.vocab import (
    _CLASS_IDX,
    _SPLIT_IDS,
    CLASSES,
    COLOURS,
    DIRECTION_VECTORS,
    DIRECTIONS,
    HELD_OUT,
    SPEEDS,
    SPLITS,
    ItemSpec,
    Triple,
    _check_triple,
)


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
    # leading frames that are history (a late window): training supervises the rest
    context: int = 0


@dataclass
class MovingFashionConfig:
    """Settings of the Moving Fashion-MNIST generator.

    ``size``: canvas side (pixels); ``frames``: clip length ``T``; ``min_items..max_items``
    objects per clip; ``item_size``: side of each (resized) 28x28 FMNIST image; ``speeds``:
    adverb -> pixels per frame; ``held_out``: triples excluded from ``"train"``; ``seed``:
    default dataset seed; ``caption_speed``: put the speed adverb in captions;
    ``distinct_colours``: sampled items of one clip get different colours; ``fmnist_root``:
    folder of the FMNIST files (default: see :func:`load_fashion_mnist`).
    ``late``: the fraction of video clips that are windows from late in a long video (what a
    rolling context window shows the model after many frames): every item starts anywhere on
    the canvas, moving along its captioned axis in either sign (the bouncing motion's
    stationary distribution), and the caption still names the video's first direction; such a
    clip's first ``late_context`` frames are history (:attr:`Clip.context`), the frames a
    training step supervises come after them.
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
    late: float = 0.0
    late_context: int = 8

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
        if not 0.0 <= self.late <= 1.0:
            raise ValueError(f"late must be a fraction in [0, 1], got {self.late}")
        if self.late and not 1 <= self.late_context < self.frames:
            raise ValueError(
                f"late_context must be in [1, frames - 1] = [1, {self.frames - 1}], "
                f"got {self.late_context}"
            )

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


def _item_image(split: str, index: int, cfg: MovingFashionConfig) -> np.ndarray:
    """FMNIST image ``index`` of ``split`` as ``uint8 [item_size, item_size]``."""
    images, _ = load_fashion_mnist(split, cfg.fmnist_root)
    img = images[index]  # [28, 28]
    if cfg.item_size != img.shape[0]:
        pil = Image.fromarray(np.asarray(img), mode="L")
        img = np.asarray(pil.resize((cfg.item_size, cfg.item_size), Image.Resampling.BICUBIC))
    return img


def _trajectory(
    rng: np.random.Generator,
    cfg: MovingFashionConfig,
    direction: str | None,
    speed_px: int,
    t: int,
    late: bool = False,
) -> np.ndarray:
    """Top-left positions ``int64 [T, 2]`` (y, x), bouncing off the canvas borders.

    The start is drawn so that the item keeps its initial direction for at least half the
    clip (or crosses the whole free range) before its first bounce. ``late``: a window from
    late in a long video instead: the start is anywhere and the sign along the captioned axis
    is a coin flip.
    """
    room = cfg.size - cfg.item_size  # positions live in [0, room]
    pos = rng.integers(0, room + 1, size=2)  # [2] (y, x)
    if direction is None:
        return np.tile(pos, (t, 1)).astype(np.int64)  # [T, 2]
    dy, dx = DIRECTION_VECTORS[direction]
    axis = 0 if dy else 1
    sign = dy or dx
    if late:
        sign = sign if rng.random() < 0.5 else -sign
    else:
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

    late = not images and cfg.late > 0 and rng.random() < cfg.late  # no draw when late == 0
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
        pos = _trajectory(rng, cfg, s.direction, speed_px, t, late)  # [T, 2] (y, x)
        k = cfg.item_size
        for f, (y, x) in enumerate(pos):
            region = video[f, y : y + k, x : x + k]  # [S, S, 3] view
            np.maximum(region, patch, out=region)
        items.append(
            Item(s.cls, s.colour, s.direction, s.speed, pos, index, cfg.item_size, speed_px)
        )
    caption = build_caption([it.spec for it in items], with_speed=cfg.caption_speed)
    context = cfg.late_context if late else 0
    return Clip(video=video, caption=caption, items=items, split=split, context=context)


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
