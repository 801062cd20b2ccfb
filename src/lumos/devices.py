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
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX-BF16): there
    bfloat16 inference is 2-6x faster than float32; elsewhere it is emulated and slower."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch: ask the kernel
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "amx_bf16" in flags


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
