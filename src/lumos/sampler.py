"""Per-frame MaskGIT decoding with a KV cache, CFG and AR-DF history masking (method.md 7).

For each latent frame: append a block whose h*w code slots are MASK; for s = 0..S-1 run one
forward of the block against the cache for the conditional AND unconditional rows (one batch),
combine l = l_u + g (l_c - l_u) over the visual rows, sample every still-masked slot, score it
with log p + tau_s * Gumbel (known slots: +inf) and keep the floor(N cos(pi/2 (s+1)/S)) least
confident slots masked (clamped to [1, #masked - 1]; the last step accepts everything);
tau_s = tau0 (1 - (s+1)/S) restarts every frame. The finished frame is committed to the cache
with an evenly spaced subset of its content replaced by MASK (ratio 0.7), the same pattern for
every frame and for both streams; the video keeps the clean tokens. Given frames (I2V, or a
video being continued) enter the cache the same way.

The step-level pieces (`history_mask`, `combine_cfg`, `maskgit_step`, `keep_count`) are plain
functions so the serving engine can batch steps of many sessions with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lumos.config import SamplerConfig
from lumos.kvcache import KVCache
from lumos.masks import frame_causal_dense
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


# -- a batch of videos ----------------------------------------------------------------------------


@dataclass
class VideoRequest:
    """One video to make: text (None = unconditional), frames to generate, frames given."""

    text_ids: list[int] | None
    n_frames: int
    given: Tensor | None = None  # [t0, h, w] codes already in the video (I2V / continuation)
    duration: int = 2
    fps: int = 12
    generator: torch.Generator | None = None


class VideoBatch:
    """KV-cached generation state for B videos: rows [0, B) conditional, [B, 2B) unconditional."""

    def __init__(
        self,
        model,
        layout: Layout,
        requests: list[VideoRequest],
        cfg: SamplerConfig,
        use_cache: bool = True,
    ) -> None:
        if not requests:
            raise ValueError("no requests")
        self.model, self.layout, self.cfg, self.use_cache = model, layout, cfg, use_cache
        self.requests = requests
        self.b = len(requests)
        self.has_uncond = cfg.cfg != 1.0
        self.generators = [r.generator for r in requests]
        self.hmask = history_mask(layout.content_len, cfg.history_mask_ratio)  # [L_f]
        self.device = next(model.parameters()).device
        self._tau_state = cfg.tau0  # reference_compat: compounding, never reset
        # the sequences each row holds (prefix + committed frames, history-masked)
        self.rows: list[Sequence] = []
        self.p0: list[int] = []
        self.k = [0 if r.given is None else r.given.shape[0] for r in requests]
        streams = [r.text_ids for r in requests]
        if self.has_uncond:
            streams += [None] * self.b
        for i, text in enumerate(streams):
            req = requests[i % self.b]
            pre = layout.prefix(text, req.duration, req.fps)
            p0 = Layout.p0(len(pre))
            self.p0.append(p0)
            seq = pre
            if req.given is not None and req.given.shape[0]:
                given = layout.frames(req.given.cpu(), req.given.shape[0], 0, len(pre), p0)
                seq = pre + mask_history(layout, given, self.hmask)
            self.rows.append(seq)
        self.cache: KVCache | None = None
        if use_cache:
            self._prefill()

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def _forward_rows(self, seqs: list[Sequence]) -> Tensor:
        """Full forward of padded sequences with the frame-causal mask -> hidden [R, L, D]."""
        rope = self.model.cfg.rope
        b = pad_batch(seqs, rope, self.layout.vocab.pad)
        mask = frame_causal_dense(b["frame"], b["valid"]).to(self.device)
        return self.model(
            b["tokens"].to(self.device),
            b["positions"].to(self.device),
            mask,
            self.cache,
            output="hidden",
        )

    @torch.inference_mode()
    def _prefill(self) -> None:
        lay = self.layout
        total = max(len(s) for s in self.rows)
        n_new = max(r.n_frames for r in self.requests)
        cap = total + n_new * lay.block_len
        param = next(self.model.parameters())
        self.cache = KVCache.for_model(self.model.cfg, self.n_rows, cap, param.dtype, self.device)
        self._forward_rows(self.rows)
        self.cache.advance([len(s) for s in self.rows])

    # -- one frame --------------------------------------------------------------------------------
    def _blocks(self) -> list[Sequence]:
        """The MASK block of each row's next frame at its own start index, p0 and k."""
        return [
            self.layout.frame_block(self.k[i % self.b], len(s), self.p0[i], None)
            for i, s in enumerate(self.rows)
        ]

    def _block_tokens(self, blocks: list[Sequence], codes: Tensor, known: Tensor) -> Tensor:
        """[R, B_f] block tokens with known codes filled in (rows share their video's codes)."""
        lay = self.layout
        toks = torch.stack([blk.tokens for blk in blocks]).to(self.device)  # [R, B_f]
        ids = torch.where(known, lay.vocab.visual(codes), torch.full_like(codes, lay.vocab.mask))
        reps = self.n_rows // self.b
        toks[:, lay.code_offsets.to(self.device)] = ids.repeat(reps, 1)
        return toks

    @torch.inference_mode()
    def frame_logits(self, blocks: list[Sequence], codes: Tensor, known: Tensor) -> Tensor:
        """Per-row visual logits [R, N, V] at the code slots of the current block."""
        lay = self.layout
        toks = self._block_tokens(blocks, codes, known)
        rope = self.model.cfg.rope
        if self.use_cache:
            pos = torch.stack([blk.positions(rope) for blk in blocks]).to(self.device)
            hidden = self.model(
                toks, pos, self.cache.key_mask(lay.block_len), self.cache, output="hidden"
            )  # [R, B_f, D]
            h = hidden[:, lay.code_offsets.to(self.device)]  # [R, N, D]
        else:  # recompute: the whole sequence every step, with the frame-causal mask
            seqs = []
            for i, (row, blk) in enumerate(zip(self.rows, blocks)):
                seqs.append(row + blk.with_tokens(toks[i].cpu()))
            hidden = self._forward_rows(seqs)
            idx = torch.stack([len(r) + lay.code_offsets for r in self.rows]).to(self.device)
            h = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.model.project(h, self.model.visual_rows()).float()

    @torch.inference_mode()
    def next_frame(self, on_step: Callable[[int], None] | None = None) -> Tensor:
        """Decode and commit every video's next latent frame; returns codes [B, h, w]."""
        lay, cfg = self.layout, self.cfg
        n = lay.n_codes
        blocks = self._blocks()
        codes = torch.zeros(self.b, n, dtype=torch.long, device=self.device)
        known = torch.zeros(self.b, n, dtype=torch.bool, device=self.device)
        for s in range(cfg.steps):
            logits = self.frame_logits(blocks, codes, known)
            guided = combine_cfg(logits, self.b, cfg.cfg, self.has_uncond)
            guided = filter_logits(guided, cfg.top_k, cfg.top_p, cfg.temperature)
            if cfg.reference_compat:
                self._tau_state *= 1.0 - (s + 1) / cfg.steps
                tau = self._tau_state
            else:
                tau = tau_at(cfg, s)
            codes, known = maskgit_step(codes, known, guided, s, cfg.steps, tau, self.generators)
            if on_step is not None:
                on_step(s)
        self._commit(blocks, codes)
        return codes.view(self.b, lay.h, lay.w)

    @torch.inference_mode()
    def _commit(self, blocks: list[Sequence], codes: Tensor) -> None:
        lay = self.layout
        full = torch.ones_like(codes, dtype=torch.bool)
        toks = self._block_tokens(blocks, codes, full).cpu()  # [R, B_f] clean
        committed = [mask_history(lay, b.with_tokens(t), self.hmask) for b, t in zip(blocks, toks)]
        toks = torch.stack([c.tokens for c in committed])
        if self.use_cache:
            rope = self.model.cfg.rope
            pos = torch.stack([blk.positions(rope) for blk in blocks]).to(self.device)
            self.model(
                toks.to(self.device),
                pos,
                self.cache.key_mask(lay.block_len),
                self.cache,
                output="hidden",
            )
            self.cache.advance(lay.block_len)
        self.rows = [r + c for r, c in zip(self.rows, committed)]
        self.k = [k + 1 for k in self.k]


@torch.inference_mode()
def generate(
    model,
    layout: Layout,
    requests: list[VideoRequest],
    cfg: SamplerConfig,
    on_frame: Callable[[int, Tensor], None] | None = None,
    use_cache: bool = True,
) -> list[Tensor]:
    """Generate every request's frames; returns each video's codes [t0 + n_frames, h, w]."""
    n = {r.n_frames for r in requests}
    if len(n) != 1:
        raise ValueError("all videos of one batch must generate the same number of frames")
    batch = VideoBatch(model, layout, requests, cfg, use_cache=use_cache)
    out: list[list[Tensor]] = [
        [] if r.given is None else [r.given.to(batch.device)] for r in requests
    ]
    for f in range(n.pop()):
        codes = batch.next_frame()  # [B, h, w]
        for i in range(len(requests)):
            out[i].append(codes[i : i + 1])
        if on_frame is not None:
            on_frame(f, codes)
    return [torch.cat(o).cpu() for o in out]
