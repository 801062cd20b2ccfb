"""Worker placement: which GPU worker runs a session's next frames.

Each worker reports its load (`Worker.load`): `sessions` (in its engine: running, waiting, or
about to be added; `waiting` is a part of it, never added again), `running`, `kv_bytes` and
`capacity` (the engine's batch size). `choose` keeps a session on the worker that holds its KV
cache (affinity, `preferred`) while that worker is live and not overloaded; otherwise it takes
the least-loaded live worker that has capacity, by (sessions / capacity, kv_bytes), then a
worker on the session host's own node (`node`; frames then never cross the network), remaining
ties spread by rendezvous hashing of (session, worker). `WorkerView` is a session host's view of
the workers (their names, handles and loads). A placement reads loads taken after it was asked
for (`pick` waits for a refresh that started after its call; picks that arrive together share
one), so a session placed on any host is seen by the next one once that worker has accepted it
(`Session.extend` answers then). A placement also counts the session into the chosen worker's
load until the worker reports it among its `streaming` ones (PLACED_TTL_S at most), so that a
burst of sessions on one host spreads out before the workers answer. A worker that does not
answer load() within LOAD_TIMEOUT_S keeps its last load for SLOW_KEEP_S (a busy worker is not a
dead one: dropping it would move its sessions off their KV caches); one that Ray reports dead or
restarting is dropped at once. Listing the workers' names (a GCS call) is cached for NAMES_S:
a new worker is placed on within a second of registering.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from lumos.cluster.runtime import ACTOR_GONE_ERRORS, get_actor, list_workers

LOAD_TIMEOUT_S = 3.0  # a load() answer later than this counts as none
SLOW_KEEP_S = 15.0  # a worker missing load() deadlines keeps its last load this long
NAMES_S = 1.0  # the workers' names (a GCS call) are listed at most this often; loads every pick
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


async def _load_or_why(handle, timeout_s: float) -> dict | str:
    """A worker's load, or "slow" (no answer in time) or "gone" (Ray: dead or restarting)."""
    try:
        return await asyncio.wait_for(handle.load.remote(), timeout_s)
    except TimeoutError:
        return "slow"
    except ACTOR_GONE_ERRORS:
        return "gone"


async def worker_load(handle, timeout_s: float = LOAD_TIMEOUT_S) -> dict | None:
    """A worker's load, or None if it is dead or does not answer in time."""
    answer = await _load_or_why(handle, timeout_s)
    return answer if isinstance(answer, dict) else None


class WorkerView:
    """The namespace's workers as one host sees them: handles and loads (async; one per host)."""

    def __init__(self, namespace: str, node: str | None = None) -> None:
        self.namespace = namespace
        self.node = node  # the host's Ray node id: equal loads go to a worker there
        self._placed: dict[str, tuple[str, float]] = {}  # session -> (worker, when), unreported
        self.handles: dict[str, Any] = {}
        self.loads: dict[str, dict] = {}  # live workers: their reports plus our placements
        self._reported: dict[str, tuple[dict, float]] = {}  # worker -> (its last load, when)
        self._started = -1.0  # when the last completed refresh began (monotonic)
        self._listed = -NAMES_S  # when the workers' names were last listed
        self._lock = asyncio.Lock()

    async def refresh(self) -> dict[str, dict]:
        """The live workers' loads, read by a refresh that began after this call (callers that
        wait together share one). The workers' names are listed at most every NAMES_S."""
        since = time.monotonic()
        async with self._lock:
            if self._started >= since:
                return self.loads  # a refresh began after the caller asked
            started = time.monotonic()
            if started - self._listed >= NAMES_S:
                await self._list()
                self._listed = started
            names = list(self.handles)
            answers = await asyncio.gather(
                *(_load_or_why(self.handles[n], LOAD_TIMEOUT_S) for n in names)
            )
            now = time.monotonic()
            reported = {}
            for name, answer in zip(names, answers):
                if isinstance(answer, dict):
                    reported[name] = (answer, now)
                elif answer == "slow" and name in self._reported:
                    last = self._reported[name]  # busy is not dead: its last load stands a while
                    if now - last[1] <= SLOW_KEEP_S:
                        reported[name] = last
            self._reported = reported
            self.loads = {name: dict(load) for name, (load, _) in reported.items()}
            self._started = started
            for sid, (name, at) in list(self._placed.items()):
                load = self.loads.get(name)
                if load is None or now - at > PLACED_TTL_S or sid in load.get("streaming", ()):
                    del self._placed[sid]  # the worker counts it now (or it is gone)
                else:
                    load["sessions"] = int(load.get("sessions", 0)) + 1
            return self.loads

    async def _list(self) -> None:
        """Handles of the namespace's registered workers (new ones added, gone ones removed)."""
        names = await asyncio.to_thread(list_workers, self.namespace)
        for name in names:
            if name not in self.handles:
                handle = get_actor(name, self.namespace)
                if handle is not None:
                    self.handles[name] = handle
        for name in set(self.handles) - set(names):
            del self.handles[name]

    def forget(self, name: str) -> None:
        """A worker was lost: do not place on it until a refresh finds it live again."""
        self.loads.pop(name, None)
        self._reported.pop(name, None)

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
