"""An explicit KV cache: per-layer key/value buffers for a batch of rows of different lengths.

Rows are independent sequences (a video's conditional and unconditional streams, or several
sessions batched together). Every forward writes its new keys/values at each row's current
length; `advance` commits them, otherwise the next forward overwrites the same slots (this is how
the diffusion steps of one frame run against a fixed history without copying it). The serving
engine holds many of these, so it can report its size, and rows can be split off, stacked,
overwritten (a rolling window's rebuilt rows) or run alone (`rows`: a step that needs only the
conditional rows of CFG pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lumos.masks import cache_key_mask

_ROW_COPIES = 4  # up to this many rows of different lengths are written row by row


def _key_mask(lengths: list[int], n_new: int, device) -> Tensor | None:
    """[B, 1, 1, T] keys visible to a block of n_new tokens after rows of `lengths`, or None
    when the lengths are equal (then every key is visible)."""
    if all(x == lengths[0] for x in lengths):
        return None
    t = torch.tensor(lengths, dtype=torch.long, device=device)
    return cache_key_mask(t, n_new, max(lengths) + n_new)


class KVCache:
    """Keys/values [n_layers, B, H_kv, capacity, d] with per-row filled lengths [B]."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int = 1024,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max(capacity, 1), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * batch

    @classmethod
    def for_model(cls, cfg, batch: int, capacity: int, dtype=None, device=None) -> KVCache:
        """A cache shaped for a ModelConfig."""
        return cls(
            cfg.n_layers,
            batch,
            cfg.n_kv_heads,
            cfg.head_dim,
            capacity,
            dtype or torch.float32,
            device or "cpu",
        )

    # -- shape ----------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes allocated."""
        return self.k.numel() * self.k.element_size() * 2

    @property
    def bytes_used(self) -> int:
        """Bytes holding committed tokens."""
        per_token = self.k.shape[0] * self.k.shape[2] * self.k.shape[4] * self.k.element_size() * 2
        return per_token * sum(self.lengths)

    def lengths_tensor(self) -> Tensor:
        return torch.tensor(self.lengths, dtype=torch.long, device=self.k.device)

    def _ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], cap, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    # -- the model's side -----------------------------------------------------------------------
    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v_new [B, H, L, d] at each row's length; return keys/values [B, H, T, d]."""
        n = k_new.shape[2]
        total = max(self.lengths) + n
        self._ensure(total)
        lo = self.lengths[0]
        if all(x == lo for x in self.lengths):
            self.k[layer, :, :, lo : lo + n] = k_new
            self.v[layer, :, :, lo : lo + n] = v_new
        elif self.batch <= _ROW_COPIES:  # a few rows: slice copies beat one scattered write
            for r, a in enumerate(self.lengths):
                self.k[layer, r, :, a : a + n] = k_new[r]
                self.v[layer, r, :, a : a + n] = v_new[r]
        else:
            rows, cols = self._write_index(n, k_new.device)
            self.k[layer][rows, :, cols] = k_new.transpose(1, 2)  # [B, L, H, d]
            self.v[layer][rows, :, cols] = v_new.transpose(1, 2)
        return self.k[layer, :, :, :total], self.v[layer, :, :, :total]

    def _write_index(self, n: int, device) -> tuple[Tensor, Tensor]:
        """(rows [B, 1], cols [B, n]): where a forward of n tokens per row writes; built once
        for all layers of a forward (the lengths do not change until `advance`)."""
        key = (tuple(self.lengths), n, str(device))
        if getattr(self, "_index_key", None) != key:
            rows = torch.arange(self.batch, device=device).unsqueeze(1)
            cols = self.lengths_tensor().to(device).unsqueeze(1) + torch.arange(n, device=device)
            self._index, self._index_key = (rows, cols), key
        return self._index

    def key_mask(self, n_new: int) -> Tensor | None:
        """[B, 1, 1, T] keys visible to a block of n_new tokens, or None when lengths are equal."""
        return _key_mask(self.lengths, n_new, self.k.device)

    # -- the sampler's / engine's side ----------------------------------------------------------
    def advance(self, n: int | list[int]) -> None:
        """Commit the last written tokens (n per row, or one n for all rows)."""
        ns = [n] * self.batch if isinstance(n, int) else list(n)
        self.lengths = [a + b for a, b in zip(self.lengths, ns, strict=True)]
        self._ensure(max(self.lengths))

    def assign(self, first_row: int, other: KVCache) -> None:
        """Overwrite rows [first_row, first_row + other.batch) with `other`'s rows and lengths
        (a rebuilt window replacing a video's rows in a shared cache)."""
        n, m = other.batch, max(other.lengths + [1])
        if first_row < 0 or first_row + n > self.batch:
            raise ValueError(f"rows [{first_row}, {first_row + n}) outside a cache of {self.batch}")
        self._ensure(m)
        self.k[:, first_row : first_row + n, :, :m] = other.k[:, :, :, :m]
        self.v[:, first_row : first_row + n, :, :m] = other.v[:, :, :, :m]
        self.lengths[first_row : first_row + n] = other.lengths

    def rows(self, rows: list[int]) -> KVCache | RowGather:
        """A write-through cache over some of this cache's rows (ascending): this cache itself
        for all of them, a view when they are evenly spaced (a slice, or every other row: the
        conditional rows of CFG pairs), else a gather that writes back by index."""
        if not rows or any(b <= a for a, b in zip(rows, rows[1:])):
            raise ValueError(f"rows must be ascending and distinct, got {rows}")
        if len(rows) == self.batch:
            return self
        step = rows[1] - rows[0] if len(rows) > 1 else 1
        if rows == list(range(rows[0], rows[-1] + 1, step)):
            sl = slice(rows[0], rows[-1] + 1, step)
            return KVCache.view(self.k[:, sl], self.v[:, sl], [self.lengths[r] for r in rows])
        return RowGather(self, rows)

    @staticmethod
    def view(k: Tensor, v: Tensor, lengths: list[int]) -> KVCache:
        """A KVCache over existing tensors [n_layers, B, H_kv, C, d] (writes go through)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v, out.lengths = k, v, list(lengths)
        return out

    def select(self, rows: list[int]) -> KVCache:
        """A new cache holding copies of the given rows (trimmed to their longest length)."""
        out = KVCache.__new__(KVCache)
        n = max([self.lengths[r] for r in rows] + [1])
        idx = torch.tensor(rows, device=self.k.device)
        out.k = self.k[:, idx, :, :n].clone()
        out.v = self.v[:, idx, :, :n].clone()
        out.lengths = [self.lengths[r] for r in rows]
        return out

    @staticmethod
    def stack(caches: list[KVCache], extra: int = 0) -> KVCache:
        """Concatenate the rows of several caches into one batch (with room for `extra` tokens)."""
        out = KVCache.__new__(KVCache)
        lengths = [x for c in caches for x in c.lengths]
        n = max(lengths + [1]) + extra
        ref = caches[0].k
        shape = (ref.shape[0], len(lengths), ref.shape[2], n, ref.shape[4])
        out.k, out.v = ref.new_zeros(shape), ref.new_zeros(shape)
        r = 0
        for c in caches:
            m = min(c.capacity, n)
            out.k[:, r : r + c.batch, :, :m] = c.k[:, :, :, :m]
            out.v[:, r : r + c.batch, :, :m] = c.v[:, :, :, :m]
            r += c.batch
        out.lengths = lengths
        return out


class RowGather:
    """Rows of a KVCache that no view covers, as a cache the model can write through: each
    forward gathers their keys/values and writes the new ones back by index."""

    def __init__(self, base: KVCache, rows: list[int]) -> None:
        self.base = base
        self.idx = torch.tensor(rows, device=base.k.device)  # [r]
        self.lengths = [base.lengths[r] for r in rows]
        self._cols: Tensor | None = None

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def key_mask(self, n_new: int) -> Tensor | None:
        return _key_mask(self.lengths, n_new, self.base.k.device)

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v_new [r, H, L, d] at each row's length; return keys/values [r, H, T, d]."""
        n = k_new.shape[2]
        total = max(self.lengths) + n
        if total > self.base.capacity:
            raise RuntimeError("KV storage too small for this forward")
        if self._cols is None or self._cols.shape[1] != n:  # once per forward, not per layer
            dev = k_new.device
            lengths = torch.tensor(self.lengths, device=dev).unsqueeze(1)  # [r, 1]
            self._cols = lengths + torch.arange(n, device=dev)  # [r, n]
        rows, cols = self.idx.unsqueeze(1), self._cols  # [r, 1], [r, n]
        self.base.k[layer][rows, :, cols] = k_new.transpose(1, 2)  # [r, L, H, d]
        self.base.v[layer][rows, :, cols] = v_new.transpose(1, 2)
        return self.base.k[layer, self.idx, :, :total], self.base.v[layer, self.idx, :, :total]
