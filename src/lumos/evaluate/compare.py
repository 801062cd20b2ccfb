"""Paired comparison of two evaluations on the same prompts and seeds (``lumos eval --against``).

Two `lumos eval` runs on the same prompts and seeds score the same items, so their difference
is measured item by item: far tighter than comparing two means whose clip-to-clip spread is
large (a 96-clip held-out accuracy near 0.5 has a standard error of ~0.05, more than issue 14's
0.03 tolerance). For each metric the difference (new - base) is the difference of the two
reported values, and its 95 % interval comes from a bootstrap over clips (the resampling unit,
since a clip's items share its video), with a fixed seed so the same files give the same
interval.

A metric is **no worse** when the interval's lower end is at least ``-tolerance``, **worse**
when its upper end is below ``-tolerance``, and **undecided** otherwise (more seeds would say).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# (name, per-item key); all_correct is per clip
ITEM_METRICS = (
    ("class", "class_correct"),
    ("colour", "colour_present"),
    ("direction", "direction_correct"),
    ("identity", "identity_consistency"),
)
COMPARED = (*(m for m, _ in ITEM_METRICS), "all")


def _clip_key(clip: dict[str, Any]) -> tuple[str, int]:
    return clip["prompt"], int(clip["seed"])


def _clip_table(split: dict[str, Any], name: str) -> dict[tuple[str, int], dict[str, Any]]:
    clips = split.get("clips")
    if not clips:
        raise ValueError(f"{name}: no per-clip results (write them with lumos eval --json)")
    table = {_clip_key(c): c for c in clips}
    if len(table) != len(clips):
        raise ValueError(f"{name}: the same (prompt, seed) appears twice")
    return table


def _sums(clip: dict[str, Any]) -> np.ndarray:
    """[len(COMPARED), 2]: each metric's (sum, count) over one clip's items (all: per clip)."""
    out = np.zeros((len(COMPARED), 2))
    for i, (_, key) in enumerate(ITEM_METRICS):
        vals = [it[key] for it in clip["items"] if it[key] is not None]
        out[i] = (sum(vals), len(vals))
    out[-1] = (clip["all_correct"], 1)
    return out


def paired_difference(
    new: dict[str, Any],
    base: dict[str, Any],
    tolerance: float = 0.03,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per metric: new and base values, their difference, its 95 % bootstrap interval and the
    verdict against ``tolerance``. ``new`` and ``base`` are one split of ``lumos eval --json``
    (``results["splits"][name]``) on the same prompts and seeds."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    a, b = _clip_table(new, "new"), _clip_table(base, "base")
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:3]
        raise ValueError(
            f"the two runs scored different clips (e.g. {only}): compare runs on the same "
            "prompts and seeds"
        )
    keys = sorted(a)
    for k in keys:
        if [it["class"] for it in a[k]["items"]] != [it["class"] for it in b[k]["items"]]:
            raise ValueError(f"clip {k}: the two runs scored different items")
    sa = np.stack([_sums(a[k]) for k in keys])  # [C, M, 2]
    sb = np.stack([_sums(b[k]) for k in keys])  # [C, M, 2]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(keys), size=(resamples, len(keys)))  # [R, C]

    def means(s: np.ndarray) -> np.ndarray:  # [..., C, M, 2] -> [..., M]
        tot = s.sum(axis=-3)
        with np.errstate(invalid="ignore", divide="ignore"):
            return tot[..., 0] / tot[..., 1]

    va, vb = means(sa), means(sb)  # [M]
    boot = means(sa[picks]) - means(sb[picks])  # [R, M]
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(COMPARED):
        if sa[:, i, 1].sum() == 0:
            continue  # e.g. no moving items: no direction
        lo, hi = np.nanpercentile(boot[:, i], [2.5, 97.5])
        d = float(va[i] - vb[i])
        verdict = "no worse" if lo >= -tolerance else "worse" if hi < -tolerance else "undecided"
        out[name] = {
            "new": float(va[i]),
            "base": float(vb[i]),
            "diff": d,
            "low": float(lo),
            "high": float(hi),
            "verdict": verdict,
        }
    return out


def compare_results(
    new: dict[str, Any], base: dict[str, Any], tolerance: float = 0.03
) -> dict[str, dict[str, dict[str, Any]]]:
    """`paired_difference` for every split both ``lumos eval --json`` results hold."""
    splits = [s for s in new.get("splits", {}) if s in base.get("splits", {})]
    if not splits:
        raise ValueError("the two results share no split (seen, heldout)")
    return {s: paired_difference(new["splits"][s], base["splits"][s], tolerance) for s in splits}
