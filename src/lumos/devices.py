"""Device facts: which inference dtype is fast where (bfloat16 on CUDA; on CPUs, measured).

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


def resolve_dtype(
    dtype: torch.dtype | str | None, device: str, shape: tuple[int, int, int] | None = None
) -> torch.dtype:
    """The inference dtype: a torch dtype, "float32"/"bfloat16" (or fp32/bf16), or None/"auto":
    bfloat16 on CUDA; on a CPU, float32 unless it multiplies bf16 in hardware
    (`cpu_has_fast_bf16`) and, when the model's matmul `shape` (rows, dim, out) is given, bf16
    is measured faster at that shape (`bf16_is_faster`: small matrices may not gain)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if str(device).startswith("cuda"):
            return torch.bfloat16
        if not cpu_has_fast_bf16():
            return torch.float32
        return torch.bfloat16 if shape is None or bf16_is_faster(*shape) else torch.float32
    name = _ALIASES.get(dtype, dtype)
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32 or bfloat16")
    return getattr(torch, name)


@cache
def bf16_is_faster(rows: int, dim: int, out: int, repeats: int = 5) -> bool:
    """Whether a [rows, dim] x [dim, out] CPU matmul (the model's per-step product) runs faster
    in bfloat16 than in float32 on this machine: a one-off micro-benchmark (best of `repeats`,
    a few ms), cached for the process."""
    import time

    import torch

    best = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, dim, dtype=dt), torch.randn(dim, out, dtype=dt)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best[dt] = min(times)
    return best[torch.bfloat16] < best[torch.float32]
