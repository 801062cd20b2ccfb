"""Captions of Moving Fashion-MNIST clips: :func:`build_caption` and its inverse.

The grammar is in the package docstring (:mod:`lumos.data`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from lumos.data.vocab import (
    CLASSES,
    COLOURS,
    DIRECTION_VERBS,
    SPEEDS,
    ItemSpec,
    _article,
    _check_triple,
)


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
