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


BF16_MARGIN = 0.8  # bf16 must take at most this fraction of float32's time to be chosen


@cache
def bf16_is_faster(rows: int, dim: int, out: int, rounds: int = 15, calls: int = 8) -> bool:
    """Whether a [rows, dim] x [dim, out] CPU matmul (the model's per-step product) runs clearly
    faster in bfloat16 than in float32 on this machine: a one-off micro-benchmark (~10-30 ms),
    cached for the process.

    Robust to a busy host (a worker starting beside other processes): the two dtypes are timed
    in alternating rounds of `calls` products after a warm-up of each, the best round of each
    counts, and bf16 must win by a margin (`BF16_MARGIN`); a tie keeps float32, the exact one.
    """
    import time

    import torch

    ops = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, dim, dtype=dt), torch.randn(dim, out, dtype=dt)
        for _ in range(3):  # warm-up: kernel selection and packing happen on the first calls
            a @ b
        ops[dt] = (a, b)
    best = dict.fromkeys(ops, float("inf"))
    for _ in range(rounds):
        for dt, (a, b) in ops.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                a @ b
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.bfloat16] < BF16_MARGIN * best[torch.float32]


COMPILE_CHOICES = ("auto", "on", "off")  # what --compile and ServeConfig.compile accept


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on PATH (inductor builds its CPU kernels with one)."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def resolve_compile(choice: str, device: str, dtype: torch.dtype) -> bool:
    """Whether to compile the frame steps (`lumos.model.CompiledLayers`): "on", "off", or
    "auto": on only where it was measured to pay, a CPU with AMX tiles running bfloat16 (2-core
    Sapphire Rapids: a frame 1.5x faster), off elsewhere (CUDA and other CPUs: not measured).
    "on" needs a C++ compiler (inductor builds CPU kernels with it): a clear error otherwise."""
    import torch

    if choice not in COMPILE_CHOICES:
        raise ValueError(f"unknown compile choice {choice!r}; choose auto, on or off")
    if choice == "off":
        return False
    has_cxx = has_cxx_compiler()
    if choice == "on":
        if str(device).startswith("cpu") and not has_cxx:
            raise ValueError("compile on needs a C++ compiler (g++ or clang++) on this machine")
        return True
    if str(device).startswith("cuda") or dtype != torch.bfloat16 or not has_cxx:
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False
