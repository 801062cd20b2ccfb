"""Helpers shared by the cluster tests: async collection and waiting, the frame-integrity check."""

from __future__ import annotations

import asyncio
import time

from lumos.cluster import LumosClient


async def collect(aiter, on_frame=None) -> list[dict]:
    """Every item of an async iterator (on_frame(frame, so_far) after each)."""
    out = []
    async for frame in aiter:
        out.append(frame)
        if on_frame is not None:
            await on_frame(frame, out)
    return out


async def wait_for(predicate, timeout_s: float = 30.0, every_s: float = 0.05):
    """Await predicate() until it is truthy (its value) or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(every_s)


async def assert_complete(client: LumosClient, sid: str, n: int, frames: list[dict]) -> None:
    """seq 0..n-1 exactly once, in order, in the stream and in the store, with equal pixels."""
    state = await client.state(sid)
    assert [f["seq"] for f in frames] == list(range(n)), ([f["seq"] for f in frames], state)
    stored = await client.frames(sid)
    assert [r.seq for r in stored] == list(range(n)), [r.seq for r in stored]
    assert [r.pixels for r in stored] == [f["pixels"] for f in frames]
    assert all(r.pixels[:8] == b"\x89PNG\r\n\x1a\n" for r in stored)
    assert state["status"] == "done" and state["n_frames"] == n, state
