"""Per-frame MaskGIT decoding with a KV cache, CFG, AR-DF history masking and a rolling context
window (method.md 7; docs/LONG_VIDEO.md). One mechanism: `VideoState` decodes one video's frames
and both drivers use it, `generate` here (a batch of videos, one cache) and the serving engine
(continuous batching of many sessions).

For each latent frame: append a block whose h*w code slots are MASK; for s = 0..S-1 run one
forward of the block against the cache for the conditional AND unconditional rows (one batch),
combine l = l_u + g (l_c - l_u) over the visual rows, sample every still-masked slot, score it
with log p + tau_s * Gumbel (known slots: +inf) and keep the floor(N cos(pi/2 (s+1)/S)) least
confident slots masked (clamped to [1, #masked - 1]; the last step accepts everything);
tau_s = tau0 (1 - (s+1)/S) restarts every frame. The finished frame is committed to the cache
with an evenly spaced subset of its content replaced by MASK (ratio 0.7), the same pattern for
every frame and for both streams; the video keeps the clean tokens. Given frames (I2V, or a
video being continued) enter the cache the same way.

Rolling window (`SamplerConfig.window` = W latent frames, `window_stride` = S). While latent
frame k is decoded the cache holds the prompt prefix and the committed frames [a(k), k) with
a(k) = 0 for k <= W, else S * ceil((k - W) / S); every frame j in it is laid out as frame
j - a(k) of a fresh video (positions, MM-RoPE time axis, block start index), so the frame being
decoded sits at local index k - a(k) <= W, inside a clip of W + 1 frames. RoPE is baked into the
cached keys, so a slide (a(k) changes, once every S frames) rebuilds the cache by one prefill
of the prefix and the window's stored codes. W >= the video's length never slides: the same
computation as no window at all.

The step-level pieces (`history_mask`, `combine_cfg`, `maskgit_step`, `keep_count`) are plain
functions; `VideoState` strings them together for one video.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from lumos.config import SamplerConfig
from lumos.kvcache import KVCache
from lumos.masks import frame_causal
from lumos.sequence import Layout, Sequence, pad_batch

# -- step-level pieces ----------------------------------------------------------------------------


def history_mask(lf: int, ratio: float) -> Tensor:
    """[lf] bool: the evenly spaced content slots masked when a frame enters the cache.

    n = round(ratio * lf) slots at indices round(i * lf / n), i < n.
    """
    out = torch.zeros(lf, dtype=torch.bool)
    n = round(ratio * lf)
    if n > 0:
        idx = torch.round(torch.arange(n, dtype=torch.float64) * lf / n).long()
        out[idx.clamp(max=lf - 1)] = True
    return out


def mask_history(layout: Layout, frames: Sequence, hmask: Tensor) -> Sequence:
    """Frame blocks as they enter the cache: content slots in `hmask` [L_f] replaced by MASK."""
    toks = frames.tokens.clone().view(-1, layout.block_len)  # [n, B_f]
    toks[:, 3 : 3 + layout.content_len][:, hmask] = layout.vocab.mask
    return frames.with_tokens(toks.view(-1))


def keep_count(n: int, step: int, steps: int, n_masked: int) -> int:
    """How many slots stay masked after `step` (cosine schedule; 0 at the last step)."""
    if step >= steps - 1:
        return 0
    k = math.floor(n * math.cos(math.pi / 2 * (step + 1) / steps))
    return max(1, min(n_masked - 1, k))


def tau_at(cfg: SamplerConfig, step: int) -> float:
    return cfg.tau0 * (1.0 - (step + 1) / cfg.steps)


def combine_cfg(logits: Tensor, n_videos: int, scale: float, has_uncond: bool) -> Tensor:
    """logits [R, N, V] (cond rows, then uncond rows) -> guided [B, N, V]."""
    if not has_uncond:
        return logits[:n_videos]
    lc, lu = logits[:n_videos], logits[n_videos : 2 * n_videos]
    return lu + scale * (lc - lu)


def filter_logits(
    logits: Tensor, top_k: int | None, top_p: float | None, temperature: float = 1.0
) -> Tensor:
    """Temperature, then top-k / nucleus filtering over the last dim (filtered -> -inf)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the first token that crosses p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    return logits


def _gumbel(shape, g: torch.Generator | None, device) -> Tensor:
    u = torch.rand(shape, generator=g, device=device, dtype=torch.float32)
    e = -torch.log(u.clamp(1e-20, 1.0 - 1e-7))  # Exp(1) > 0
    return -torch.log(e)


