"""`LumosClient`: what the API process uses to talk to the cluster (async, no tensors, no HTTP).

It connects to Ray (or starts a local one), opens the session store, makes sure workers and
session hosts exist, validates requests against the limits (ValueError with a clear message: the
API answers 4xx), and routes calls on a session to the session host that owns it
(lumos.cluster.host: sha1(id) mod the cluster's host count), which activates its grain on
demand. Reads that need no grain (stored frames, finished sessions, lists, mp4) go to the store
directly, so they do not reactivate deactivated sessions. No live worker: `create_session`
raises NoWorkersError and `health()` says "unavailable" (the API answers 503 with the reason).

Live frames (`subscribe`): first the stored frames from the store, then the host's long-poll
`poll(id, after_seq, timeout)`, which answers as soon as a newer frame is committed. Any number
of subscribers in any number of API processes poll the same host; each keeps its own cursor, so
every subscriber gets frames from_seq.. exactly once and in order. Polls do not keep a grain
active.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import ray

from lumos.cluster import runtime
from lumos.cluster.host import get_host, shard_of
from lumos.cluster.placement import worker_load
from lumos.cluster.runtime import ACTOR_GONE_ERRORS, ServeConfig
from lumos.cluster.session import frame_dict, state_dict
from lumos.settings import PipelineSettings
from lumos.store import (
    ACTIVE_STATUSES,
    AdmissionRefused,
    FrameRecord,
    SessionBusy,
    SessionMeta,
    SessionNotFound,
    open_store,
)
from lumos.video import Mp4Writer, decode_png, split_grid

log = logging.getLogger("lumos.client")

WORKER_START_TIMEOUT_S = 600.0  # a new worker loads its model before it answers
WORKER_REFRESH_S = 2.0
LIVE_TIMEOUT_S = 3.0  # a worker that does not answer load() within this is not live
POLL_S = 10.0  # long-poll timeout of subscribe
CALL_RETRIES = 8


class SessionNotFoundError(SessionNotFound, KeyError):
    """No session with that id (catch it as SessionNotFound or KeyError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "session not found"


class NoWorkersError(RuntimeError):
    """No worker is registered in the cluster (start one with `lumos worker`)."""


# A capacity limit is reached (HTTP 429): the store's atomic admission refused the request.
LimitExceeded = AdmissionRefused


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LumosClient:
    """Async facade of the cluster for the API; create it with `await LumosClient.start(cfg)`."""

    def __init__(self, cfg: ServeConfig, store, owns_ray: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.owns_ray = owns_ray
        self._hosts: list[Any] = []  # session host handles, index = shard (runtime.host_name)
        self._workers: dict[str, dict] = {}  # name -> info + load
        self._model: dict | None = None  # info() of a worker: resolution, defaults
        self._refresher: asyncio.Task | None = None
        self._refreshed = 0.0
        self._closed = False

    # -- life -------------------------------------------------------------------------------------
    @classmethod
    async def start(cls, cfg: ServeConfig) -> LumosClient:
        """Connect to (or start) Ray, open the store, ensure workers and session hosts, learn the
        model settings."""
        owns = runtime.connect(cfg)
        client = cls(cfg, open_store(cfg.store_url), owns)
        try:
            if cfg.workers > 0 and not runtime.list_workers(cfg.namespace):
                runtime.start_local_workers(cfg)
            await client._start_hosts()
            await client.refresh_workers(timeout_s=WORKER_START_TIMEOUT_S)
        except BaseException:
            await client.close()
            raise
        client._refresher = asyncio.get_running_loop().create_task(client._refresh_loop())
        return client

    async def _start_hosts(self) -> None:
        """Get or create the session hosts; host 0 says how many the cluster has."""
        cfg = self.cfg
        wanted = cfg.session_hosts or max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
        first = get_host(cfg.store_url, cfg.namespace, 0, wanted, cfg.session_idle_s)
        n = int(await first.shards.remote())
        self._hosts = [first] + [
            get_host(cfg.store_url, cfg.namespace, i, n, cfg.session_idle_s) for i in range(1, n)
        ]

    def host(self, session_id: str):
        """The handle of the session host that owns session_id (see lumos.cluster.host)."""
        return self._hosts[shard_of(session_id, len(self._hosts))]

    async def hosts(self) -> list[dict]:
        """Each session host's stats (active grains, RSS, node); an unreachable one is left out."""
        out = await asyncio.gather(
            *(asyncio.wait_for(h.stats.remote(), 3) for h in self._hosts), return_exceptions=True
        )
        return [s for s in out if isinstance(s, dict)]

    async def close(self) -> None:
        """Close the store; shut Ray down if this client started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except BaseException:
                pass
        await self.store.close()
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()

    async def __aenter__(self) -> LumosClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- workers ----------------------------------------------------------------------------------
    def workers(self) -> list[dict]:
        """The registered workers: info (device, model, grid, ...) and their last load."""
        return [dict(w) for w in self._workers.values()]

    async def refresh_workers(self, timeout_s: float = LIVE_TIMEOUT_S) -> list[dict]:
        """Ask every registered worker for its info and load (dead or silent ones are dropped);
        the model settings sessions are created with come from a live worker (review 9)."""
        names = await asyncio.to_thread(runtime.list_workers, self.cfg.namespace)

        async def one(name: str) -> dict | None:
            handle = runtime.get_actor(name, self.cfg.namespace)
            if handle is None:
                return None
            try:
                known = self._workers.get(name)
                load = await asyncio.wait_for(worker_load(handle, timeout_s), timeout_s + 1)
                if load is None:
                    return None
                if known and known.get("started_at") == load.get("started_at"):
                    info = known
                else:  # new, or restarted under the same name
                    info = await asyncio.wait_for(handle.info.remote(), timeout_s)
            except (TimeoutError, *ACTOR_GONE_ERRORS):
                return None
            return {**info, "name": name, "alive": True, "load": load}

        found = await asyncio.gather(*(one(n) for n in names))
        self._workers = {w["name"]: w for w in found if w is not None}
        self._model = self._workers[min(self._workers)] if self._workers else None
        models = {w.get("model") for w in self._workers.values()}
        if len(models) > 1:
            log.warning("workers serve different models: %s", sorted(map(str, models)))
        self._refreshed = time.monotonic()
        return self.workers()

    async def live_workers(self, max_age_s: float = 1.0) -> list[dict]:
        """The live workers, refreshed unless the last refresh is younger than max_age_s."""
        if time.monotonic() - self._refreshed > max_age_s:
            await self.refresh_workers()
        return self.workers()

    async def health(self) -> dict:
        """{"status": "ok" | "unavailable", "reason", "workers", "hosts"} (no live worker: the
        API answers 503 with the reason)."""
        workers = await self.live_workers()
        out: dict[str, Any] = {"status": "ok", "reason": None, "workers": workers}
        if not workers:
            out["status"] = "unavailable"
            out["reason"] = "no live worker: start one with `lumos worker` (or wait for a restart)"
        out["hosts"] = await self.hosts()
        return out

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(WORKER_REFRESH_S)
            try:
                await self.refresh_workers()
            except Exception:
                log.exception("worker refresh failed")

    async def _model_info(self) -> dict:
        """A live worker's model settings; NoWorkersError (HTTP 503) when none is live now."""
        await self.live_workers()
        if self._model is None:
            raise NoWorkersError(
                "no live worker: start one with `lumos worker` (a restarting one is back within "
                "seconds); try again"
            )
        return self._model

    async def _encode_image(self, png: bytes) -> dict:
        for _ in range(3):
            live = sorted(self._workers.values(), key=lambda w: w["load"].get("sessions", 0))
            if not live:
                break
            handle = runtime.get_actor(live[0]["name"], self.cfg.namespace)
            if handle is not None:
                try:
                    return await handle.encode_image.remote(png)
                except ACTOR_GONE_ERRORS:
                    pass
            await self.refresh_workers()
        raise NoWorkersError("no live worker to encode the image")

    # -- session hosts ----------------------------------------------------------------------------
    async def _host_call(self, session_id: str, method: str, *args: Any) -> Any:
        """Call a session host method, retrying while the host restarts."""
        delay = 0.05
        for _ in range(CALL_RETRIES):
            try:
                return await getattr(self.host(session_id), method).remote(session_id, *args)
            except ACTOR_GONE_ERRORS:
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
            except SessionNotFound as e:
                raise SessionNotFoundError(f"session {session_id!r} does not exist") from e
        raise RuntimeError(f"session {session_id}: its session host could not be reached")

    async def _call(self, session_id: str, method: str, *args: Any) -> Any:
        """Call the session grain's method ("state", "extend", "cancel") on its host."""
        return await self._host_call(session_id, "call", method, *args)

    async def _meta(self, session_id: str) -> SessionMeta:
        meta = await self.store.get_session(session_id)
        if meta is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist")
        return meta

    # -- sessions ---------------------------------------------------------------------------------
    async def create_session(
        self,
        prompt: str,
        frames: int,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        image_png: bytes | None = None,
        owner: str = "",
    ) -> tuple[dict, str]:
        """Create a session and start generating `frames` frames; returns (state, bearer token).

        With image_png (image-to-video) the image, resized to the model resolution and encoded on
        a worker, is frame 0 and `frames` frames follow it.
        """
        limits = self.cfg.limits  # the one set of input checks (lumos.cluster.limits)
        prompt = limits.check_prompt(prompt)
        have = 1 if image_png is not None else 0
        limits.check_frames(frames, have)
        limits.check_sampler(steps, cfg_scale, seed)
        if image_png is not None:
            limits.check_image(image_png)
        if not isinstance(owner, str):
            raise ValueError("owner must be a string")
        model = await self._model_info()

        temporal = int(model["temporal"])
        total = have + frames
        rgb = 1 + temporal * (total - 1)  # the clip's RGB length, which the prompt prefix states
        defaults = PipelineSettings.from_dict(model["settings"])
        cond = defaults.conditioning(rgb)  # the one rule (one RGB frame: an image)
        settings = {
            "steps": int(steps if steps is not None else model["steps"]),
            "cfg": float(
                cfg_scale
                if cfg_scale is not None
                else (defaults.cfg_image if rgb == 1 else defaults.cfg_video)
            ),
            "seed": int(seed if seed is not None else secrets.randbelow(2**31)),
            "fps": cond.fps,
            "duration": cond.duration,
            "text_frames": cond.text_frames,
            "source": "image" if image_png is not None else "text",
            "target": 0,
            "height": int(model["height"]),
            "width": int(model["width"]),
            "grid": list(model["grid"]),
            "temporal": temporal,
            "model": model["model"],
        }
        session_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(32)
        meta = SessionMeta(
            session_id=session_id,
            token_hash=token_hash(token),
            owner=owner,
            settings=settings,
            prompts=[[0, prompt]],
            # not "queued" yet: the first extend below queues it (a session activated while
            # "queued" with nothing to do is set "done", which would end its admission)
            status="done",
        )
        # ADMISSION HOOK: store + reserve in one atomic step (AdmissionRefused: nothing stored)
        await self.store.create_session(meta, limits.admission())
        try:
            if image_png is not None:
                first = await self._encode_image(bytes(image_png))
                codes = np.asarray(first["codes"], dtype=np.int32)
                await self.store.append_frame(
                    FrameRecord(
                        session_id,
                        0,
                        codes.astype("<i4").tobytes(),
                        codes.shape,
                        first["pixels"],
                        {"source": "image", "prompt": 0, "rgb_frames": 1},
                    )
                )
            state = await self._extend(session_id, frames, None)
        except BaseException:
            # the caller gets no token: leave nothing behind (this also releases the place)
            await asyncio.shield(self.delete_session(session_id))
            raise
        return state, token

    async def verify(self, session_id: str, token: str) -> bool:
        """Whether token is the session's bearer token (constant-time compare of sha256)."""
        if not isinstance(token, str) or not isinstance(session_id, str):
            return False
        meta = await self.store.get_session(session_id)
        if meta is None:
            return False
        return hmac.compare_digest(token_hash(token), meta.token_hash)

    async def extend(self, session_id: str, frames: int, prompt: str | None = None) -> dict:
        """Generate `frames` more frames (with a new prompt from the next frame on, if given)."""
        limits = self.cfg.limits
        prompt = limits.check_prompt(prompt, required=False)
        meta = await self._meta(session_id)
        limits.check_frames(frames, meta.n_frames)
        busy = f"session {session_id} is already generating; wait until it is done"
        if meta.status in ACTIVE_STATUSES:
            state = await self._call(session_id, "state")
            if state["status"] in ACTIVE_STATUSES:
                raise ValueError(busy)
        # ADMISSION HOOK: reserve a place atomically (AdmissionRefused: nothing changed)
        try:
            await self.store.reserve(session_id, limits.admission())
        except SessionBusy:
            raise ValueError(busy) from None
        except SessionNotFound as e:
            raise SessionNotFoundError(f"session {session_id!r} does not exist") from e
        try:
            return await self._extend(session_id, frames, prompt)
        except BaseException:
            await asyncio.shield(self.store.release(session_id))
            raise

    async def _extend(self, session_id: str, frames: int, prompt: str | None) -> dict:
        result = await self._call(session_id, "extend", frames, prompt)
        if "refused" in result:
            raise ValueError(result["refused"])
        return result

    async def cancel(self, session_id: str) -> dict:
        """Stop a running generation (frames committed so far stay)."""
        await self._meta(session_id)
        return await self._call(session_id, "cancel")

    async def state(self, session_id: str) -> dict:
        """id, status, n_frames, target, prompts, settings, worker, error, created/updated_at."""
        meta = await self._meta(session_id)
        if meta.status in ACTIVE_STATUSES:  # ask the actor (it resumes if its process was lost)
            return await self._call(session_id, "state")
        return state_dict(meta)

    async def frames(
        self, session_id: str, start: int = 0, end: int | None = None
    ) -> list[FrameRecord]:
        """Stored frames start <= seq < end (end None: all)."""
        try:
            return await self.store.get_frames(session_id, start, end)
        except SessionNotFound as e:
            raise SessionNotFoundError(f"session {session_id!r} does not exist") from e

    async def subscribe(
        self, session_id: str, from_seq: int = 0, follow: bool = False
    ) -> AsyncIterator[dict]:
        """Frames from_seq.. exactly once, in order: stored ones first, then live.

        Each item is {seq, pixels (PNG bytes), shape, meta}. It ends when the session is not
        generating and every frame up to n_frames was sent, unless follow (then it waits for
        future extends until the caller stops iterating).
        """
        await self._meta(session_id)
        nxt = max(0, int(from_seq))
        while True:  # stored frames, in chunks
            try:
                records = await self.store.get_frames(session_id, nxt, nxt + 32)
            except SessionNotFound:
                return
            if not records or records[0].seq != nxt:
                break
            for rec in records:
                if rec.seq != nxt:
                    break
                yield frame_dict(rec)
                nxt += 1
        meta = await self.store.get_session(session_id)
        if meta is None or (
            meta.status not in ACTIVE_STATUSES and nxt >= meta.n_frames and not follow
        ):
            return
        while True:  # live, through the session host's long poll
            try:
                res = await self._host_call(session_id, "poll", nxt - 1, POLL_S, follow)
            except SessionNotFoundError:
                return
            for frame in res["frames"]:
                if frame["seq"] == nxt:
                    yield frame
                    nxt += 1
            if not follow and res["status"] not in ACTIVE_STATUSES and nxt >= res["n_frames"]:
                return

    async def list_sessions(self, owner: str) -> list[dict]:
        """The owner's sessions, newest first."""
        return [state_dict(m) for m in await self.store.list_sessions(owner)]

    async def video_mp4(self, session_id: str, page: int = 64) -> AsyncIterator[bytes]:
        """Every stored frame as one mp4 at the session's fps, in chunks: `page` frame records
        at a time are read from the store and encoded as they come (video.Mp4Writer), so a long
        video is never held whole, neither its frames nor its file."""
        meta = await self._meta(session_id)
        writer = Mp4Writer(int(meta.settings.get("fps", 8)))
        start = 0
        while records := await self.frames(session_id, start, start + page):
            chunk = await asyncio.to_thread(encode_records, writer, records)
            if chunk:
                yield chunk
            start += len(records)
        if not writer.frames:
            raise ValueError(f"session {session_id} has no frames with pixels yet")
        yield await asyncio.to_thread(writer.close)

    async def delete_session(self, session_id: str) -> None:
        """Stop the session, free its KV cache on its worker, remove it and its frames."""
        try:
            await asyncio.wait_for(self._host_call(session_id, "delete"), 30)
        except Exception:
            log.warning(
                "session %s: its host did not delete it; removing it from the store", session_id
            )
        await self.store.delete_session(session_id)


def encode_records(writer: Mp4Writer, records: list[FrameRecord]) -> bytes:
    """Add the RGB frames of stored frame records (PNG strips of rgb_frames frames) to an mp4
    being written; returns the bytes it produced."""
    out = []
    for rec in records:
        if rec.pixels:
            strip = decode_png(rec.pixels)  # [H, n*W, 3] (a make_grid of the latent's frames)
            out.append(writer.add(np.stack(split_grid(strip, int(rec.meta.get("rgb_frames", 1))))))
    return b"".join(out)
