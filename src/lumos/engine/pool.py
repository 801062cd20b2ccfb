"""The KV-cache pool of one worker: admission control by memory and LRU eviction (system.md).

The cache is a cache: the session store holds every committed token, so any session's KV rows
can be rebuilt by one prefill (method.md 7, "continuation"). The pool keeps one `KVCache` per
session (2 rows with CFG: conditional + unconditional; 1 without) and a byte budget:

- `reserve(session_id, nbytes)` admits a session about to run: it pins an entry of `nbytes`
  (the session's cache at the end of its request), evicting caches of IDLE sessions in
  least-recently-used order when room is needed. Running (pinned) entries are never evicted.
- `release(session_id)` unpins it when its request ends: the cache stays as an idle entry
  (accounted at its real size) so the next "extend by N frames" of a warm session skips the
  prefill; `get(session_id, key)` returns it only if its key (prompt, settings, frames held)
  matches the new request.
- `take` hands a running session's cache to the engine's batch storage (the entry keeps its
  reservation but holds no tensor, so the rows are never held twice), `put` gives it back.

The pool only does bookkeeping; it never runs the model.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from lumos.kvcache import KVCache

CPU_BUDGET_BYTES = 2 << 30  # default budget when the caches live in host memory
GPU_BUDGET_FRACTION = 0.5  # default budget on CUDA: this fraction of the free memory


@dataclass
class PoolStats:
    """Counters of the pool (cumulative)."""

    hits: int = 0  # warm cache reused without prefill
    misses: int = 0  # no usable cache: the engine prefilled
    evictions: int = 0  # idle caches dropped to make room
    rebuilds: int = 0  # prefills that had to rebuild given frames (I2V image, cold continuation)


@dataclass
class _Entry:
    cache: KVCache | None  # None: not built yet, or taken by the engine's batch storage
    nbytes: int  # accounted bytes: the reservation while pinned, the real size while idle
    pinned: bool  # a running session: never evicted
    tick: int  # last use (LRU order)
    key: Hashable | None = None  # what the cache holds (engine-defined)


def default_budget(device: torch.device | str | None = None) -> int:
    """A fraction of the free GPU memory on CUDA, a fixed number of bytes otherwise."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(GPU_BUDGET_FRACTION * free)
    return CPU_BUDGET_BYTES


class KVPool:
    """Per-session KV caches under a byte budget, with pinning and LRU eviction of idle ones."""

    def __init__(
        self, budget_bytes: int | None = None, device: torch.device | str | None = None
    ) -> None:
        self.budget_bytes = (
            int(budget_bytes) if budget_bytes is not None else default_budget(device)
        )
        if self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        self._entries: dict[str, _Entry] = {}
        self._tick = 0
        self.stats = PoolStats()

    # -- accounting -------------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    @property
    def bytes_pinned(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.pinned)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def is_pinned(self, session_id: str) -> bool:
        e = self._entries.get(session_id)
        return e is not None and e.pinned

    def sessions(self) -> list[str]:
        """Session ids holding an entry, least recently used first."""
        return [s for s, _ in sorted(self._entries.items(), key=lambda kv: kv[1].tick)]

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _others(self, session_id: str | None) -> tuple[int, int]:
        """(bytes of other entries, bytes of other entries that could be evicted)."""
        used = evictable = 0
        for sid, e in self._entries.items():
            if sid == session_id:
                continue
            used += e.nbytes
            if not e.pinned:
                evictable += e.nbytes
        return used, evictable

    # -- admission --------------------------------------------------------------------------------
    def can_admit(self, nbytes: int, session_id: str | None = None) -> bool:
        """Whether `nbytes` fit now or after evicting idle caches (the session's own aside)."""
        used, evictable = self._others(session_id)
        return used - evictable + nbytes <= self.budget_bytes

    def reserve(self, session_id: str, nbytes: int) -> bool:
        """Pin `session_id` with `nbytes`, evicting LRU idle caches if needed; False if no room.

        A warm entry of the same session is kept (its cache may be reused) and re-accounted.
        """
        if not self.can_admit(nbytes, session_id):
            return False
        used, _ = self._others(session_id)
        for sid in self.sessions():
            if used + nbytes <= self.budget_bytes:
                break
            e = self._entries[sid]
            if sid == session_id or e.pinned:
                continue
            used -= e.nbytes
            del self._entries[sid]
            self.stats.evictions += 1
        e = self._entries.get(session_id)
        if e is None:
            e = self._entries[session_id] = _Entry(None, 0, False, 0)
        e.nbytes, e.pinned, e.tick = int(nbytes), True, self._next_tick()
        return True

    def release(self, session_id: str) -> None:
        """Unpin: the cache becomes an idle entry at its real size (dropped if it holds none)."""
        e = self._entries.get(session_id)
        if e is None:
            return
        if e.cache is None:
            del self._entries[session_id]
            return
        e.pinned, e.nbytes, e.tick = False, e.cache.nbytes, self._next_tick()

    # -- the caches -------------------------------------------------------------------------------
    def get(self, session_id: str, key: Hashable | None = None) -> KVCache | None:
        """The session's cache if it holds one whose key equals `key` (counts a hit or a miss)."""
        e = self._entries.get(session_id)
        if e is None or e.cache is None or (key is not None and e.key != key):
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        e.tick = self._next_tick()
        return e.cache

    def put(self, session_id: str, cache: KVCache, key: Hashable | None = None) -> None:
        """Store a session's cache (a pinned entry keeps its reservation)."""
        e = self._entries.get(session_id)
        if e is None:
            e = self._entries[session_id] = _Entry(None, 0, False, 0)
        e.cache, e.key, e.tick = cache, key, self._next_tick()
        if not e.pinned:
            e.nbytes = cache.nbytes

    def take(self, session_id: str) -> KVCache | None:
        """Hand a pinned session's cache over (its rows move into the engine's batch storage)."""
        e = self._entries.get(session_id)
        if e is None:
            return None
        cache, e.cache = e.cache, None
        return cache

    def drop(self, session_id: str) -> None:
        """Forget a session's cache (e.g. its prompt changed, or the session was deleted)."""
        self._entries.pop(session_id, None)

    def snapshot(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "bytes_used": self.bytes_used,
            "bytes_pinned": self.bytes_pinned,
            "sessions": len(self._entries),
            "pinned": sum(e.pinned for e in self._entries.values()),
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "evictions": self.stats.evictions,
            "rebuilds": self.stats.rebuilds,
        }