def _categorical(probs: Tensor, g: torch.Generator | None) -> Tensor:
    """One draw per row of probs [N, V] by inverse CDF -> [N] long. One uniform per row
    (torch.multinomial draws one exponential per vocabulary entry: ~20x slower on CPU)."""
    cdf = probs.cumsum(-1)  # [N, V]
    u = torch.rand(probs.shape[0], 1, generator=g, device=probs.device) * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def maskgit_step(
    codes: Tensor,
    known: Tensor,
    logits: Tensor,
    step: int,
    steps: int,
    tau: float,
    generators: list[torch.Generator | None],
) -> tuple[Tensor, Tensor]:
    """One decoding step for B frames of N slots.

    codes [B, N] long (values at unknown slots are ignored), known [B, N] bool,
    logits [B, N, V] (already guided and filtered). Returns (codes, known) after the step.
    """
    b, n, _ = logits.shape
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, N, V]
    x = torch.empty(b, n, dtype=torch.long, device=logits.device)
    noise = torch.empty(b, n, device=logits.device)
    for i in range(b):
        g = generators[i]
        x[i] = _categorical(logp[i].exp(), g)
        noise[i] = _gumbel((n,), g, logits.device)
    conf = logp.gather(-1, x.unsqueeze(-1)).squeeze(-1) + tau * noise  # [B, N]
    conf = conf.masked_fill(known, float("inf"))
    codes = torch.where(known, codes, x)
    n_masked = int((~known[0]).sum())
    keep = keep_count(n, step, steps, n_masked)
    new_known = torch.ones_like(known)
    if keep > 0:
        low = torch.topk(conf, keep, dim=-1, largest=False).indices  # [B, keep]
        new_known.scatter_(1, low, False)
    return codes, new_known


# -- the rolling window ---------------------------------------------------------------------------


