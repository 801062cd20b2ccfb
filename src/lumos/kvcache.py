"""An explicit KV cache: per-layer key/value buffers for a batch of rows of different lengths.

Rows are independent sequences (a video's conditional and unconditional streams, or several
sessions batched together). Every forward writes its new keys/values at each row's current
length; `advance` commits them, otherwise the next forward overwrites the same slots (this is how
the diffusion steps of one frame run against a fixed history without copying it). The serving
engine holds many of these, so it can report its size, be truncated, and rows can be split off,
stacked or overwritten (a rolling window's rebuilt rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lumos.masks import cache_key_mask


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
        else:
            rows = torch.arange(self.batch, device=k_new.device).unsqueeze(1)  # [B, 1]
            cols = self.lengths_tensor().unsqueeze(1) + torch.arange(n, device=k_new.device)
            self.k[layer][rows, :, cols] = k_new.transpose(1, 2)  # [B, L, H, d]
            self.v[layer][rows, :, cols] = v_new.transpose(1, 2)
        return self.k[layer, :, :, :total], self.v[layer, :, :, :total]

    def key_mask(self, n_new: int) -> Tensor | None:
        """[B, 1, 1, T] keys visible to a block of n_new tokens, or None when lengths are equal."""
        if all(x == self.lengths[0] for x in self.lengths):
            return None
        return cache_key_mask(self.lengths_tensor(), n_new, max(self.lengths) + n_new)

    # -- the sampler's / engine's side ----------------------------------------------------------
    def advance(self, n: int | list[int]) -> None:
        """Commit the last written tokens (n per row, or one n for all rows)."""
        ns = [n] * self.batch if isinstance(n, int) else list(n)
        self.lengths = [a + b for a, b in zip(self.lengths, ns, strict=True)]
        self._ensure(max(self.lengths))

    def truncate(self, lengths: int | list[int]) -> None:
        """Forget everything past `lengths` (per row or one for all)."""
        ls = [lengths] * self.batch if isinstance(lengths, int) else list(lengths)
        if any(a > b for a, b in zip(ls, self.lengths, strict=True)):
            raise ValueError(f"cannot truncate to {ls}: longer than {self.lengths}")
        self.lengths = ls

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
