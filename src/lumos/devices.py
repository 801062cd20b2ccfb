"""Device facts: which inference dtype is fast where (bfloat16 on CUDA and on AMX CPUs)."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX-BF16): there
    bfloat16 inference is 2-6x faster than float32; elsewhere it is emulated and slower."""
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
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        fast = str(device).startswith("cuda") or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32 or bfloat16")
    return DTYPES[dtype]
