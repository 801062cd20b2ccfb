"""The session grain (system.md): one named Ray actor per generation session, "session:<id>".

Got-or-created by id (`get_if_exists=True`, detached), it loads its `SessionMeta` and the tokens
of its committed frames from the store on activation, owns the prompt segments, the settings and
the RNG (the seed of each request is `derive_seed(seed, frames so far)`), and runs one generation
at a time in the background:

    pick a worker (affinity: keep meta.worker while it answers; else the least loaded)
    -> worker.run({..., given = every stored frame}) streams committed frames
    -> each frame: store.append_frame FIRST (seq = frames so far; idempotent), THEN publish.

If the worker dies mid-stream the loop picks another one and asks for the remaining frames with
the stored ones as `given` (it rebuilds the KV cache by one prefill): no frame is lost, none is
stored twice. Subscribers (any number, in any number of API processes) long-poll `poll` /
`wait_frames(after_seq, timeout_s)`, which answers as soon as a newer frame exists. After
`idle_s` seconds without a call and without a generation, the actor exits; the next get-or-create
reactivates it from the store. An activation that finds status "running" (the previous
incarnation died mid-generation, e.g. a cluster restart) resumes up to the recorded target.

No torch here: session actors are many small processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import ray

from lumos.cluster.runtime import (
    ACTOR_GONE_ERRORS,
    derive_seed,
    get_actor,
    list_workers,
)
from lumos.store import ACTIVE_STATUSES as ACTIVE
from lumos.store import FrameConflict, FrameRecord, SessionMeta, SessionNotFound, open_store

log = logging.getLogger("lumos.session")

MAX_WORKER_RETRIES = 5  # worker losses tolerated within one generation
WORKER_WAIT_S = 30.0  # how long a generation waits for a live worker to appear
LOAD_TIMEOUT_S = 10.0  # a worker that does not answer load() within this is skipped
POLL_BATCH = 32  # frames per poll answer at most
RECENT_FRAMES = 128  # published frames kept in memory for subscribers
STORE_RETRIES = 3  # retries of a failed frame append (idempotent) before the session fails


class SessionDeactivating(RuntimeError):
    """The actor is exiting (idle): get-or-create the session again and retry."""


def frame_dict(rec: FrameRecord) -> dict:
    """A FrameRecord as the dict subscribers receive."""
    return {"seq": rec.seq, "pixels": rec.pixels, "shape": list(rec.shape), "meta": rec.meta}


def tokens_of(rec: FrameRecord) -> np.ndarray:
    """A record's codes as np.int32 [h, w]."""
    return np.frombuffer(rec.tokens, dtype="<i4").reshape(rec.shape).astype(np.int32)


def state_dict(meta: SessionMeta, n_frames: int | None = None) -> dict:
    """The public state of a session (no token hash)."""
    return {
        "id": meta.session_id,
        "status": meta.status,
        "n_frames": meta.n_frames if n_frames is None else n_frames,
        "target": int(meta.settings.get("target", meta.n_frames)),
        "prompts": [list(p) for p in meta.prompts],
        "settings": dict(meta.settings),
        "worker": meta.worker,
        "error": meta.error,
        "owner": meta.owner,
        "created_at": meta.created_at,
        "updated_at": meta.updated_at,
    }


