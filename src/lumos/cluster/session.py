"""The session grain (system.md): one plain object per active session inside a session host.

A `Session` lives in the `SessionHost` its id maps to (lumos.cluster.host); the host activates
it on the first call that needs it (loading its `SessionMeta` and the tokens of its committed
frames from the store), and deactivates it after `idle_s` seconds without a call and without a
generation. Subscribers do not keep it active: they wait on the host's per-session change event,
which outlives the grain. The grain owns the prompt segments, the settings and the RNG (the seed
of each request is `derive_seed(seed, frames so far)`), and runs one generation at a time in the
background:

    pick a worker (lumos.cluster.placement: affinity to meta.worker while it is live and not
    overloaded, else the least-loaded live worker with capacity)
    -> worker.run({..., given = every stored frame}) streams committed frames
    -> each frame: store.append_frame FIRST (seq = frames so far; idempotent), THEN publish.

Statuses (store.STATUSES): "queued" from extend until a worker accepts the request, "running"
while one holds it, "done" when the target is reached or the generation is cancelled, "failed"
with `error`.

If the worker dies mid-stream the loop picks a worker again (the restarted one, or another) and
asks for the remaining frames with the stored ones as `given` (the KV cache is rebuilt by one
prefill): no frame is lost, none is stored twice. An activation that finds status queued/running
(its previous host died mid-generation) resumes up to the recorded target.

No torch here: session hosts are small processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from lumos.cluster.runtime import ACTOR_GONE_ERRORS, derive_seed, error_message
from lumos.store import ACTIVE_STATUSES as ACTIVE
from lumos.store import FrameConflict, FrameRecord, SessionMeta, SessionNotFound

if TYPE_CHECKING:
    from lumos.cluster.host import SessionHost

log = logging.getLogger("lumos.session")

MAX_WORKER_RETRIES = 8  # worker losses tolerated within one generation
WORKER_WAIT_S = 60.0  # how long a generation waits (queued) for a live worker to appear
POLL_BATCH = 32  # frames per poll answer at most
RECENT_FRAMES = 16  # published frames kept in memory for subscribers (older: from the store)
PLACE_WAIT_S = 2.0  # extend answers once a worker holds the request, or after this at most
STORE_RETRIES = 3  # retries of a failed frame append (idempotent) before the session fails


class NoLiveWorker(RuntimeError):
    """No worker answered for WORKER_WAIT_S seconds."""


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
    """One active session: its stored state, committed codes and background generation."""

    def __init__(self, host: SessionHost, meta: SessionMeta, codes: list[np.ndarray]) -> None:
        self.host = host
        self.store = host.store
        self.sid = meta.session_id
        self.meta = meta
        self.codes = codes  # committed frames' codes, [h, w] each
        self.recent: OrderedDict[int, dict] = OrderedDict()  # seq -> published frame dict
        self._task: asyncio.Task | None = None
        self._placed = asyncio.Event()  # the current request reached a worker
        self._worker: tuple[str, Any] | None = None  # (name, handle) of the current worker
        self.last_call = time.monotonic()
        self.calls = 0  # calls in progress (the host never deactivates a grain inside one)
        self.activated_at = time.time()

    @classmethod
    async def activate(cls, host: SessionHost, session_id: str) -> Session:
        """Load the session from the store; resume a generation its previous host left."""
        meta = await host.store.get_session(session_id)
        if meta is None:
            raise SessionNotFound(f"session {session_id!r} does not exist")
        codes: list[np.ndarray] = []
        while len(codes) < meta.n_frames:
            chunk = await host.store.get_frames(session_id, len(codes), len(codes) + 64)
            if not chunk:
                break
            codes += [tokens_of(r) for r in chunk]
        sess = cls(host, meta, codes)
        target = int(meta.settings.get("target", len(codes)))
        if meta.status in ACTIVE:
            if target > len(codes):  # the previous activation died mid-generation
                sess._start(target)
            else:
                await sess._set(status="done")
        return sess

    async def _set(self, **fields: Any) -> None:
        self.meta = await self.store.update_session(self.sid, **fields)
        self._notify()

    def _notify(self) -> None:
        self.host.notify(self.sid)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def idle_for(self) -> float:
        return time.monotonic() - self.last_call

    # -- the API ----------------------------------------------------------------------------------
    async def state(self) -> dict:
        return self.state_now()

    def state_now(self) -> dict:
        return state_dict(self.meta, len(self.codes))

    async def extend(self, n_frames: int, prompt: str | None = None) -> dict:
        """Start generating n_frames more frames in the background ({"refused": why} if not)."""
        if self.running:
            return {"refused": f"session {self.sid} is already generating; wait until it is done"}
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
        queued = self.state_now()  # the answer: accepted, queued for a worker
        # answer once a worker holds the request (or PLACE_WAIT_S passed): the next session
        # placed, on any host, then sees this one in that worker's load
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._placed.wait()), PLACE_WAIT_S)
        return queued

    def _start(self, target: int) -> None:
        self._placed = asyncio.Event()  # set when a worker accepts the request, or on any end
        self._task = asyncio.get_running_loop().create_task(self._generate(target))
        self._notify()

    def frames_after(self, after_seq: int) -> list[dict] | None:
        """Published frames with seq > after_seq from memory (None: ask the store)."""
        start, end = after_seq + 1, min(len(self.codes), after_seq + 1 + POLL_BATCH)
        if start >= end:
            return []
        if start in self.recent:
            return [self.recent[s] for s in range(start, end) if s in self.recent]
        return None

    async def cancel(self) -> dict:
        """Stop the running generation (the frames committed so far stay; status done)."""
        await self.stop()
        if self.meta.status in ACTIVE:
            await self._set(status="done")
        return self.state_now()

    async def stop(self) -> None:
        """Stop the generation task and the worker's request (deletion, cancel)."""
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

    async def release(self) -> None:
        """Free what the session holds on its worker (its KV cache): deletion, deactivation."""
        name = self.meta.worker
        if name:
            await self.host.workers.drop(name, self.sid)

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
                    self.host.workers.forget(name)
                    self._worker = None
                    if losses > MAX_WORKER_RETRIES:
                        raise RuntimeError(f"lost {losses} workers in one generation") from e
        except asyncio.CancelledError:
            pass  # cancel(): the frames committed so far stay, the session is done
        except SessionNotFound:
            status = None  # deleted while generating
        except Exception as e:
            log.exception("session %s failed", self.sid)
            status, error = "failed", error_message(e)
        self.last_call = time.monotonic()
        self._placed.set()
        if status is not None:
            try:
                await self._set(status=status, error=error, rng_state=self._rng_state())
            except SessionNotFound:
                pass
        self._notify()

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
            "text_frames": s.get("text_frames"),
            "seed": derive_seed(int(s.get("seed", 0)), n),
        }

    async def _stream(self, name: str, worker, target: int) -> None:
        """Run the remaining frames on one worker: persist each frame, then publish it."""
        self._worker = (name, worker)
        prompt_index = max(0, len(self.meta.prompts) - 1)
        async for ref in worker.run.remote(self._request(target)):
            item = await ref
            if self.meta.worker != name or self.meta.status != "running":
                await self._set(worker=name, status="running")
            if item.get("accepted"):  # the worker holds the request: running from now on
                self._placed.set()
                continue
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
            if item.get("done"):
                return  # the request's last frame: done now, not when Ray closes the stream

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
        self.meta.n_frames = len(self.codes)
        self.recent[rec.seq] = frame_dict(rec)
        while len(self.recent) > RECENT_FRAMES:
            self.recent.popitem(last=False)
        self.last_call = time.monotonic()
        self._notify()

    async def _pick_worker(self) -> tuple[str, Any]:
        """Wait (queued) until placement names a live worker; fail after WORKER_WAIT_S."""
        deadline = time.monotonic() + WORKER_WAIT_S
        while True:
            picked = await self.host.workers.pick(self.sid, self.meta.worker)
            if picked is not None:
                return picked
            if time.monotonic() > deadline:
                raise NoLiveWorker(
                    f"no live worker for {WORKER_WAIT_S:.0f} s: start one with `lumos worker`"
                )
            await asyncio.sleep(0.5)
