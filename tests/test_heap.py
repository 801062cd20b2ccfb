"""Freed host memory goes back to the OS: the trimmer's throttle, its effect, the engine's use."""

from __future__ import annotations

import sys

import pytest
import torch

from lumos.config import SamplerConfig
from lumos.engine import Engine, EngineRequest
from lumos.engine.heap import HeapTrim

glibc = pytest.mark.skipif(
    not HeapTrim().available, reason="malloc_trim is glibc's (Linux); elsewhere a no-op"
)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_trims_at_most_once_per_interval():
    clock = _Clock()
    trim = HeapTrim(2.0, clock)
    if not trim.available:
        assert trim() is False and trim.trims == 0
        return
    assert trim() is True
    clock.t += 1.9
    assert trim() is False
    clock.t += 0.2
    assert trim() is True
    assert trim.trims == 2
    with pytest.raises(ValueError, match="min_interval_s"):
        HeapTrim(-1)


@glibc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_freed_heap_memory_leaves_the_process():
    # 3,000 chunks of 48 KiB (under malloc's mmap threshold: they live in the heap), all freed
    # but the last, which pins the heap's top so that only a trim can return the pages
    chunks = [b"x" * (48 << 10) for _ in range(3000)]
    pin = chunks[-1]
    del chunks
    before = _rss()
    assert HeapTrim(0.0)() is True
    freed = before - _rss()
    assert freed > 70 << 20, f"only {freed >> 20} MiB of ~140 MiB went back to the OS"
    assert len(pin) == 48 << 10


def test_the_engine_trims_after_its_commits(tiny_model, layout):
    eng = Engine(tiny_model, layout)
    eng.heap_trim = HeapTrim(0.0)
    sc = SamplerConfig(steps=2, cfg=2.0, window=2)
    gen = torch.Generator().manual_seed(0)
    eng.add(EngineRequest("a", [5, 6], None, 5, sc, generator=gen))
    events = eng.run_until_idle()
    assert [e.index for e in events] == list(range(5))
    assert eng.stats()["heap_trims"] == (5 if eng.heap_trim.available else 0)
