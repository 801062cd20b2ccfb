"""The Moving Fashion-MNIST vocabulary: classes, colours, directions, speeds, held-out triples.

Also :class:`ItemSpec` (what one item of a clip is) and the check that a triple is known.
"""

from __future__ import annotations

from typing import NamedTuple

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


class ItemSpec(NamedTuple):
    """What an item is: class, colour, direction (``None`` for images), speed name or None."""

    cls: str
    colour: str
    direction: str | None = None
    speed: str | None = None

    @property
    def triple(self) -> tuple[str, str, str | None]:
        return (self.cls, self.colour, self.direction)


def _check_triple(cls: str, colour: str, direction: str | None) -> None:
    if cls not in _CLASS_IDX:
        raise ValueError(f"unknown class {cls!r}; known: {list(CLASSES)}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {list(COLOURS)}")
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {list(DIRECTIONS)}")
