"""Device facts: which inference dtype is fast where (bfloat16 on CUDA and on AMX CPUs).

Importing this module does not import torch (the API process names the dtype choices only).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16")  # what --dtype and ServeConfig.dtype accept
_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}


@cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: AVX512-BF16 dot products
    (e.g. AMD Zen 4, Intel Cooper Lake; 3.5-4x float32 matmul throughput measured on an EPYC)
    or AMX-BF16 tiles (Intel Sapphire Rapids on: 2-6x). Elsewhere bfloat16 is emulated and
    slower than float32."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: ask the kernel
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """The inference dtype: a torch dtype, "float32"/"bfloat16" (or fp32/bf16), or None/"auto":
    bfloat16 on CUDA and on CPUs with AMX-BF16 (`cpu_has_fast_bf16`), else float32."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        fast = str(device).startswith("cuda") or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    name = _ALIASES.get(dtype, dtype)
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32 or bfloat16")
    return getattr(torch, name)
