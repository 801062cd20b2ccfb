"""Worker placement: which GPU worker runs a session's next frames.

Each worker reports its load (`Worker.load`): `sessions` (in its engine: running, waiting, or
about to be added; `waiting` is a part of it, never added again), `running`, `kv_bytes` and
`capacity` (the engine's batch size). `choose` keeps a session on the worker that holds its KV
cache (affinity, `preferred`) while that worker is live and not overloaded; otherwise it takes
the least-loaded live worker that has capacity, by (sessions / capacity, kv_bytes), then a
worker on the session host's own node (`node`; frames then never cross the network), remaining
ties spread by rendezvous hashing of (session, worker). `WorkerView` is a session host's cached
view of the workers (their names, handles and loads), refreshed at most every REFRESH_S; a
placement counts the session into the chosen worker's load (across refreshes, until the worker
reports the session among its `streaming` ones) so that a burst of sessions on one host spreads
out. Hosts do not see each other's placements until the workers report them, so
two hosts placing at the same moment on idle workers each take their own node's worker rather
than the same hashed one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from lumos.cluster.runtime import ACTOR_GONE_ERRORS, get_actor, list_workers

LOAD_TIMEOUT_S = 3.0  # a worker that does not answer load() within this is not live
REFRESH_S = 1.0
PLACED_TTL_S = 10.0  # a placement counts into its worker's load until the worker reports it


def _rank(session_id: str, worker: str) -> str:
    return hashlib.sha1(f"{session_id}/{worker}".encode()).hexdigest()


def capacity(load: dict) -> int:
    return max(1, int(load.get("capacity") or 1))


def has_room(load: dict) -> bool:
    """Whether one more session fits in the worker's running batch."""
    return int(load.get("sessions", 0)) < capacity(load)


def score(load: dict) -> tuple[float, int]:
    """Lower is less loaded: the batch fill, then the KV bytes held."""
    return int(load.get("sessions", 0)) / capacity(load), int(load.get("kv_bytes", 0))


def rank(loads: dict[str, dict], session_id: str, node: str | None = None) -> list[str]:
    """Live workers (name -> load), least loaded first; those with room before those without;
    among equals, those on `node` (the placing host's) first."""

    def key(n: str) -> tuple:
        remote = node is None or loads[n].get("node") != node
        return (not has_room(loads[n]), *score(loads[n]), remote, _rank(session_id, n))

    return sorted(loads, key=key)


def choose(
    loads: dict[str, dict],
    session_id: str,
    preferred: str | None = None,
    node: str | None = None,
) -> str | None:
    """The worker for the session's next request (None: no live worker)."""
    if not loads:
        return None
    ranked = rank(loads, session_id, node)
    if preferred in loads:
        if has_room(loads[preferred]) or not has_room(loads[ranked[0]]):
            return (
                preferred  # affinity: its KV cache is there (overloaded only if others have room)
            )
    return ranked[0]


async def worker_load(handle, timeout_s: float = LOAD_TIMEOUT_S) -> dict | None:
    """A worker's load, or None if it is dead or does not answer in time."""
    try:
        return await asyncio.wait_for(handle.load.remote(), timeout_s)
    except (TimeoutError, *ACTOR_GONE_ERRORS):
        return None


class WorkerView:
    """A cached view of the namespace's workers: handles and loads (async; one per host)."""

    def __init__(self, namespace: str, node: str | None = None) -> None:
        self.namespace = namespace
        self.node = node  # the host's Ray node id: equal loads go to a worker there
        self._placed: dict[str, tuple[str, float]] = {}  # session -> (worker, when), unreported
        self.handles: dict[str, Any] = {}
        self.loads: dict[str, dict] = {}
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> dict[str, dict]:
        async with self._lock:
            if not force and time.monotonic() - self._at < REFRESH_S:
                return self.loads
            names = await asyncio.to_thread(list_workers, self.namespace)
            for name in names:
                if name not in self.handles:
                    handle = get_actor(name, self.namespace)
                    if handle is not None:
                        self.handles[name] = handle
            for name in set(self.handles) - set(names):
                del self.handles[name]
            names = list(self.handles)
            loads = await asyncio.gather(*(worker_load(self.handles[n]) for n in names))
            self.loads = {n: ld for n, ld in zip(names, loads) if ld is not None}
            self._at = now = time.monotonic()
            for sid, (name, at) in list(self._placed.items()):
                load = self.loads.get(name)
                if load is None or now - at > PLACED_TTL_S or sid in load.get("streaming", ()):
                    del self._placed[sid]  # the worker counts it now (or it is gone)
                else:
                    load["sessions"] = int(load.get("sessions", 0)) + 1
            return self.loads

    def forget(self, name: str) -> None:
        """A worker was lost: do not place on it until a refresh finds it live again."""
        self.loads.pop(name, None)
        self._at = 0.0

    async def pick(self, session_id: str, preferred: str | None) -> tuple[str, Any] | None:
        """(name, handle) of the worker for the session's next request, or None."""
        loads = await self.refresh()
        name = choose(loads, session_id, preferred, self.node)
        if name is None:
            return None
        load = loads[name]
        placed = self._placed.get(session_id)
        if placed is None or placed[0] != name:  # else the refresh already counted it here
            load["sessions"] = int(load.get("sessions", 0)) + 1  # until the worker reports it
        self._placed[session_id] = (name, time.monotonic())
        return name, self.handles[name]

    async def drop(self, name: str, session_id: str) -> None:
        """Ask a worker to free the session's KV cache (best effort: a dead worker holds none)."""
        handle = self.handles.get(name) or get_actor(name, self.namespace)
        if handle is None:
            return
        try:
            await asyncio.wait_for(handle.drop.remote(session_id), LOAD_TIMEOUT_S)
        except (TimeoutError, *ACTOR_GONE_ERRORS):
            pass