class Session:
    """The session actor's state and methods (wrapped as `SessionActor`)."""

    def __init__(
        self, session_id: str, store_url: str, namespace: str, idle_s: float = 300.0
    ) -> None:
        self.sid = session_id
        self.namespace = namespace
        self.idle_s = float(idle_s)
        self.store = open_store(store_url)
        self.meta: SessionMeta | None = None
        self.codes: list[np.ndarray] = []  # committed frames' codes, [h, w] each
        self.recent: OrderedDict[int, dict] = OrderedDict()  # seq -> published frame dict
        self._changed = asyncio.Event()  # replaced on every change (see _notify)
        self._task: asyncio.Task | None = None
        self._generating = False
        self._worker: tuple[str, Any] | None = None  # (name, handle) of the current worker
        self._load_lock: asyncio.Lock | None = None
        self._watchdog: asyncio.Task | None = None
        self._last_call = time.monotonic()
        self._pollers = 0
        self._exiting = False
        self.activated_at = time.time()

    # -- activation -------------------------------------------------------------------------------
    async def _ensure(self) -> None:
        if self._exiting:
            raise SessionDeactivating(f"session {self.sid} is deactivating")
        self._last_call = time.monotonic()
        if self.meta is not None:
            return
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if self.meta is not None:
                return
            meta = await self.store.get_session(self.sid)
            if meta is None:  # never created, or deleted: this actor has no reason to live
                self._exiting = True
                ray.get_runtime_context().current_actor.deactivate.remote()
                raise SessionNotFound(f"session {self.sid!r} does not exist")
            codes: list[np.ndarray] = []
            while len(codes) < meta.n_frames:
                chunk = await self.store.get_frames(self.sid, len(codes), len(codes) + 64)
                if not chunk:
                    break
                codes += [tokens_of(r) for r in chunk]
            self.codes, self.meta = codes, meta
            self._changed = asyncio.Event()
            self._watchdog = asyncio.get_running_loop().create_task(self._idle_watch())
            target = int(meta.settings.get("target", len(codes)))
            if meta.status in ACTIVE:
                if target > len(codes):  # the previous incarnation died mid-generation
                    self._start(target)
                else:
                    await self._set(status="done")

    async def _set(self, **fields: Any) -> None:
        self.meta = await self.store.update_session(self.sid, **fields)
        self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    @property
    def running(self) -> bool:
        return self._generating

    # -- the API ----------------------------------------------------------------------------------
    async def state(self) -> dict:
        await self._ensure()
        return self._state()

    def _state(self) -> dict:
        return state_dict(self.meta, len(self.codes))

    async def extend(self, n_frames: int, prompt: str | None = None) -> dict:
        """Start generating n_frames more frames in the background ({"refused": why} if not)."""
        await self._ensure()
        if self.running:
            return {"refused": f"session {self.sid} is already generating; wait until it is idle"}
        n_frames = int(n_frames)
        if n_frames < 1:
            return {"refused": f"frames must be >= 1, got {n_frames}"}
        n = len(self.codes)
        prompts = [list(p) for p in self.meta.prompts]
        if prompt is not None and (not prompts or prompts[-1][1] != prompt):
            if prompts and prompts[-1][0] == n:
                prompts[-1][1] = prompt  # a segment that produced no frame yet
            else:
                prompts.append([n, prompt])
        settings = dict(self.meta.settings, target=n + n_frames)
        self.meta = await self.store.update_session(
            self.sid, status="queued", prompts=prompts, settings=settings, error=None
        )
        self._start(n + n_frames)
        return self._state()

    def _start(self, target: int) -> None:
        self._generating = True
        self._task = asyncio.get_running_loop().create_task(self._generate(target))
        self._notify()

    async def poll(self, after_seq: int, timeout_s: float = 10.0, follow: bool = False) -> dict:
        """Frames with seq > after_seq, with the state; waits up to timeout_s for a change.

        Without follow it answers at once when there is nothing newer and no generation runs
        (the subscriber is done); with follow it also waits for a future extend.
        """
        await self._ensure()
        self._pollers += 1
        try:
            after_seq = int(after_seq)
            idle = not (follow or self._generating)
            if after_seq + 1 >= len(self.codes) and timeout_s > 0 and not idle:
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), timeout_s)
                except TimeoutError:
                    pass
            frames = await self._frames_after(after_seq)
        finally:
            self._pollers -= 1
            self._last_call = time.monotonic()
        out = self._state()
        out["frames"] = frames
        return out

    async def wait_frames(self, after_seq: int, timeout_s: float = 10.0) -> list[dict]:
        """Long-poll: frames with seq > after_seq as soon as one exists, else [] at timeout."""
        return (await self.poll(after_seq, timeout_s, True))["frames"]

    async def _frames_after(self, after_seq: int) -> list[dict]:
        start, end = after_seq + 1, min(len(self.codes), after_seq + 1 + POLL_BATCH)
        if start >= end:
            return []
        if start in self.recent:
            return [self.recent[s] for s in range(start, end) if s in self.recent]
        # older than the in-memory window: the store has them (persisted before published)
        return [frame_dict(r) for r in await self.store.get_frames(self.sid, start, end)]

    async def cancel(self) -> dict:
        """Stop the running generation (the frames committed so far stay)."""
        await self._ensure()
        await self._stop_generation()
        return self._state()

    async def _stop_generation(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
        if self._worker is not None:
            try:
                await asyncio.wait_for(self._worker[1].cancel.remote(self.sid), 5)
            except Exception:
                pass

    async def shutdown(self) -> None:
        """Stop generating (the session is being deleted); the caller kills the actor."""
        self._exiting = True
        await self._stop_generation()

    async def deactivate(self) -> None:
        """Exit this actor (the idle watchdog calls it through the actor's own handle)."""
        if self.meta is not None and (self.running or self._pollers):
            self._exiting = False
            self._watchdog = asyncio.get_running_loop().create_task(self._idle_watch())
            return
        await self.store.close()
        ray.actor.exit_actor()

    async def _idle_watch(self) -> None:
        period = max(0.05, min(1.0, self.idle_s / 4))
        while True:
            await asyncio.sleep(period)
            idle = time.monotonic() - self._last_call
            if self.running or self._pollers or idle < self.idle_s:
                continue
            self._exiting = True
            try:
                me = ray.get_runtime_context().current_actor
                me.deactivate.remote()
            except Exception:
                self._exiting = False
                continue
            return

    # -- generation -------------------------------------------------------------------------------
    async def _generate(self, target: int) -> None:
        losses = 0
        status, error = "done", None
        try:
            while len(self.codes) < target:
                name, worker = await self._pick_worker()
                try:
                    await self._stream(name, worker, target)
                except ACTOR_GONE_ERRORS as e:
                    losses += 1
                    log.warning("session %s: worker %s lost (%s); retrying", self.sid, name, e)
                    self._worker = None
                    if losses > MAX_WORKER_RETRIES:
                        raise RuntimeError(f"lost {losses} workers in one generation") from e
        except asyncio.CancelledError:
            pass  # cancel(): the frames committed so far stay, the session is done
        except SessionNotFound:
            status = None  # deleted while generating
        except Exception as e:
            log.exception("session %s failed", self.sid)
            status, error = "failed", _message(e)
        self._generating = False
        self._last_call = time.monotonic()
        if status is not None:
            self.meta.status, self.meta.error = status, error  # what pollers see from now on
        self._notify()
        if status is not None:
            try:
                await self._set(status=status, error=error, rng_state=self._rng_state())
            except SessionNotFound:
                pass

    def _rng_state(self) -> bytes:
        seed = int(self.meta.settings.get("seed", 0))
        state = {"seed": seed, "n_frames": len(self.codes), "scheme": "sha256(lumos:seed:n)"}
        return json.dumps(state).encode()

    def _request(self, target: int) -> dict:
        s, n = self.meta.settings, len(self.codes)
        prompt = self.meta.prompts[-1][1] if self.meta.prompts else None
        given = np.stack(self.codes).astype(np.int32) if self.codes else None  # [t0, h, w]
        return {
            "session_id": self.sid,
            "prompt": prompt,
            "given": given,
            "n_frames": target - n,
            "steps": int(s["steps"]),
            "cfg": float(s["cfg"]),
            "duration": int(s.get("duration", 1)),
            "fps": int(s.get("fps", 8)),
            "seed": derive_seed(int(s.get("seed", 0)), n),
        }

    async def _stream(self, name: str, worker, target: int) -> None:
        """Run the remaining frames on one worker: persist each frame, then publish it."""
        self._worker = (name, worker)
        if self.meta.worker != name or self.meta.status != "running":
            await self._set(worker=name, status="running")
        prompt_index = max(0, len(self.meta.prompts) - 1)
        async for ref in worker.run.remote(self._request(target)):
            item = await ref
            seq = len(self.codes)
            if int(item["index"]) != seq:
                raise RuntimeError(f"worker {name} sent frame {item['index']}, expected {seq}")
            codes = np.asarray(item["codes"], dtype=np.int32)
            meta = {
                "source": "generated",
                "prompt": prompt_index,
                "rgb_frames": int(item.get("rgb_frames", 1)),
                "worker": name,
                "committed_at": float(item.get("committed_at", 0.0)),
            }
            rec = FrameRecord(
                self.sid, seq, codes.astype("<i4").tobytes(), codes.shape, item["pixels"], meta
            )
            # a frame is committed whole: a cancel waits until it is persisted AND published, so
            # the codes in memory never fall behind the store
            commit = asyncio.ensure_future(self._commit(rec, codes))
            try:
                await asyncio.shield(commit)
            except asyncio.CancelledError:
                await commit
                raise

    async def _commit(self, rec: FrameRecord, codes: np.ndarray) -> None:
        """Persist one frame (retrying transient store errors: appends are idempotent), then
        publish it to the pollers."""
        for attempt in range(STORE_RETRIES + 1):
            try:
                await self.store.append_frame(rec)  # persist FIRST
                break
            except (FrameConflict, SessionNotFound):
                raise
            except Exception:
                if attempt == STORE_RETRIES:
                    raise
                log.warning("session %s: append of frame %d failed; retrying", self.sid, rec.seq)
                await asyncio.sleep(0.2 * 2**attempt)
        self.codes.append(codes)  # THEN publish
        self.recent[rec.seq] = frame_dict(rec)
        while len(self.recent) > RECENT_FRAMES:
            self.recent.popitem(last=False)
        self._notify()

    async def _pick_worker(self) -> tuple[str, Any]:
        """Affinity first (meta.worker while it answers), else the least-loaded live worker."""
        deadline = time.monotonic() + WORKER_WAIT_S
        while True:
            preferred = self.meta.worker
            if preferred:
                handle = get_actor(preferred, self.namespace)
                if handle is not None and await _load(handle) is not None:
                    return preferred, handle
            names = await asyncio.to_thread(list_workers, self.namespace)
            handles = {n: get_actor(n, self.namespace) for n in names}
            handles = {n: h for n, h in handles.items() if h is not None}
            loads = await asyncio.gather(*(_load(h) for h in handles.values()))
            live = [(ld, n) for (n, ld) in zip(handles, loads) if ld is not None]
            if live:
                # least loaded; ties spread by a hash of (session, worker) (rendezvous hashing)
                _, name = min(
                    live, key=lambda x: (x[0]["sessions"] + x[0]["waiting"], _rank(self.sid, x[1]))
                )
                return name, handles[name]
            if time.monotonic() > deadline:
                raise RuntimeError("no live worker: start one with `lumos worker`")
            await asyncio.sleep(0.5)


def _rank(session_id: str, worker: str) -> str:
    return hashlib.sha1(f"{session_id}/{worker}".encode()).hexdigest()


async def _load(handle) -> dict | None:
    """A worker's load, or None if it is dead or does not answer in time."""
    try:
        return await asyncio.wait_for(handle.load.remote(), LOAD_TIMEOUT_S)
    except (TimeoutError, *ACTOR_GONE_ERRORS):
        return None


def _message(e: BaseException) -> str:
    """A short error message (the first line of a Ray task error's cause)."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


SessionActor = ray.remote(max_concurrency=1000, num_cpus=0, max_restarts=0)(Session)
