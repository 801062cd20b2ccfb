"""The fixed evaluation prompts of ``lumos eval``: :func:`eval_prompts` (seen and held-out)."""

from __future__ import annotations

from lumos.data.captions import build_caption
from lumos.data.vocab import (
    _CLASS_IDX,
    _COLOUR_IDX,
    _DIR_IDX,
    CLASSES,
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    ItemSpec,
    Triple,
)


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
