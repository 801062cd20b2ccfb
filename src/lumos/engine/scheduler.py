"""Continuous-batching scheduler of the serving engine (system.md, "engine"): plain bookkeeping.

Sessions wait in a FIFO queue and run in a set of at most `max_sessions`. Every engine step is
one diffusion step of every running session, batched into one forward; sessions join and leave
only BETWEEN steps (as vLLM does for text): a new session joins at the next step boundary and
starts at step 0 of its own frame while the others are mid-frame; a session whose request is
done leaves (`finish`), one that is cancelled leaves at once (`cancel`).

Admission goes through the KV pool: the head of the queue is admitted only if the pool can
reserve its bytes (evicting idle caches if needed). The queue is strictly FIFO: a blocked head
blocks the sessions behind it, so a large request is never starved by smaller ones.

No tensors here: the pool is anything with `reserve(session_id, nbytes) -> bool` and
`release(session_id)`, and `budget_bytes` (so tests can use a fake).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class Admission(Protocol):
    budget_bytes: int

    def reserve(self, session_id: str, nbytes: int) -> bool: ...

    def release(self, session_id: str) -> None: ...


class Scheduler:
    """FIFO waiting queue + running set (continuous batching, admission through a pool)."""

    def __init__(self, max_sessions: int = 8, pool: Admission | None = None) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self.pool = pool
        self.waiting: OrderedDict[str, int] = OrderedDict()  # session id -> bytes to reserve
        self.running: list[str] = []  # in order of admission
        self.admitted: list[str] = []  # sessions admitted by the last `schedule`

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.waiting or session_id in self.running

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, session_id: str, nbytes: int = 0) -> None:
        """Queue a session's request (one at a time per session)."""
        if session_id in self:
            raise ValueError(f"session {session_id!r} already has a request in the engine")
        if self.pool is not None and nbytes > self.pool.budget_bytes:
            raise ValueError(
                f"session {session_id!r} needs {nbytes} KV bytes, more than the pool's whole "
                f"budget of {self.pool.budget_bytes}"
            )
        self.waiting[session_id] = int(nbytes)

    def schedule(self) -> list[str]:
        """Admit waiting sessions (FIFO, while there is room) and return the running ones."""
        self.admitted = []
        while self.waiting and len(self.running) < self.max_sessions:
            sid, nbytes = next(iter(self.waiting.items()))
            if self.pool is not None and not self.pool.reserve(sid, nbytes):
                break  # head-of-line: wait until a running session frees memory
            del self.waiting[sid]
            self.running.append(sid)
            self.admitted.append(sid)
        return list(self.running)

    def finish(self, session_id: str) -> None:
        """A running session's request is done: it leaves and its reservation is released."""
        self.running.remove(session_id)
        if self.pool is not None:
            self.pool.release(session_id)

    def cancel(self, session_id: str) -> bool:
        """Remove a waiting or running session; False if it is unknown."""
        if session_id in self.waiting:
            del self.waiting[session_id]
            return True
        if session_id in self.running:
            self.finish(session_id)
            return True
        return False
