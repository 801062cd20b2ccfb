"""The GPU-pinned worker (system.md, "GPU-pinned worker grain"): a thin Ray shell around `Engine`.

One `Worker` holds the pipeline (model + tokenizers) once and one continuous-batching `Engine`.
A background thread runs `engine.step()` while there is work and sleeps on a condition when
idle; requests and cancellations reach it through an inbox, and committed frames go back to the
asyncio loop of the actor (`call_soon_threadsafe`). The engine thread decodes the frames a step
committed to pixels right after the step, all sessions' frames in one batch (each session has its
own `StreamingDecoder`, `decode_streams`): decoding in line with the steps keeps one compute thread
on the CPU instead of two fighting over the cores. Each request's `run` stream then PNG-encodes
its frames (in a small thread pool) and yields them to the session that asked (a Ray streaming
generator).

A request is a plain dict (what a session grain, `lumos.cluster.session`, sends):

    session_id   str
    prompt       str | None       tokenized here (the text tokenizer lives with the model)
    text_ids     list[int] | None used instead of prompt when given
    given        np.int32 [t0, h, w] | None  every committed frame of the session
    n_frames     int              frames to generate now
    steps, cfg   sampler settings
    duration, fps, text_frames    the video-length conditioning of the prompt prefix
    seed         int              the request's generator seed (see runtime.derive_seed)

The first yielded item is {"accepted": True, worker}: the worker holds the request. Every later
item is {index, codes (np.int32 [h, w]), pixels (PNG bytes: the latent frame's RGB
frames side by side, rgb_frames of them), rgb_frames, done, worker, committed_at (wall clock when
the engine step that committed the frame returned, before pixel decoding: for latency
measurements)}.

`drop(session_id)` forgets a session (its request and its KV cache in the engine's pool): the
session host calls it when the session is deleted or deactivated. `load()` reports what placement
needs (`sessions` counts running, waiting and about-to-be-added requests once; `capacity`, the
engine's batch size; `kv_bytes`). The actor runs with max_restarts=-1 (runtime.start_workers).

torch is imported inside the actor only: the API process imports this module to name the class.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from lumos.cluster.runtime import current_node, hostname
from lumos.devices import resolve_compile

log = logging.getLogger(__name__)


class RequestCancelled(RuntimeError):
    """The request was cancelled, or superseded by a newer request of the same session."""


_CANCELLED = object()  # put into a stream's queue when its request leaves the engine early


@dataclass(eq=False)
class _Stream:
    """The delivery end of one `run` call: an asyncio queue fed from the engine thread."""

    session_id: str
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the actor is exiting
            pass


class Worker:
    """Pipeline + engine + stepping thread; the methods are the actor's API."""

    def __init__(
        self,
        model: str | None = None,
        name: str | None = None,
        max_batch: int = 8,
        kv_budget_bytes: int | None = None,
        device: str | None = None,
        threads: int | None = None,
        batching: bool = True,
        dtype: str = "auto",
        resolution: str | None = None,
        compile: str = "off",
    ) -> None:
        import torch

        from lumos.engine import Engine
        from lumos.pipeline import Pipeline

        self.started_at = time.time()
        self.node = current_node()  # placement prefers a host's own node among equals
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if threads is None and self.device == "cpu":
            threads = _assigned_cpus()
        row_threads = 1
        if threads and self.device == "cpu":
            # the engine steps in its own thread, where OpenMP regions cost far more than in a
            # main thread: one intra-op thread, and each forward's rows split over `threads`
            # threads instead (lumos.sampler.RowThreads)
            torch.set_num_threads(1)
            row_threads = threads
        elif threads:
            torch.set_num_threads(threads)
        self.name = name or f"worker-{hostname()}-{os.getpid()}"
        self.model_name = "bundled" if model is None else str(model)
        self.pipe = Pipeline.from_folder(
            model, device=self.device, dtype=dtype, resolution=resolution
        )
        self.batching = bool(batching)
        self.max_batch = int(max_batch)
        self._engine_args = (self.pipe.model, self.pipe.layout, max_batch, kv_budget_bytes)
        self._row_threads = row_threads
        self.engine = Engine(*self._engine_args, batching=self.batching, row_threads=row_threads)
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._decoders: dict[str, Any] = {}  # session id -> StreamingDecoder; engine thread only
        self._active: dict[str, int] = {}  # session id -> open run() calls (event loop only)
        self._step_seconds = 0.0  # wall time spent in engine.step() (the step-latency metric)
        self._load = self._snapshot()
        self._stopped = False
        self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="lumos-io")  # PNG in, PNG out
        self._thread = threading.Thread(target=self._loop, name="lumos-engine", daemon=True)
        self._thread.start()
        self.compile_state = "off"  # off | compiling | ready | failed: <error>
        if resolve_compile(compile, self.device, next(self.pipe.model.parameters()).dtype):
            self.compile_state = "compiling"
            threading.Thread(target=self._compile, name="lumos-compile", daemon=True).start()

    def _compile(self) -> None:
        """Compile the frame steps beside the engine thread, which steps eagerly until the
        graphs for its batch sizes are warm (`lumos.model.CompiledLayers`)."""
        try:
            rows = (1, 2) if self._row_threads > 1 else (2, 4)  # a CFG pair: 1 row per thread
            self.pipe.compile_steps(rows)
        except Exception as e:  # serve on eagerly: compiling is an optimisation
            self.pipe.model.compiled = None
            self.compile_state = f"failed: {type(e).__name__}: {e}"[:300]
            log.warning("compiling the frame steps failed; serving eagerly: %s", e)
        else:
            self.compile_state = "ready"

    # -- the engine thread ------------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        with self._cv:
            self._inbox.append(command)
            self._cv.notify()

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():  # every engine tensor lives here: ~25% faster than no_grad
            self._run_loop()

    def _run_loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.engine.has_work and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                commands, self._inbox = self._inbox, []
            for command in commands:
                self._apply(command)
            if commands:
                self._load = self._snapshot()
            if self.engine.has_work:
                try:
                    started = time.perf_counter()
                    events = self.engine.step()
                    committed_at = time.time()
                    self._step_seconds += time.perf_counter() - started
                    events = [ev for ev in events if ev.session_id in self._streams]
                    rgb = self._pixels(events)
                except Exception as e:  # a broken step: fail every request, start clean
                    traceback.print_exc()
                    self._fail_all(RuntimeError(f"engine step failed on {self.name}: {e!r}"))
                    continue
                for ev, frames in zip(events, rgb):
                    self._streams[ev.session_id].put((ev, frames, committed_at))
                    if ev.done:
                        del self._streams[ev.session_id]
                        self._decoders.pop(ev.session_id, None)
            self._load = self._snapshot()

    def _pixels(self, events: list) -> list:
        """The new RGB frames [n, H, W, 3] of each committed frame: one decoder batch."""
        from lumos.tokenizers import decode_streams

        if not events:
            return []
        decoders = [self._decoders[ev.session_id] for ev in events]
        return decode_streams(decoders, [ev.codes for ev in events])

    def _apply(self, command: tuple) -> None:
        kind, sid = command[0], command[1]
        if kind == "add":
            req, stream = command[2], command[3]
            old = self._streams.pop(sid, None)
            if old is not None or sid in self.engine.scheduler:
                self.engine.cancel(sid)
                if old is not None:
                    old.put(_CANCELLED)
            try:
                self.engine.add(req)
                self._decoders[sid] = self._decoder(req.given)
            except Exception as e:
                self.engine.cancel(sid)
                stream.put(e)
                return
            self._streams[sid] = stream
        elif kind == "drop":  # the session was deleted or deactivated: free its KV cache
            current = self._streams.pop(sid, None)
            self.engine.cancel(sid)
            self.engine.pool.drop(sid)
            self._decoders.pop(sid, None)
            if current is not None:
                current.put(_CANCELLED)
        elif kind == "cancel":
            stream = command[2]
            current = self._streams.get(sid)
            if current is None or (stream is not None and current is not stream):
                return
            self.engine.cancel(sid)
            del self._streams[sid]
            self._decoders.pop(sid, None)
            current.put(_CANCELLED)

    def _fail_all(self, error: Exception) -> None:
        from lumos.engine import Engine

        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._decoders.clear()
        self.engine.close()  # its row threads, or every failure would leave a pool behind
        self.engine = Engine(
            *self._engine_args, batching=self.batching, row_threads=self._row_threads
        )

    def _snapshot(self) -> dict:
        st = self.engine.stats()
        return {
            "running": st["running"],
            "waiting": st["waiting"],
            "kv_bytes": st["kv_bytes"] + st["batch_kv_bytes"],
            "kv_budget_bytes": st["kv_budget_bytes"],
            "frames": st["frames"],
            "steps": st["steps"],
            "step_seconds": self._step_seconds,
            "cached_sessions": st["pool"]["sessions"],
        }

    # -- requests ---------------------------------------------------------------------------------
    def _engine_request(self, request: dict):
        import torch

        from lumos.engine import EngineRequest

        fps, duration = int(request.get("fps", 8)), int(request.get("duration", 1))
        text = request.get("text_ids")
        if text is None and request.get("prompt") is not None:
            # F of the template, fixed at creation by PipelineSettings.conditioning (records
            # written before it was stored: the official rule fps x duration)
            text_frames = int(request.get("text_frames") or duration * fps)
            text = self.pipe.text_ids(request["prompt"], text_frames, fps)
        given = request.get("given")
        if given is not None:
            given = torch.from_numpy(np.asarray(given, dtype=np.int64))  # [t0, h, w]
            if given.shape[0] == 0:
                given = None
        gen = torch.Generator(device=self.device).manual_seed(int(request["seed"]))
        sampler = self.pipe.sampler_config(int(request["steps"]), float(request["cfg"]))
        return EngineRequest(
            session_id=str(request["session_id"]),
            text_ids=None if text is None else list(text),
            given=given,
            n_frames=int(request["n_frames"]),
            sampler=sampler,
            duration=duration,
            fps=fps,
            generator=gen,
        )

    def _decoder(self, given):
        from lumos.tokenizers.base import StreamingDecoder

        decoder = StreamingDecoder(self.pipe.visual, window=2)
        if given is not None:
            decoder.prime(given)  # shown before: causal context, not decoded again
        return decoder

    @ray.method(num_returns="streaming")
    async def run(self, request: dict):
        """Generate the request's frames; yield one dict per committed frame, in order."""
        from lumos.video import encode_png

        loop = asyncio.get_running_loop()
        req = self._engine_request(request)
        sid = req.session_id
        stream = _Stream(sid, asyncio.Queue(), loop)
        self._active[sid] = self._active.get(sid, 0) + 1
        released = False

        def release() -> None:  # before the last yield: Ray may never resume the generator
            nonlocal released
            if not released:
                released = True
                self._active[sid] -= 1
                if not self._active[sid]:
                    del self._active[sid]

        finished = False
        self._submit(("add", sid, req, stream))
        try:
            yield {"accepted": True, "worker": self.name}  # the session is "running" from here
            while True:
                item = await stream.queue.get()
                if item is _CANCELLED:
                    finished = True
                    raise RequestCancelled(f"the request of session {sid} was cancelled")
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                item, rgb, committed_at = item  # FrameEvent, [n, H, W, 3] uint8, wall clock
                pixels = await loop.run_in_executor(self._io_pool, encode_png, rgb.numpy())
                n_rgb = int(rgb.shape[0])
                if item.done:
                    finished = True
                    release()
                yield {
                    "index": int(item.index),
                    "codes": item.codes.numpy().astype(np.int32),
                    "pixels": pixels,
                    "rgb_frames": n_rgb,
                    "done": bool(item.done),
                    "worker": self.name,
                    "committed_at": committed_at,
                }
                if item.done:
                    return
        finally:
            if not finished:
                self._submit(("cancel", sid, stream))
            release()

    async def cancel(self, session_id: str) -> bool:
        """Stop the session's request (its open stream ends with RequestCancelled)."""
        known = session_id in self._active
        self._submit(("cancel", session_id, None))
        return known

    async def drop(self, session_id: str) -> None:
        """Forget the session: stop its request and free its KV cache (KVPool.drop)."""
        self._submit(("drop", session_id))

    async def encode_image(self, png: bytes) -> dict:
        """An image (PNG/JPEG bytes) resized to the model's resolution -> its codes and pixels."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io_pool, self._encode_image, png)

    def _encode_image(self, png: bytes) -> dict:
        import torch

        from lumos.video import decode_image, encode_png

        s = self.pipe.settings
        arr = decode_image(png, (s.height, s.width))  # [H, W, 3], the CLI's resize rule
        codes = self.pipe.encode_image(torch.from_numpy(arr.copy()))  # [1, h, w]
        return {
            "codes": codes[0].numpy().astype(np.int32),
            "pixels": encode_png(arr),
            "rgb_frames": 1,
        }

    # -- introspection ----------------------------------------------------------------------------
    async def load(self) -> dict:
        """What placement needs: sessions in the engine (running, waiting, or about to be added),
        open streams, KV bytes."""
        with self._cv:
            pending = sum(1 for c in self._inbox if c[0] == "add")
        load = self._load
        return {
            "name": self.name,
            "node": self.node,
            "started_at": self.started_at,
            "sessions": load["running"] + load["waiting"] + pending,  # waiting is part of it
            "capacity": self.max_batch,
            "streams": len(self._active),
            "streaming": sorted(self._active),  # session ids with a request here
            **load,
        }

    async def info(self) -> dict:
        p, s = self.pipe, self.pipe.settings
        return {
            "name": self.name,
            "host": hostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "model": self.model_name,
            "grid": [p.layout.h, p.layout.w],
            "height": s.height,
            "width": s.width,
            "temporal": p.visual.temporal,
            "fps": s.fps,
            "duration": s.duration,
            "frames": s.frames,
            "steps": s.steps,
            "cfg": s.cfg_video,
            "max_frames": s.max_frames,
            "settings": s.to_dict(),  # the folder's defaults: the prompt rule lives there
            "codebook_size": p.visual.codebook_size,
            "batching": self.batching,
            "dtype": str(next(p.model.parameters()).dtype).removeprefix("torch."),
            "compile": self.compile_state,
            "started_at": self.started_at,
        }

    async def stop(self) -> None:
        """Stop the engine thread (before the actor is killed)."""
        with self._cv:
            self._stopped = True
            self._cv.notify()


def _assigned_cpus() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:
        cpus = 1
    return max(1, int(cpus))


WorkerActor = ray.remote(max_concurrency=1000)(Worker)