def window_start(k: int, window: int | None, stride: int = 1) -> int:
    """a(k): the first latent frame in the cache while latent frame k is decoded.

    0 without a window or while k <= window; else stride * ceil((k - window) / stride), so the
    cache holds between window - stride + 1 and window committed frames and the decoded frame
    sits at local index k - a(k) in [window - stride + 1, window].
    """
    if window is None or k <= window:
        return 0
    return stride * -(-(k - window) // stride)


def cache_tokens(
    prefix_len: int, t0: int, n_frames: int, block_len: int, cfg: SamplerConfig
) -> int:
    """The most tokens a row's cache holds while `n_frames` latent frames are made after `t0`:
    the prefix plus the window's frames (and the last committed one) or every frame."""
    held = t0 - window_start(t0, cfg.window, cfg.window_stride) + n_frames
    if cfg.window is not None:
        held = min(held, cfg.window + 1)
    return prefix_len + held * block_len


# -- one video ------------------------------------------------------------------------------------


@dataclass
class VideoRequest:
    """One video to make: text (None = unconditional), frames to generate, frames given."""

    text_ids: list[int] | None
    n_frames: int  # latent frames to generate
    given: Tensor | None = None  # [t0, h, w] codes already in the video (I2V / continuation)
    duration: int = 2
    fps: int = 12
    generator: torch.Generator | None = None


class VideoState:
    """Decoding state of one video: its rows (conditional, and unconditional when CFG != 1),
    its window of committed frames, and the frame being decoded.

    The driver owns the KV cache and runs the forwards; this object says what to run
    (`prefill_rows`, `step_tokens`, `block_pos`, `commit_tokens`) and consumes the results
    (`decode`, `committed`). Committed codes outside the window are not kept (a running digest
    of all of them identifies what the cache was built from).
    """

    def __init__(
        self,
        layout: Layout,
        cfg: SamplerConfig,
        text_ids: list[int] | None,
        duration: int,
        fps: int,
        given: Tensor | None,
        generator: torch.Generator | None,
        rope: str,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layout, self.cfg, self.rope, self.device = layout, cfg, rope, torch.device(device)
        self.generator = generator
        self.has_uncond = cfg.cfg != 1.0
        texts = [text_ids] + ([None] if self.has_uncond else [])
        self.prefixes = [layout.prefix(t, duration, fps) for t in texts]
        self.p0 = [Layout.p0(len(p)) for p in self.prefixes]
        self.hmask = history_mask(layout.content_len, cfg.history_mask_ratio)  # [L_f]
        self._hmask_dev = self.hmask.to(self.device)
        self._offsets = layout.code_offsets.to(self.device)  # [N]
        given = None if given is None else given.detach().to("cpu", torch.long)
        self.k = 0 if given is None else given.shape[0]  # latent frame being decoded
        self.start = window_start(self.k, cfg.window, cfg.window_stride)  # a(k)
        self.frames: list[Tensor] = [] if given is None else list(given[self.start :].unbind(0))
        self._digest = hashlib.sha1()
        if given is not None:
            self._digest.update(given.contiguous().numpy().tobytes())
        self.tau_state = cfg.tau0  # reference_compat: compounding, never reset
        self.s = 0  # diffusion step within the frame
        self.blocks: list[Sequence] = []
        self.block_pos: Tensor | None = None  # [rows, 3, B_f]
        self._block_tokens: Tensor | None = None  # [B_f] the MASK block
        self.codes: Tensor | None = None  # [1, N]
        self.known: Tensor | None = None  # [1, N] bool

    # -- what the cache holds ---------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return len(self.prefixes)

    @property
    def lengths(self) -> list[int]:
        """Committed tokens per row: prefix + the window's frames."""
        held = (self.k - self.start) * self.layout.block_len
        return [len(p) + held for p in self.prefixes]

    @property
    def digest(self) -> str:
        """A fingerprint of every committed frame (given and generated)."""
        return self._digest.hexdigest()

    def capacity(self, n_frames: int) -> int:
        """Tokens per row the cache needs for `n_frames` more latent frames."""
        pre = max(len(p) for p in self.prefixes)
        return cache_tokens(pre, self.k, n_frames, self.layout.block_len, self.cfg)

    def prefill_rows(self) -> list[Sequence]:
        """Each row's prefix + the window's frames (history-masked, re-based to frame 0)."""
        lay, n = self.layout, len(self.frames)
        codes = torch.stack(self.frames) if n else None  # [n, h, w]
        rows = []
        for pre, q in zip(self.prefixes, self.p0):
            seq = pre
            if n:
                seq = pre + mask_history(lay, lay.frames(codes, n, 0, len(pre), q), self.hmask)
            rows.append(seq)
        return rows

    def needs_slide(self) -> bool:
        """Whether the window moves before frame k (then the cache must be rebuilt)."""
        return window_start(self.k, self.cfg.window, self.cfg.window_stride) != self.start

    def slide(self) -> None:
        """Move the window to a(k) (the driver rebuilds the cache from `prefill_rows`)."""
        new = window_start(self.k, self.cfg.window, self.cfg.window_stride)
        self.frames = self.frames[new - self.start :]
        self.start = new

    # -- one frame --------------------------------------------------------------------------------
    def begin_frame(self) -> None:
        """The all-MASK block of frame k at local index k - a(k), at each row's length."""
        lay = self.layout
        local = self.k - self.start
        self.blocks = [lay.frame_block(local, n, q) for n, q in zip(self.lengths, self.p0)]
        self._block_tokens = self.blocks[0].tokens.to(self.device)  # [B_f]
        self.block_pos = torch.stack([b.positions(self.rope) for b in self.blocks]).to(
            self.device
        )  # [rows, 3, B_f]
        self.codes = torch.zeros(1, lay.n_codes, dtype=torch.long, device=self.device)
        self.known = torch.zeros(1, lay.n_codes, dtype=torch.bool, device=self.device)
        self.s = 0

    @property
    def step_rows(self) -> int:
        """Rows this step's forward needs: both streams while guidance applies (the first
        `guidance_steps` steps of a frame), then the conditional row alone (its first row)."""
        g = self.cfg.guidance_steps
        return self.n_rows if g is None or self.s < g else 1

    def step_tokens(self, known: Tensor | None = None, rows: int | None = None) -> Tensor:
        """[rows, B_f] the block with the known codes filled in (rows share the codes; default:
        every row)."""
        vocab = self.layout.vocab
        rows = self.n_rows if rows is None else rows
        known = self.known if known is None else known
        ids = torch.where(known, vocab.visual(self.codes), torch.full_like(self.codes, vocab.mask))
        toks = self._block_tokens.unsqueeze(0).repeat(rows, 1)  # [rows, B_f]
        toks[:, self._offsets] = ids.expand(rows, -1)
        return toks

    def decode(self, logits: Tensor) -> None:
        """One MaskGIT step from the logits [step_rows, N, V] of this step's rows."""
        cfg = self.cfg
        if logits.shape[0] != self.step_rows:
            raise ValueError(f"step {self.s} needs {self.step_rows} rows, got {logits.shape[0]}")
        guided = combine_cfg(logits, 1, cfg.cfg, logits.shape[0] > 1)  # [1, N, V]
        guided = filter_logits(guided, cfg.top_k, cfg.top_p, cfg.temperature)
        if cfg.reference_compat:
            self.tau_state *= 1.0 - (self.s + 1) / cfg.steps
            tau = self.tau_state
        else:
            tau = tau_at(cfg, self.s)
        self.codes, self.known = maskgit_step(
            self.codes, self.known, guided, self.s, cfg.steps, tau, [self.generator]
        )
        self.s += 1

    @property
    def frame_done(self) -> bool:
        return self.s >= self.cfg.steps

    def commit_tokens(self) -> Tensor:
        """[rows, B_f] the finished block with its history-mask slots replaced by MASK."""
        lay = self.layout
        toks = self.step_tokens(torch.ones_like(self.known))
        toks[:, 3 : 3 + lay.content_len][:, self._hmask_dev] = lay.vocab.mask
        return toks

    def committed(self) -> Tensor:
        """The driver wrote `commit_tokens` into the cache: frame k is done -> codes [h, w]."""
        codes = self.codes.view(self.layout.h, self.layout.w).cpu().clone()
        self.frames.append(codes)
        self._digest.update(codes.numpy().tobytes())
        self.k += 1
        return codes


# -- forwards (shared by the drivers) -------------------------------------------------------------


class RowThreads:
    """Run a forward's rows as contiguous groups on `n` threads (the CPU serving engine).

    A forward's rows are independent sequences, so they can run apart. The serving engine steps
    in a worker thread, where torch's OpenMP intra-op parallelism pays ~30-60 us more per
    parallel region than in a process's main thread (2 cores, bundled model: a frame step takes
    36 ms in a thread against 19 ms in the main thread, and 27 ms with one intra-op thread).
    With one intra-op thread (`torch.set_num_threads(1)`, the owner's job) and the rows split
    over `n` threads no OpenMP region runs at all: 21 ms in any thread, and less is lost when
    another process takes a core. The calling thread runs the first group itself.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"row threads must be >= 1, got {n}")
        self.n = n
        self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="lumos-rows") if n > 1 else None

    def run(self, fn: Callable[[slice], Tensor], rows: int) -> list[Tensor]:
        """fn(a slice of rows) over contiguous groups covering range(rows), in row order."""
        k = min(self.n, rows)
        if k < 2 or self._pool is None:
            return [fn(slice(0, rows))]
        cuts = [round(i * rows / k) for i in range(k + 1)]
        groups = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def call(sl: slice) -> Tensor:  # the caller's autograd modes (they are thread-local)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(sl)

        futures = [self._pool.submit(call, sl) for sl in groups[1:]]
        try:
            first = fn(groups[0])
        finally:
            rest = [f.result() for f in futures]  # never leave a group writing the cache
        return [first, *rest]

    def close(self) -> None:
        """Stop the pool's threads (idle ones exit now; a running group finishes first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def prefill(
    model,
    layout: Layout,
    rows: list[Sequence],
    capacity: int,
    threads: RowThreads | None = None,
) -> KVCache:
    """One padded, frame-causal forward of every row into a new cache of `capacity` tokens
    (split over `threads` when given and the mask is a dense tensor)."""
    param = next(model.parameters())
    cache = KVCache.for_model(model.cfg, len(rows), capacity, param.dtype, param.device)
    b = pad_batch(rows, model.cfg.rope, layout.vocab.pad)
    mask = frame_causal(b["frame"], b["valid"], model.cfg.attn_backend, param.device)
    toks, pos = b["tokens"].to(param.device), b["positions"].to(param.device)  # [R, L], [R, 3, L]

    def fwd(sl: slice) -> Tensor:
        m = mask[sl] if isinstance(mask, Tensor) else mask  # [r, 1, L, L]
        sub = cache.rows(list(range(sl.start, sl.stop)))
        return model(toks[sl], pos[sl], m, sub, output="hidden")

    if threads is None or not isinstance(mask, Tensor):
        fwd(slice(0, len(rows)))
    else:
        threads.run(fwd, len(rows))
    cache.advance([len(s) for s in rows])
    return cache


def block_forward(
    model, toks: Tensor, pos: Tensor, cache, threads: RowThreads | None = None
) -> Tensor:
    """Blocks [R, B_f] at positions [R, 3, B_f] against a cache -> hidden [R, B_f, D] (the
    block's keys/values are written at each row's length, not committed; split over `threads`
    when given and the cache is a KVCache)."""

    def fwd(t: Tensor, p: Tensor, sub) -> Tensor:
        return model(t, p, sub.key_mask(t.shape[1]), sub, output="hidden")

    if threads is None or not isinstance(cache, KVCache):
        return fwd(toks, pos, cache)

    def group(sl: slice) -> Tensor:
        return fwd(toks[sl], pos[sl], cache.rows(list(range(sl.start, sl.stop))))

    return torch.cat(threads.run(group, toks.shape[0]))


def code_logits(model, hidden: Tensor, offsets: Tensor) -> Tensor:
    """hidden [R, B_f, D] -> visual logits [R, N, V] (float) at the code slots `offsets` [N]."""
    return model.project(hidden[:, offsets], model.visual_rows()).float()


def recompute_logits(model, layout: Layout, states: list[VideoState]) -> Tensor:
    """The reference without a cache: the whole window + block of every row, frame-causal."""
    seqs, idx = [], []
    for st in states:
        toks = st.step_tokens().cpu()
        for i, row in enumerate(st.prefill_rows()):
            seqs.append(row + st.blocks[i].with_tokens(toks[i]))
            idx.append(len(row) + layout.code_offsets)
    dev = next(model.parameters()).device
    b = pad_batch(seqs, model.cfg.rope, layout.vocab.pad)
    mask = frame_causal(b["frame"], b["valid"], model.cfg.attn_backend, dev)
    hidden = model(b["tokens"].to(dev), b["positions"].to(dev), mask, None, output="hidden")
    gather = torch.stack(idx).to(dev).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return model.project(hidden.gather(1, gather), model.visual_rows()).float()


# -- the batch driver -----------------------------------------------------------------------------


def _states(model, layout: Layout, requests: list[VideoRequest], cfg: SamplerConfig):
    dev = next(model.parameters()).device
    return [
        VideoState(
            layout, cfg, r.text_ids, r.duration, r.fps, r.given, r.generator, model.cfg.rope, dev
        )
        for r in requests
    ]


@torch.inference_mode()
def generate(
    model,
    layout: Layout,
    requests: list[VideoRequest],
    cfg: SamplerConfig,
    on_frame: Callable[[int, Tensor], None] | None = None,
    use_cache: bool = True,
    on_logits: Callable[[int, int, int, Tensor], None] | None = None,
) -> list[Tensor]:
    """Generate every request's latent frames; returns each video's codes [t0 + n_frames, h, w].

    One cache for all videos (rows: each video's cond [+ uncond], in request order); a video
    whose window slides gets its rows rebuilt by a prefill of its own. use_cache=False
    recomputes the whole window every step (the reference the cache is tested against).
    on_frame(f, codes [B, h, w]) after each frame; on_logits(video, frame k, step, logits
    [rows, N, V]) before each step's decoding (a debug hook, as the engine's)."""
    n = {r.n_frames for r in requests}
    if not requests or len(n) != 1:
        raise ValueError("give one or more videos, all generating the same number of frames")
    n_frames = n.pop()
    states = _states(model, layout, requests, cfg)
    first = [0]
    for st in states:
        first.append(first[-1] + st.n_rows)
    offsets = layout.code_offsets.to(states[0].device)
    cache = None
    if use_cache:
        rows = [row for st in states for row in st.prefill_rows()]
        cache = prefill(model, layout, rows, max(st.capacity(n_frames) for st in states))
    out: list[list[Tensor]] = [[] if r.given is None else [r.given.cpu()] for r in requests]
    for f in range(n_frames):
        for i, st in enumerate(states):
            if st.needs_slide():
                st.slide()
                if use_cache:
                    own = prefill(model, layout, st.prefill_rows(), st.capacity(n_frames - f))
                    cache.assign(first[i], own)
            st.begin_frame()
        while not states[0].frame_done:
            # this step's rows of each video (its first step_rows), and where they are in the batch
            rows = [first[i] + j for i, st in enumerate(states) for j in range(st.step_rows)]
            at = [0]
            for st in states:
                at.append(at[-1] + st.step_rows)
            if use_cache:
                toks = torch.cat([st.step_tokens(rows=st.step_rows) for st in states])  # [r, B_f]
                pos = torch.cat([st.block_pos[: st.step_rows] for st in states])  # [r, 3, B_f]
                hidden = block_forward(model, toks, pos, cache.rows(rows))
                logits = code_logits(model, hidden, offsets)
            else:
                logits = recompute_logits(model, layout, states)[rows]
            for i, st in enumerate(states):
                own = logits[at[i] : at[i + 1]]
                if on_logits is not None:
                    on_logits(i, st.k, st.s, own)
                st.decode(own)
        if use_cache:
            toks = torch.cat([st.commit_tokens() for st in states])
            block_forward(model, toks, torch.cat([st.block_pos for st in states]), cache)
            cache.advance(layout.block_len)
        codes = torch.stack([st.committed() for st in states])  # [B, h, w]
        for i in range(len(requests)):
            out[i].append(codes[i : i + 1])
        if on_frame is not None:
            on_frame(f, codes)
    return [torch.cat(o) for o in out]
