"""The in-worker serving engine: continuous batching of per-frame MaskGIT steps (method.md 7).

Plain PyTorch (no Ray, no Redis, no HTTP). Every `step()` is ONE diffusion step of every running
session, in ONE model forward: the current frame blocks of all sessions (conditional and
unconditional rows) are stacked into a batch [R, B_f] that runs against the sessions' KV rows of
different lengths (`key_mask` hides each row's padding). Each session is a
`lumos.sampler.VideoState`, the one per-frame mechanism `lumos.sampler.generate` drives too: it
says what to run (block tokens and positions, prefill and commit tokens) and decodes its own
rows' logits with its own step index, steps, temperature and generator, so a session's frames do
not depend on its batch mates and a session alone reproduces `generate` exactly. Sessions that
finish step S-1 commit their frame with history masking in one more forward (one for all
sessions committing in the same step) and emit a `FrameEvent`; then they start their next frame
(sliding their rolling window first when it is due: one prefill of that session's rows, written
over its rows of the batch storage) or leave.
New sessions are admitted by the `Scheduler` at step boundaries (KV budget of the `KVPool`),
prefilled from their prompt and `given` frames (or reuse their warm cache), and start at step 0
while the others are mid-frame.

Batch KV storage (batching=True). The running sessions' rows live in ONE persistent tensor pair
[n_layers, rows, H_kv, C, d] (`_BatchCache`) and each step's forward runs on a view of its first
R rows, so a step copies no cache at all. Only membership changes copy, and only the session
concerned: joining copies the newcomer's rows in after the last row (a fresh prefill, or its
warm cache taken from the pool, which then holds no tensor, so rows are never held twice);
leaving copies its rows out (`select`, kept as an idle pool entry for the warm fast path) and
fills the hole with the last session's rows (or shifts the tail down when row counts differ).
The storage grows by doubling (rows) or to the longest session's final length (C), and is freed
when no session runs. Commits run on a view of the committing rows (a slice when contiguous,
else an index gather). Cost: all rows share C = the longest running session's final length,
so the storage can exceed the sum of the pool's per-session reservations (leave headroom).
Measured on CPU (1 thread) with the `fmnist` preset (8x8 grid, 8 sessions x 2 rows, 16-frame
contexts): re-stacking every session's cache with `KVCache.stack` takes ~150 ms, about 45 % of
the ~330 ms step forward, and would be paid every step; the persistent storage pays nothing per
step and one session's rows per membership change.

batching=False runs each session's step as its own forward on its own cache (the reference the
benchmark compares against).

After a step that committed frames the engine hands freed heap pages back to the OS
(`heap.HeapTrim`, at most once a second), so a worker's RSS stays flat over long sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lumos.config import SamplerConfig
from lumos.engine.heap import HeapTrim
from lumos.engine.pool import KVPool
from lumos.engine.scheduler import Scheduler
from lumos.kvcache import KVCache
from lumos.sampler import (
    RowThreads,
    VideoState,
    block_forward,
    cache_tokens,
    code_logits,
    prefill,
)
from lumos.sequence import Layout


@dataclass
class EngineRequest:
    """Frames to generate now for one session.

    `given` holds the frames already committed (an I2V image, or the session's stored frames
    when it is continued): the engine reuses the session's warm cache when it holds exactly
    these, else rebuilds it by one prefill. `generator` is the session's own RNG (on the
    model's device); None draws a seed from torch's global RNG.
    """

    session_id: str
    text_ids: list[int] | None
    given: Tensor | None = None  # [t0, h, w] codes
    n_frames: int = 1
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    duration: int = 2
    fps: int = 12
    generator: torch.Generator | None = None


@dataclass
class FrameEvent:
    """One committed latent frame of a session (index = frame number in the session's video)."""

    session_id: str
    index: int
    codes: Tensor  # [h, w] long, on the CPU
    done: bool  # the last frame of this request


class _BatchCache:
    """The running sessions' KV rows in one persistent storage; `view` covers the used rows."""

    def __init__(self, model_cfg, max_rows: int, dtype: torch.dtype, device) -> None:
        self.cfg, self.max_rows, self.dtype, self.device = model_cfg, max_rows, dtype, device
        self._k: Tensor | None = None  # [n_layers, rows, H_kv, C, d]
        self._v: Tensor | None = None
        self.slots: dict[str, tuple[int, int]] = {}  # session id -> (first row, n rows)
        self.view: KVCache | None = None

    @property
    def used(self) -> int:
        return sum(n for _, n in self.slots.values())

    @property
    def nbytes(self) -> int:
        return 0 if self._k is None else 2 * self._k.numel() * self._k.element_size()

    def _lengths(self) -> list[int]:
        return [] if self.view is None else list(self.view.lengths)

    def _set_view(self, lengths: list[int]) -> None:
        r = len(lengths)
        self.view = KVCache.view(self._k[:, :r], self._v[:, :r], lengths)

    def _grow(self, rows: int, capacity: int) -> None:
        c = self.cfg
        shape = (c.n_layers, rows, c.n_kv_heads, capacity, c.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        lengths = self._lengths()
        if lengths:
            r, n = len(lengths), max(lengths)
            k[:, :r, :, :n] = self._k[:, :r, :, :n]
            v[:, :r, :, :n] = self._v[:, :r, :, :n]
        self._k, self._v = k, v
        if lengths:
            self._set_view(lengths)

    def attach(self, session_id: str, cache: KVCache, capacity: int) -> None:
        """Copy a session's rows in after the last row (room for `capacity` tokens per row)."""
        n, used = cache.batch, self.used
        rows = 0 if self._k is None else self._k.shape[1]
        cap = 0 if self._k is None else self._k.shape[3]
        if used + n > rows or capacity > cap:
            if used + n > rows:
                rows = max(used + n, min(2 * rows, self.max_rows))
            self._grow(rows, max(capacity, cap))
        m = max(cache.lengths)
        self._k[:, used : used + n, :, :m] = cache.k[:, :, :, :m]
        self._v[:, used : used + n, :, :m] = cache.v[:, :, :, :m]
        self.slots[session_id] = (used, n)
        self._set_view(self._lengths() + list(cache.lengths))

    def replace(self, session_id: str, cache: KVCache) -> None:
        """Overwrite a session's rows with a rebuilt cache (its window slid)."""
        a, n = self.slots[session_id]
        if cache.batch != n or max(cache.lengths) > self._k.shape[3]:
            raise ValueError("a rebuilt cache must have the session's rows and fit the storage")
        self.view.assign(a, cache)

    def detach(self, session_id: str) -> KVCache:
        """Copy a session's rows out (trimmed) and close the hole it leaves."""
        a, n = self.slots.pop(session_id)
        out = self.view.select(list(range(a, a + n)))
        lengths, used = self._lengths(), len(self._lengths())
        if a + n < used:
            last = max(self.slots, key=lambda s: self.slots[s][0])
            b, m = self.slots[last]
            if m == n:  # move the last session into the hole
                t = max(lengths[b : b + m])
                self._k[:, a : a + n, :, :t] = self._k[:, b : b + m, :, :t]
                self._v[:, a : a + n, :, :t] = self._v[:, b : b + m, :, :t]
                lengths[a : a + n] = lengths[b : b + m]
                self.slots[last] = (a, m)
            else:  # shift the tail down
                t = max(lengths[a + n : used])
                self._k[:, a : used - n, :, :t] = self._k[:, a + n : used, :, :t].clone()
                self._v[:, a : used - n, :, :t] = self._v[:, a + n : used, :, :t].clone()
                lengths[a : used - n] = lengths[a + n : used]
                for s, (b, m) in self.slots.items():
                    if b > a:
                        self.slots[s] = (b - n, m)
        lengths = lengths[: used - n]
        if not self.slots:
            self._k = self._v = self.view = None  # free the storage while idle
        else:
            self._set_view(lengths)
        return out


# -- sessions -------------------------------------------------------------------------------------


@dataclass
class _Session:
    """One running session: its request, its video's decoding state, its cache (batching=False)."""

    req: EngineRequest
    state: VideoState
    need: int  # tokens per row the request needs at most (cache capacity)
    cache: KVCache | None = None  # own cache (batching=False)
    produced: int = 0

    @property
    def n_rows(self) -> int:
        return self.state.n_rows

    @property
    def sid(self) -> str:
        return self.req.session_id


class Engine:
    """Continuous-batching engine of one worker: one model, many sessions, one forward a step."""

    def __init__(
        self,
        model,
        layout: Layout,
        max_batch: int = 8,
        kv_budget_bytes: int | None = None,
        batching: bool = True,
        row_threads: int = 1,
    ) -> None:
        """row_threads > 1: each forward's rows run as that many groups on threads
        (`lumos.sampler.RowThreads`; the CPU worker's choice, with one intra-op thread)."""
        param = next(model.parameters())
        self.model, self.layout, self.batching = model, layout, batching
        self.row_threads = RowThreads(row_threads) if row_threads > 1 else None
        self.device, self.dtype = param.device, param.dtype
        self.pool = KVPool(kv_budget_bytes, self.device)
        self.scheduler = Scheduler(max_batch, self.pool)
        self._batch = _BatchCache(model.cfg, 2 * max_batch, self.dtype, self.device)
        self._requests: dict[str, EngineRequest] = {}
        self._live: dict[str, _Session] = {}
        self._offsets = layout.code_offsets.to(self.device)  # [N]
        # debug hook: on_logits(session_id, frame index, step, per-row logits [rows, N, V])
        self.on_logits: Callable[[str, int, int, Tensor], None] | None = None
        self.steps_run = 0
        self.forwards_run = 0
        self.frames_emitted = 0
        self.slides = 0  # rolling-window rebuilds (one prefill each)
        self.heap_trim = HeapTrim()  # freed host memory back to the OS after commits (RSS flat)

    # -- requests ---------------------------------------------------------------------------------
    def _state(self, req: EngineRequest, generator: torch.Generator | None) -> VideoState:
        return VideoState(
            self.layout,
            req.sampler,
            req.text_ids,
            req.duration,
            req.fps,
            req.given,
            generator,
            self.model.cfg.rope,
            self.device,
        )

    def request_bytes(self, req: EngineRequest) -> int:
        """KV bytes the session holds at most during the request (what admission reserves):
        bounded by the rolling window when the sampler has one."""
        c, lay = self.model.cfg, self.layout
        texts = [req.text_ids] + ([None] if req.sampler.cfg != 1.0 else [])
        pre = max(len(lay.prefix(t, req.duration, req.fps)) for t in texts)  # validates them
        t0 = 0 if req.given is None else req.given.shape[0]
        need = cache_tokens(pre, t0, req.n_frames, lay.block_len, req.sampler)
        per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * self.dtype.itemsize
        return len(texts) * need * per_token

    @torch.inference_mode()
    def add(self, request: EngineRequest) -> None:
        """Queue a request; it joins the running batch at a step boundary when admitted."""
        lay = self.layout
        if request.n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {request.n_frames}")
        g = request.given
        if g is not None:
            if g.dim() != 3 or tuple(g.shape[1:]) != (lay.h, lay.w):
                raise ValueError(f"given must be [t0, {lay.h}, {lay.w}], got {tuple(g.shape)}")
            if (
                g.is_floating_point()
                or g.numel()
                and not ((g >= 0) & (g < lay.vocab.codebook_size)).all()
            ):
                raise ValueError("given must hold integer codes in [0, codebook_size)")
        nbytes = self.request_bytes(request)  # validates text ids, duration and fps
        self.scheduler.add(request.session_id, nbytes)
        self._requests[request.session_id] = request

    @torch.inference_mode()
    def cancel(self, session_id: str) -> bool:
        """Remove a session between steps (its committed frames stay in its cache)."""
        if session_id in self._live:
            self._leave(self._live[session_id], cancelled=True)
            return True
        self._requests.pop(session_id, None)
        return self.scheduler.cancel(session_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- session life -----------------------------------------------------------------------------
    @staticmethod
    def _key(req: EngineRequest, state: VideoState) -> tuple:
        """What a session's cache holds: prompt, settings, the committed frames and the window
        (a cache one slide behind the next request's window is stale: a miss)."""
        text = None if req.text_ids is None else tuple(req.text_ids)
        sc = req.sampler
        return (
            text,
            req.duration,
            req.fps,
            state.n_rows,
            sc.history_mask_ratio,
            sc.window,
            sc.window_stride,
            state.k,
            state.digest,
            tuple(state.lengths),
        )

    def _prefill(self, state: VideoState, capacity: int) -> KVCache:
        """One padded, frame-causal forward of the state's prefix + window into a new cache."""
        self.forwards_run += 1
        return prefill(self.model, self.layout, state.prefill_rows(), capacity, self.row_threads)

    def _start(self, session_id: str) -> None:
        """An admitted session: reuse its warm cache or prefill, then begin its first frame."""
        req = self._requests[session_id]
        gen = req.generator
        if gen is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            gen = torch.Generator(device=self.device).manual_seed(seed)
        state = self._state(req, gen)
        need = state.capacity(req.n_frames)
        cache = self.pool.get(session_id, self._key(req, state))
        if cache is None or cache.lengths != state.lengths:
            cache = self._prefill(state, need)
            if state.frames:
                self.pool.stats.rebuilds += 1
        self.pool.take(session_id)  # the pool entry keeps the reservation, no stale tensor
        sess = _Session(req=req, state=state, need=need)
        if self.batching:
            self._batch.attach(session_id, cache, need)
        else:
            if cache.capacity < need:
                cache = KVCache.stack([cache], extra=need - max(cache.lengths))
            sess.cache = cache
            self.pool.put(session_id, cache)
        self._live[session_id] = sess
        self._begin_frame(sess)

    def _begin_frame(self, sess: _Session) -> None:
        """Slide the window if frame k needs it (one prefill of the session's rows), then the
        all-MASK block of frame k."""
        st = sess.state
        if st.needs_slide():
            st.slide()
            cache = self._prefill(st, sess.need)
            self.slides += 1
            if self.batching:
                self._batch.replace(sess.sid, cache)
            else:
                sess.cache = cache
                self.pool.put(sess.sid, cache)
        st.begin_frame()

    def _leave(self, sess: _Session, cancelled: bool = False) -> None:
        """Take the session's rows out of the batch; they stay in the pool as an idle cache."""
        sid = sess.sid
        cache = self._batch.detach(sid) if self.batching else sess.cache
        self.pool.put(sid, cache, self._key(sess.req, sess.state))
        if cancelled:
            self.scheduler.cancel(sid)
        else:
            self.scheduler.finish(sid)
        del self._live[sid]
        del self._requests[sid]

    # -- one step ---------------------------------------------------------------------------------
    def _logits(self, toks: Tensor, pos: Tensor, cache) -> Tensor:
        """One forward of blocks [R, B_f] against a cache -> visual logits [R, N, V] (float)."""
        self.forwards_run += 1
        hidden = block_forward(self.model, toks, pos, cache, self.row_threads)  # [R, B_f, D]
        return code_logits(self.model, hidden, self._offsets)

    def _decode(self, sess: _Session, logits: Tensor) -> None:
        """One MaskGIT step of one session from its rows' logits [rows, N, V]."""
        if self.on_logits is not None:
            self.on_logits(sess.sid, sess.state.k, sess.state.s, logits)
        sess.state.decode(logits)

    def _commit(self, done: list[_Session]) -> list[FrameEvent]:
        """Enter finished frames into the caches (one forward for all) and emit them."""
        bl = self.layout.block_len
        toks = torch.cat([s.state.commit_tokens() for s in done])  # [r, B_f]
        pos = torch.cat([s.state.block_pos for s in done])  # [r, 3, B_f]
        if self.batching:
            view = self._batch.view
            rows = []
            for s in done:
                a, n = self._batch.slots[s.sid]
                rows += list(range(a, a + n))
            order = sorted(range(len(rows)), key=rows.__getitem__)
            rows = [rows[i] for i in order]
            block_forward(self.model, toks[order], pos[order], view.rows(rows), self.row_threads)
            self.forwards_run += 1
            rowset = set(rows)
            view.advance([bl if r in rowset else 0 for r in range(view.batch)])
        else:
            for s, t, p in zip(
                done, toks.split([s.n_rows for s in done]), pos.split([s.n_rows for s in done])
            ):
                block_forward(self.model, t, p, s.cache, self.row_threads)
                self.forwards_run += 1
                s.cache.advance(bl)
        events = []
        for s in done:
            index = s.state.k
            codes = s.state.committed()
            s.produced += 1
            finished = s.produced == s.req.n_frames
            events.append(FrameEvent(s.sid, index, codes, finished))
            if finished:
                self._leave(s)
            else:
                self._begin_frame(s)
        self.frames_emitted += len(events)
        self.heap_trim()
        return events

    @torch.inference_mode()
    def step(self) -> list[FrameEvent]:
        """One diffusion step of every running session (admitting waiting ones first)."""
        ids = self.scheduler.schedule()
        for sid in self.scheduler.admitted:
            self._start(sid)
        if not ids:
            if self.scheduler.waiting:  # cannot happen: add() rejects requests over budget
                raise RuntimeError("waiting sessions cannot be admitted with nothing running")
            return []
        sessions = [self._live[sid] for sid in ids]
        if self.batching:
            # this step's rows: each session's first step_rows (the conditional row alone once
            # its guidance steps are over), in storage order
            view = self._batch.view
            spans = sorted((self._batch.slots[s.sid][0], s.state.step_rows, s) for s in sessions)
            rows = [a + j for a, n, _ in spans for j in range(n)]
            toks = torch.cat([s.state.step_tokens(rows=n) for _, n, s in spans])  # [r, B_f]
            pos = torch.cat([s.state.block_pos[:n] for _, n, s in spans])  # [r, 3, B_f]
            logits = self._logits(toks, pos, view.rows(rows))  # [r, N, V]
            i = 0
            for _, n, s in spans:
                self._decode(s, logits[i : i + n])
                i += n
        else:
            for s in sessions:
                n = s.state.step_rows
                cache = s.cache.rows(list(range(n)))
                toks = s.state.step_tokens(rows=n)
                self._decode(s, self._logits(toks, s.state.block_pos[:n], cache))
        self.steps_run += 1
        done = [s for s in sessions if s.state.frame_done]
        return self._commit(done) if done else []

    def run_until_idle(self, max_steps: int | None = None) -> list[FrameEvent]:
        """Step until no session waits or runs; returns every event in order."""
        events: list[FrameEvent] = []
        n = 0
        while self.has_work and (max_steps is None or n < max_steps):
            events += self.step()
            n += 1
        return events

    def close(self) -> None:
        """Release the engine's row threads (later steps run on the calling thread alone)."""
        if self.row_threads is not None:
            self.row_threads.close()
            self.row_threads = None

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_bytes": self.pool.bytes_used,
            "kv_budget_bytes": self.pool.budget_bytes,
            "batch_kv_bytes": self._batch.nbytes,
            "steps": self.steps_run,
            "forwards": self.forwards_run,
            "frames": self.frames_emitted,
            "slides": self.slides,
            "heap_trims": self.heap_trim.trims,
            "pool": self.pool.snapshot(),
        }
