"""Finite Scalar Quantization (FSQ; Mentzer et al., 2023).

Each of the ``d = len(levels)`` latent channels is squashed by a bounded ``tanh`` to an interval
holding exactly ``L_i`` integers and rounded to the nearest one, with a straight-through gradient.
The implicit codebook is the product grid, ``prod(levels)`` codes: (8, 8, 8, 5, 5, 5) gives the
64,000 codes of Cosmos DV tokenizers.

Integer digits ``q_i`` lie in ``[0, L_i)``. The flat index is a mixed-radix number whose FIRST
channel is the least significant digit::

    index = sum_i q_i * basis_i,   basis = cumprod([1] + levels[:-1])

Normalised codes (what the decoder sees) are ``(q_i - L_i // 2) / (L_i // 2)``: the integers
``-L//2 .. L//2`` for odd L, ``-L/2 .. L/2 - 1`` for even L (the half-offset), scaled by ``L // 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FSQ", "round_ste"]


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer with a straight-through (identity) gradient."""
    return z + (z.round() - z).detach()


class FSQ(nn.Module):
    """Finite scalar quantizer over the LAST dimension of its input (``len(levels)`` channels)."""

    def __init__(self, levels: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        levels = tuple(int(level) for level in levels)
        if not levels:
            raise ValueError("FSQ needs at least one level")
        if any(level < 2 for level in levels):
            raise ValueError(f"every FSQ level must be >= 2, got {levels}")
        self.levels = levels
        self.eps = eps
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        lv = torch.tensor(levels, dtype=torch.long)  # [d]
        basis = torch.cumprod(torch.tensor((1,) + levels[:-1], dtype=torch.long), 0)  # [d]
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)  # [d]

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z [..., d]`` so that rounding gives exactly ``L_i`` integer values per channel
        (``-L//2 .. L//2`` for odd L, ``-L/2 .. L/2 - 1`` for even L)."""
        lv = self._levels.to(z.dtype)  # [d]
        half_l = (lv - 1) * (1 + self.eps) / 2  # [d]
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)  # [d]
        shift = torch.atanh(offset / half_l)  # [d]: centres the even-level interval
        return torch.tanh(z + shift) * half_l - offset  # [..., d]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., d]`` -> normalised codes ``[..., d]`` (straight-through gradient)."""
        self._check_last_dim(z)
        q = round_ste(self.bound(z))  # [..., d] integers, centred
        return q / self._half_width.to(z.dtype)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codes ``[..., d]`` -> flat int64 indices ``[...]``."""
        self._check_last_dim(codes)
        hw = self._half_width.to(codes.dtype)
        digits = (codes * hw + hw).round().long()  # [..., d] in [0, L_i)
        return (digits * self._basis).sum(dim=-1)  # [...]

    def indices_to_digits(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat indices ``[...]`` -> integer digits ``[..., d]`` with digit i in [0, L_i)."""
        idx = indices.long().unsqueeze(-1)  # [..., 1]
        return torch.div(idx, self._basis, rounding_mode="floor") % self._levels  # [..., d]

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat indices ``[...]`` -> normalised float32 codes ``[..., d]``."""
        digits = self.indices_to_digits(indices).float()  # [..., d]
        return (digits - self._half_width) / self._half_width

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z [..., d]`` -> (normalised codes ``[..., d]``, indices ``[...]``)."""
        codes = self.quantize(z)
        return codes, self.codes_to_indices(codes.detach())

    def _check_last_dim(self, z: torch.Tensor) -> None:
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"FSQ with levels {self.levels} expects last dim {self.dim}, got {tuple(z.shape)}"
            )
