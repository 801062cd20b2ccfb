"""`LumosClient`: what the API process uses to talk to the cluster (async, no tensors, no HTTP).

It connects to Ray (or starts a local one), opens the session store, makes sure workers exist,
validates requests against the limits (ValueError with a clear message: the API answers 4xx),
and routes calls to the session actors ("session:<id>", got-or-created on demand). Reads that
need no actor (stored frames, finished sessions, lists, mp4) go to the store directly, so they
do not reactivate deactivated sessions.

Live frames (`subscribe`): first the stored frames from the store, then the session actor's
long-poll `poll(after_seq, timeout)`, which answers as soon as a newer frame is committed. Any
number of subscribers in any number of API processes poll the same actor; each keeps its own
cursor, so every subscriber gets frames from_seq.. exactly once and in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import logging
import math
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import ray

from lumos.cluster import runtime
from lumos.cluster.runtime import ACTOR_GONE_ERRORS, ServeConfig
from lumos.cluster.session import SessionActor, SessionDeactivating, frame_dict, state_dict
from lumos.store import ACTIVE_STATUSES, FrameRecord, SessionMeta, SessionNotFound, open_store

log = logging.getLogger("lumos.client")

WORKER_START_TIMEOUT_S = 600.0  # a new worker loads its model before it answers
WORKER_REFRESH_S = 5.0
POLL_S = 10.0  # long-poll timeout of subscribe
CALL_RETRIES = 8


class SessionNotFoundError(SessionNotFound, KeyError):
    """No session with that id (catch it as SessionNotFound or KeyError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "session not found"


class NoWorkersError(RuntimeError):
    """No worker is registered in the cluster (start one with `lumos worker`)."""


class LimitExceeded(ValueError):
    """A capacity limit (e.g. max_sessions) is reached: retry later (HTTP 429)."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LumosClient:
    """Async facade of the cluster for the API; create it with `await LumosClient.start(cfg)`."""

    def __init__(self, cfg: ServeConfig, store, owns_ray: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.owns_ray = owns_ray
        self._handles: dict[str, Any] = {}
        self._workers: dict[str, dict] = {}  # name -> info + load
        self._model: dict | None = None  # info() of a worker: resolution, defaults
        self._refresher: asyncio.Task | None = None
        self._closed = False

    # -- life -------------------------------------------------------------------------------------
    @classmethod
    async def start(cls, cfg: ServeConfig) -> LumosClient:
        """Connect to (or start) Ray, open the store, ensure workers, learn the model settings."""
        owns = runtime.connect(cfg)
        client = cls(cfg, open_store(cfg.store_url), owns)
        try:
            if cfg.workers > 0 and not runtime.list_workers(cfg.namespace):
                runtime.start_local_workers(cfg)
            await client.refresh_workers(timeout_s=WORKER_START_TIMEOUT_S)
        except BaseException:
            await client.close()
            raise
        client._refresher = asyncio.get_running_loop().create_task(client._refresh_loop())
        return client

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

    async def refresh_workers(self, timeout_s: float = 10.0) -> list[dict]:
        """Ask every registered worker for its info and load (dead ones are dropped)."""
        names = await asyncio.to_thread(runtime.list_workers, self.cfg.namespace)

        async def one(name: str) -> dict | None:
            handle = runtime.get_actor(name, self.cfg.namespace)
            if handle is None:
                return None
            try:
                known = self._workers.get(name)
                load = await asyncio.wait_for(handle.load.remote(), timeout_s)
                if known and known.get("started_at") == load.get("started_at"):
                    info = known
                else:  # new, or restarted under the same name
                    info = await asyncio.wait_for(handle.info.remote(), timeout_s)
            except (TimeoutError, *ACTOR_GONE_ERRORS):
                return None
            return {**info, "name": name, "alive": True, "load": load}

        found = await asyncio.gather(*(one(n) for n in names))
        self._workers = {w["name"]: w for w in found if w is not None}
        if self._workers and self._model is None:
            self._model = next(iter(self._workers.values()))
        return self.workers()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(WORKER_REFRESH_S)
            try:
                await self.refresh_workers()
            except Exception:
                log.exception("worker refresh failed")

    async def _model_info(self) -> dict:
        if self._model is None:
            await self.refresh_workers(timeout_s=WORKER_START_TIMEOUT_S)
        if self._model is None:
            raise NoWorkersError("no worker is registered: start one with `lumos worker`")
        return self._model

    async def _running_sessions(self) -> int:
        await self.refresh_workers()
        return sum(int(w["load"].get("sessions", 0)) for w in self._workers.values())

    async def _check_capacity(self) -> None:
        limit = self.cfg.limits.max_sessions
        running = await self._running_sessions()
        if running >= limit:
            raise LimitExceeded(
                f"too many sessions are generating right now ({running}, limit {limit}); "
                "try again later"
            )

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

    # -- session actors ---------------------------------------------------------------------------
    def _handle(self, session_id: str):
        handle = self._handles.get(session_id)
        if handle is None:
            handle = SessionActor.options(
                name=runtime.session_actor_name(session_id),
                namespace=self.cfg.namespace,
                get_if_exists=True,
                lifetime="detached",
            ).remote(session_id, self.cfg.store_url, self.cfg.namespace, self.cfg.session_idle_s)
            self._handles[session_id] = handle
        return handle

    async def _call(self, session_id: str, method: str, *args: Any) -> Any:
        """Call a session actor method, re-activating the actor if it is gone or exiting."""
        delay = 0.05
        for _ in range(CALL_RETRIES):
            handle = self._handle(session_id)
            try:
                return await getattr(handle, method).remote(*args)
            except (SessionDeactivating, *ACTOR_GONE_ERRORS):
                self._handles.pop(session_id, None)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
            except SessionNotFound as e:
                self._handles.pop(session_id, None)
                raise SessionNotFoundError(f"session {session_id!r} does not exist") from e
        raise RuntimeError(f"session {session_id}: its actor could not be reached")

    async def _meta(self, session_id: str) -> SessionMeta:
        meta = await self.store.get_session(session_id)
        if meta is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist")
        return meta

    # -- validation -------------------------------------------------------------------------------
    def _check_prompt(self, prompt: Any, required: bool = True) -> None:
        if prompt is None and not required:
            return
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        limit = self.cfg.limits.max_prompt_chars
        if len(prompt) > limit:
            raise ValueError(f"prompt is {len(prompt)} characters long; the limit is {limit}")

    def _check_frames(self, frames: Any, have: int = 0) -> int:
        lim = self.cfg.limits
        if isinstance(frames, bool) or not isinstance(frames, int):
            raise ValueError(f"frames must be an integer, got {frames!r}")
        if not 1 <= frames <= lim.max_frames_per_request:
            raise ValueError(
                f"frames must be between 1 and {lim.max_frames_per_request} per request, "
                f"got {frames}"
            )
        if have + frames > lim.max_frames_per_session:
            raise ValueError(
                f"a session holds at most {lim.max_frames_per_session} frames; it has {have} "
                f"and {frames} more were requested"
            )
        return frames

    def _check_sampler(self, steps: Any, cfg_scale: Any, seed: Any) -> None:
        lim = self.cfg.limits
        if steps is not None:
            lo, hi = lim.steps
            if isinstance(steps, bool) or not isinstance(steps, int) or not lo <= steps <= hi:
                raise ValueError(f"steps must be an integer between {lo} and {hi}, got {steps!r}")
        if cfg_scale is not None:
            lo, hi = lim.cfg
            ok = isinstance(cfg_scale, int | float) and not isinstance(cfg_scale, bool)
            if not ok or not math.isfinite(cfg_scale) or not lo <= cfg_scale <= hi:
                raise ValueError(
                    f"cfg_scale must be a number between {lo} and {hi}, got {cfg_scale!r}"
                )
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")

    def _check_image(self, image_png: Any) -> None:
        if not isinstance(image_png, bytes | bytearray | memoryview):
            raise ValueError("image must be bytes (a PNG or JPEG file)")
        limit = self.cfg.limits.max_image_bytes
        if len(image_png) > limit:
            raise ValueError(f"image is {len(image_png)} bytes; the limit is {limit} bytes")
        from PIL import Image

        try:
            with Image.open(io.BytesIO(bytes(image_png))) as im:
                im.verify()
        except Exception:
            raise ValueError("image is not a decodable PNG or JPEG file") from None

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
        self._check_prompt(prompt)
        have = 1 if image_png is not None else 0
        self._check_frames(frames, have)
        self._check_sampler(steps, cfg_scale, seed)
        if image_png is not None:
            self._check_image(image_png)
        if not isinstance(owner, str):
            raise ValueError("owner must be a string")
        model = await self._model_info()
        await self._check_capacity()

        fps, temporal = int(model["fps"]), int(model["temporal"])
        total = have + frames
        rgb = 1 + temporal * (total - 1)
        settings = {
            "steps": int(steps if steps is not None else model["steps"]),
            "cfg": float(cfg_scale if cfg_scale is not None else model["cfg"]),
            "seed": int(seed if seed is not None else secrets.randbelow(2**31)),
            "fps": fps,
            "duration": int(model.get("duration") or max(1, round(rgb / fps))),
            "source": "image" if image_png is not None else "text",
            "target": 0,
            "height": int(model["height"]),
            "width": int(model["width"]),
            "grid": list(model["grid"]),
            "temporal": temporal,
            "model": model["model"],
        }
        first = await self._encode_image(bytes(image_png)) if image_png is not None else None
        session_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(32)
        meta = SessionMeta(
            session_id=session_id,
            token_hash=token_hash(token),
            owner=owner,
            settings=settings,
            prompts=[[0, prompt]],
        )
        await self.store.create_session(meta)
        if first is not None:
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
        self._check_prompt(prompt, required=False)
        meta = await self._meta(session_id)
        self._check_frames(frames, meta.n_frames)
        if meta.status in ACTIVE_STATUSES:
            state = await self._call(session_id, "state")
            if state["status"] in ACTIVE_STATUSES:
                raise ValueError(
                    f"session {session_id} is already generating; wait until it is idle"
                )
        await self._check_capacity()
        return await self._extend(session_id, frames, prompt)

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
        while True:  # live, through the session actor's long poll
            try:
                res = await self._call(session_id, "poll", nxt - 1, POLL_S, follow)
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

    async def video_mp4(self, session_id: str) -> bytes:
        """Every stored frame as one mp4 (at the session's fps)."""
        meta = await self._meta(session_id)
        records = await self.frames(session_id)
        if not records:
            raise ValueError(f"session {session_id} has no frames yet")
        fps = int(meta.settings.get("fps", 8))
        return await asyncio.to_thread(_mp4, records, fps)

    async def delete_session(self, session_id: str) -> None:
        """Stop the session, kill its actor and remove it and its frames from the store."""
        self._handles.pop(session_id, None)
        name = runtime.session_actor_name(session_id)
        handle = runtime.get_actor(name, self.cfg.namespace)
        if handle is not None:
            try:
                await asyncio.wait_for(handle.shutdown.remote(), 10)
            except Exception:
                pass
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
        await self.store.delete_session(session_id)


def _split(image: np.ndarray, n: int) -> list[np.ndarray]:
    """The n frames of a PNG strip/grid written by video.encode_png (make_grid layout)."""
    if n <= 1:
        return [image]
    cols = n if n <= 8 else 8
    rows = -(-n // cols)
    h, w = image.shape[0] // rows, image.shape[1] // cols
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        out.append(image[r * h : (r + 1) * h, c * w : (c + 1) * w])  # [h, w, 3]
    return out


def _mp4(records: list[FrameRecord], fps: int) -> bytes:
    from lumos.video import decode_png, mp4_bytes

    frames: list[np.ndarray] = []
    for rec in records:
        if rec.pixels:
            frames += _split(decode_png(rec.pixels), int(rec.meta.get("rgb_frames", 1)))
    if not frames:
        raise ValueError("the session's frames hold no pixels")
    return mp4_bytes(np.stack(frames), fps)
