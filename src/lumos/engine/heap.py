"""Giving freed host memory back to the operating system while a worker runs for hours.

glibc's malloc keeps the memory a process frees in its heaps and arenas (one per thread that
allocates) and returns it only when the top of a heap is free. A serving engine frees tensors of
many sizes every step (block activations, a slide's prefill of the whole window, the codes a
request carries), so freed pages stay resident and the process's RSS drifts upward although
nothing leaks. Measured on the bundled model (one session, 384 latent frames, 2 CPU threads):
RSS 413 -> 499 MiB without trimming, 370-400 MiB flat with `malloc_trim(0)` after each commit,
which cost 1.8 ms on average (15 ms at most) against a 500-800 ms frame (docs/LOG.md).

`HeapTrim` calls glibc's `malloc_trim(0)` at most once per `min_interval_s`; elsewhere (macOS,
musl, Windows) it does nothing and says so (`available`).
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (looked up once per process:
    every Engine asks)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrim:
    """Return free heap pages to the OS, at most once per `min_interval_s` seconds."""

    def __init__(
        self, min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.min_interval_s, self._clock = min_interval_s, clock
        self._fn = _malloc_trim()
        self._last: float | None = None
        self.trims = 0  # calls that reached malloc_trim

    @property
    def available(self) -> bool:
        return self._fn is not None

    def __call__(self) -> bool:
        """Trim now unless the last trim was under `min_interval_s` ago (or there is no
        malloc_trim); True when malloc_trim ran."""
        if self._fn is None:
            return False
        now = self._clock()
        if self._last is not None and now - self._last < self.min_interval_s:
            return False
        self._fn(0)
        self._last = now
        self.trims += 1
        return True
