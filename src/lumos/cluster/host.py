"""Session hosts (Orleans silos): a few long-lived Ray actors that hold many session grains.

Routing (the directory). A cluster serving one store has N session hosts, named
`host-<store key>-<i>` (runtime.host_name), detached, spread over the nodes (SPREAD). N is fixed
for the cluster's life: the first API process creates host 0 with its N (`--session-hosts`,
default one per alive node) and every later one asks host 0 (`shards()`). A session id maps to
host `shard_of(id, N)` (sha1 of the id, mod N), so every API process routes a session to the
same host, and Ray keeps one actor per name cluster-wide: one activation per session id.

Supervision. Hosts run with max_restarts=-1: a host whose process or node dies is restarted by
Ray (elsewhere if its node is gone) with an empty table; its sessions re-activate there from the
store on their next call (a subscriber's poll, a state, an extend), and one that was generating
resumes from its last stored frame. Callers retry calls that hit a host while it restarts.

Inside a host (one asyncio loop): `sessions` maps id -> `Session` (activated on demand, one
activation at a time per id), `_changed` maps id -> an asyncio.Event that subscribers wait on,
independent of the grain, so an open WebSocket does not keep a session active: `poll` of an
inactive session that is not generating reads the store and waits on the event without
activating it. A sweeper deactivates grains idle for `idle_s` (no call, no generation) and frees
their KV cache on their worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import ray

from lumos.cluster.placement import WorkerView
from lumos.cluster.runtime import current_node, host_name
from lumos.cluster.session import POLL_BATCH, Session, frame_dict, state_dict
from lumos.store import ACTIVE_STATUSES, SessionNotFound, open_store

CALLS = frozenset({"state", "extend", "cancel"})  # Session methods reachable through call()


def shard_of(session_id: str, n_hosts: int) -> int:
    """The index of the session host that owns session_id."""
    return int(hashlib.sha1(session_id.encode()).hexdigest()[:8], 16) % n_hosts


class SessionHost:
    """A silo: many session grains in one process, their subscribers, the idle sweeper."""

    def __init__(
        self, index: int, n_hosts: int, store_url: str, namespace: str, idle_s: float
    ) -> None:
        self.index, self.n_hosts = int(index), int(n_hosts)
        self.idle_s = float(idle_s)
        self.store = open_store(store_url)
        self.workers = WorkerView(namespace, current_node())
        self.sessions: dict[str, Session] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}  # session id -> polls waiting on its event
        self._sweeper: asyncio.Task | None = None
        self.started_at = time.time()
        self.activations = 0
        self.deactivations = 0

    # -- grains -----------------------------------------------------------------------------------
    def notify(self, session_id: str) -> None:
        """Wake the session's subscribers (a frame was committed, or its state changed)."""
        event = self._changed.pop(session_id, None)
        if event is not None:
            event.set()

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _grain(self, session_id: str) -> Session:
        """The session's grain, activating it from the store if needed (SessionNotFound)."""
        self._ensure_sweeper()
        grain = self.sessions.get(session_id)
        if grain is not None:
            return grain
        task = self._loading.get(session_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._activate(session_id))
            self._loading[session_id] = task
        return await asyncio.shield(task)

    async def _activate(self, session_id: str) -> Session:
        try:
            grain = await Session.activate(self, session_id)
            self.sessions[session_id] = grain
            self.activations += 1
            return grain
        finally:
            self._loading.pop(session_id, None)

    async def _sweep(self) -> None:
        period = max(0.05, min(1.0, self.idle_s / 4))
        while True:
            await asyncio.sleep(period)
            for sid, grain in list(self.sessions.items()):
                if grain.running or grain.calls or grain.idle_for < self.idle_s:
                    continue
                del self.sessions[sid]
                self.deactivations += 1
                asyncio.get_running_loop().create_task(grain.release())

    # -- the actor's API --------------------------------------------------------------------------
    async def shards(self) -> int:
        """How many session hosts the cluster has (host 0 is asked by every API process)."""
        return self.n_hosts

    async def call(self, session_id: str, method: str, *args: Any) -> Any:
        """Call a grain method ("state", "extend", "cancel"), activating the grain."""
        if method not in CALLS:
            raise ValueError(f"unknown session method {method!r}")
        grain = await self._grain(session_id)
        grain.calls += 1
        try:
            return await getattr(grain, method)(*args)
        finally:
            grain.calls -= 1
            grain.last_call = time.monotonic()

    async def poll(
        self, session_id: str, after_seq: int, timeout_s: float = 10.0, follow: bool = False
    ) -> dict:
        """The session's state and its frames with seq > after_seq (at most POLL_BATCH).

        Waits up to timeout_s for a newer frame or a state change when there is none yet and the
        session is generating (or follow). Does not activate a session that is not generating,
        and does not refresh a grain's idle clock.
        """
        self._ensure_sweeper()
        after_seq = int(after_seq)
        event = self._changed.setdefault(session_id, asyncio.Event())  # before the snapshot
        out = await self._snapshot(session_id, after_seq)
        if not out["frames"] and timeout_s > 0 and (follow or out["status"] in ACTIVE_STATUSES):
            self._waiting[session_id] = self._waiting.get(session_id, 0) + 1
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                return out
            finally:
                self._forget_event(session_id, event)
            out = await self._snapshot(session_id, after_seq)
        else:
            self._forget_event(session_id, event, waited=False)
        return out

    def _forget_event(self, session_id: str, event: asyncio.Event, waited: bool = True) -> None:
        """Drop a session's event once no poll waits on it (the table stays bounded)."""
        left = self._waiting.get(session_id, 0) - (1 if waited else 0)
        if left > 0:
            self._waiting[session_id] = left
            return
        self._waiting.pop(session_id, None)
        if self._changed.get(session_id) is event:
            del self._changed[session_id]

    async def _snapshot(self, session_id: str, after_seq: int) -> dict:
        grain = self.sessions.get(session_id)
        if grain is None:
            meta = await self.store.get_session(session_id)
            if meta is None:
                raise SessionNotFound(f"session {session_id!r} does not exist")
            if meta.status in ACTIVE_STATUSES:  # its host died mid-generation: resume it
                grain = await self._grain(session_id)
            else:
                out = state_dict(meta)
                out["frames"] = await self._stored(session_id, after_seq, meta.n_frames)
                return out
        out = grain.state_now()
        frames = grain.frames_after(after_seq)
        if frames is None:  # older than the grain's in-memory window
            frames = await self._stored(session_id, after_seq, len(grain.codes))
        out["frames"] = frames
        return out

    async def _stored(self, session_id: str, after_seq: int, n_frames: int) -> list[dict]:
        start, end = after_seq + 1, min(n_frames, after_seq + 1 + POLL_BATCH)
        if start >= end:
            return []
        return [frame_dict(r) for r in await self.store.get_frames(session_id, start, end)]

    async def delete(self, session_id: str) -> None:
        """Stop the session, free its KV cache on its worker and remove it from the store."""
        grain = self.sessions.pop(session_id, None)
        task = self._loading.get(session_id)
        if grain is None and task is not None:
            try:
                grain = await asyncio.shield(task)
            except Exception:
                grain = None
            self.sessions.pop(session_id, None)
        if grain is not None:
            await grain.stop()
            worker = grain.meta.worker
        else:
            meta = await self.store.get_session(session_id)
            worker = meta.worker if meta is not None else None
        await self.store.delete_session(session_id)
        if worker:
            await self.workers.drop(worker, session_id)
        self.notify(session_id)

    async def stats(self) -> dict:
        """What the host holds: active grains, waiting subscribers, its process' RSS."""
        return {
            "name": host_name_of(self),
            "index": self.index,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "active": len(self.sessions),
            "subscribed": sum(self._waiting.values()),
            "events": len(self._changed),
            "activations": self.activations,
            "deactivations": self.deactivations,
            "rss_bytes": rss_bytes(),
            "started_at": self.started_at,
        }

    async def active(self) -> list[str]:
        """The ids of the grains active here."""
        return sorted(self.sessions)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_name_of(host: SessionHost) -> str:
    try:
        return ray.get_runtime_context().get_actor_name() or f"host-{host.index}"
    except Exception:
        return f"host-{host.index}"


HostActor = ray.remote(max_concurrency=100_000, num_cpus=0, max_restarts=-1)(SessionHost)


def get_host(store_url: str, namespace: str, index: int, n_hosts: int, idle_s: float):
    """Get or create session host `index` (detached, spread over the nodes)."""
    return HostActor.options(
        name=host_name(store_url, index),
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy="SPREAD",
    ).remote(index, n_hosts, store_url, namespace, idle_s)
