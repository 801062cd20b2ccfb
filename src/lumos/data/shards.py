"""Token shards: pre-tokenised clips as flat memory-mappable ``.npy`` files, and their reader."""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lumos.data.render import Clip

SHARD_FORMAT = "lumos-shards"
SHARD_VERSION = 2
MANIFEST = "manifest.json"
# index columns: code offset, t, h, w, text offset, text length, context (version 1: no context)
_INDEX_COLS = 7


def _clip_parts(clip: Any) -> tuple[Any, str, int]:
    """(video, caption, context frames) of a Clip, a dict or a (video, caption[, context])."""
    if isinstance(clip, Clip):
        return clip.video, clip.caption, clip.context
    if isinstance(clip, dict):
        return clip["video"], clip["caption"], int(clip.get("context", 0))
    video, caption, *rest = clip
    return video, caption, int(rest[0]) if rest else 0


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

    ``clips``: :class:`Clip` s, ``(video, caption[, context])`` tuples or ``{"video",
    "caption"[, "context"]}`` dicts; ``context``: the clip's leading history frames (0: none),
    stored in latent frames (``context * t // T``: those made of history frames alone).
    ``encode_video(uint8 [T, H, W, 3]) -> int codes [t, h, w]`` (LongTensor or array; a 2-D
    ``[h, w]`` result is taken as ``t == 1``); ``encode_text(str) -> list[int]``.
    Per shard ``k`` in ``out_dir``: ``shard_{k:05d}.codes.npy`` (all codes flat; ``uint16``
    when ``codebook_size <= 65536``, else ``int32``), ``.text.npy`` (text ids flat, ``int32``),
    ``.index.npy`` (``int64 [n, 7]``: code offset, t, h, w, text offset, text length, context) and
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
    buf_context: list[int] = []

    def flush() -> None:
        nonlocal buf_codes, buf_text, buf_shape, buf_caps, buf_context
        if not buf_shape:
            return
        k = len(shards)
        stem = f"shard_{k:05d}"
        codes = np.concatenate(buf_codes)  # [sum t*h*w] int64
        text = np.concatenate(buf_text) if buf_text else np.zeros(0, np.int64)  # [sum L]
        hi = codebook_size if codebook_size is not None else int(codes.max(initial=0)) + 1
        dtype = np.uint16 if hi <= 2**16 else np.int32
        n = len(buf_shape)
        index = np.zeros((n, _INDEX_COLS), np.int64)  # [n, 7]
        code_lens = np.array([c.size for c in buf_codes], np.int64)  # [n]
        text_lens = np.array([x.size for x in buf_text], np.int64)  # [n]
        index[:, 0] = np.cumsum(code_lens) - code_lens
        index[:, 1:4] = np.array(buf_shape, np.int64)
        index[:, 4] = np.cumsum(text_lens) - text_lens
        index[:, 5] = text_lens
        index[:, 6] = buf_context
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
        buf_codes, buf_text, buf_shape, buf_caps, buf_context = [], [], [], [], []

    for clip in clips:
        video, caption, context = _clip_parts(clip)
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
        n_rgb = int(np.shape(video)[0])
        if not 0 <= context < max(n_rgb, 1):
            raise ValueError(f"context {context} must be in [0, T) for a clip of T = {n_rgb}")
        context = context * codes.shape[0] // n_rgb  # latent frames made of history alone
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
        buf_context.append(context)
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

    def context(self, index: int) -> int:
        """Leading history frames of sample ``index`` (0 for a fresh clip or a version-1 shard)."""
        k, j = self._locate(index)
        row = self._arrays(k)[2][j]
        return int(row[6]) if len(row) > 6 else 0

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
        off, t, h, w, toff, tlen = (int(v) for v in idx[j][:6])
        flat = np.asarray(codes[off : off + t * h * w], dtype=np.int64)  # [t*h*w] copy
        ids = np.asarray(text[toff : toff + tlen], dtype=np.int64).tolist()  # [L]
        return torch.from_numpy(flat).reshape(t, h, w), ids
