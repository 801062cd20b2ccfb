"""Rotary position embeddings: MM-RoPE, 1-D RoPE and naive 3-D RoPE (method.md section 3).

One code path: every scheme is "frequency j rotates with axis a(j)" where the axis allocation is
data. Rotate-half convention on head dim d: F = d/2 frequencies w_j = theta^(-2j/d), channel j and
j + F share frequency j.

- "mm":  a(j) by j mod 16: {0,1,2,3} -> t, {4,5,8,9,12,13} -> h, {6,7,10,11,14,15} -> w
         (4:6:6 interleaved, each axis spans the whole spectrum).
- "3d":  contiguous bands (Qwen2-VL M-RoPE style): the first F/4 frequencies -> t,
         the next 3F/8 -> h, the last 3F/8 -> w.
- "1d":  every frequency uses axis 0 (the caller passes the absolute index on all three axes).

Text and special tokens carry the same position on all three axes, so they get plain 1-D RoPE
under every scheme.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MM_GROUP = (0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 2, 2)  # axis of j mod 16


def axis_allocation(kind: str, head_dim: int) -> Tensor:
    """[F] long: the axis (0=t, 1=h, 2=w) each of the F = head_dim/2 frequencies rotates with."""
    f = head_dim // 2
    if kind == "1d":
        return torch.zeros(f, dtype=torch.long)
    if head_dim % 32:
        raise ValueError(f"{kind!r} RoPE needs head_dim a multiple of 32, got {head_dim}")
    if kind == "mm":
        return torch.tensor(_MM_GROUP, dtype=torch.long).repeat(f // 16)
    if kind == "3d":
        nt, nh = f // 4, 3 * f // 8
        return torch.cat(
            [
                torch.zeros(nt, dtype=torch.long),
                torch.ones(nh, dtype=torch.long),
                torch.full((f - nt - nh,), 2, dtype=torch.long),
            ]
        )
    raise ValueError(f"unknown RoPE kind {kind!r}")


def inv_freq(head_dim: int, theta: float) -> Tensor:
    """[F] float64: w_j = theta^(-2j/d)."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


class Rotary(torch.nn.Module):
    """Turns positions [B, 3, L] into (cos, sin) [B, L, d] for one allocation (sin in the form
    `apply_rotary` takes: its first half negated)."""

    def __init__(self, kind: str, head_dim: int, theta: float) -> None:
        super().__init__()
        self.kind, self.head_dim, self.theta = kind, head_dim, theta
        self.register_buffer("axis", axis_allocation(kind, head_dim), persistent=False)
        self._freq: Tensor | None = None  # float32, kept out of module dtype casts

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # positions: [B, 3, L] long -> per-frequency positions [B, L, F]
        if self._freq is None or self._freq.device != positions.device:
            self._freq = inv_freq(self.head_dim, self.theta).float().to(positions.device)
        axis = self.axis.to(positions.device)
        p = positions.index_select(1, axis).transpose(1, 2).float()  # [B, L, F]
        ang = p * self._freq  # [B, L, F]
        c, s = ang.cos(), ang.sin()
        # channels j and j + F share frequency j; sin's first half negated (see apply_rotary)
        return torch.cat([c, c], dim=-1), torch.cat([-s, s], dim=-1)  # [B, L, d] each


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, L, d]; (cos, sin) [B, L, d] from `Rotary` (float32); computed in float32,
    returned in x's dtype.

    The rotate-half rotation x cos + rotate_half(x) sin with rotate_half(x) = [-x2, x1]: `Rotary`
    gives sin with its first half negated, so this is x cos + roll(x, d/2) sin (the same products:
    a sign flip is exact) in fewer kernels."""
    xf = x.float()
    return (xf * cos.unsqueeze(1) + xf.roll(sin.shape[-1] // 2, -1) * sin.unsqueeze(1)).to(x.dtype)
