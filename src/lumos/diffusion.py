"""AR-DF training objective (method.md section 5): mask schedules, tube masking, masked loss.

Per sample: t ~ U(0, 1), ratio rho = max(cos(pi t / 2), min_ratio); temporal tube masking draws
ONE subset of round(rho * L_f) content slots of a frame (new-lines included) and masks the same
slots in every frame. Baselines: "random" (one subset over the whole video) and "independent"
(diffusion forcing: a ratio and a subset per frame). With p = text_dropout the sample starts at
video start (positions from 0), for classifier-free guidance.

The loss is cross-entropy over the visual sub-vocabulary only, on masked code positions only,
averaged over all such tokens of the batch. Full-vocabulary logits are never built: the masked
hidden states are gathered and projected onto the visual rows of lm_head in checkpointed chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lumos.config import DiffusionConfig
from lumos.masks import frame_causal
from lumos.sequence import Layout, Sequence


def mask_ratio(t: Tensor | float, min_ratio: float) -> Tensor:
    """rho = max(cos(pi t / 2), min_ratio)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.clamp(torch.cos(math.pi * t / 2), min=min_ratio)


def _subset(n: int, m: int, g: torch.Generator | None) -> Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=g)[:m]] = True
    return out


def tube_mask(n_frames: int, lf: int, ratio: float, g: torch.Generator | None = None) -> Tensor:
    """[n_frames, lf] bool: one subset of round(ratio * lf) slots, repeated in every frame."""
    return _subset(lf, round(ratio * lf), g).unsqueeze(0).expand(n_frames, lf).clone()


def random_mask(n_frames: int, lf: int, ratio: float, g: torch.Generator | None = None) -> Tensor:
    """[n_frames, lf] bool: one subset of round(ratio * n_frames * lf) slots over the video."""
    return _subset(n_frames * lf, round(ratio * n_frames * lf), g).view(n_frames, lf)


def independent_mask(n_frames: int, lf: int, ratios: Tensor, g: torch.Generator | None = None):
    """[n_frames, lf] bool: frame i masks round(ratios[i] * lf) slots of its own."""
    return torch.stack([_subset(lf, round(float(r) * lf), g) for r in ratios])


def content_mask(
    scheme: str, n_frames: int, lf: int, min_ratio: float, g: torch.Generator | None = None
) -> Tensor:
    """Draw t (per sample, or per frame for "independent") and return the [n_frames, lf] mask."""
    if scheme == "independent":
        t = torch.rand(n_frames, generator=g, dtype=torch.float64)
        return independent_mask(n_frames, lf, mask_ratio(t, min_ratio), g)
    rho = float(mask_ratio(torch.rand((), generator=g, dtype=torch.float64), min_ratio))
    if scheme == "tube":
        return tube_mask(n_frames, lf, rho, g)
    if scheme == "random":
        return random_mask(n_frames, lf, rho, g)
    raise ValueError(f"unknown masking scheme {scheme!r}")


@dataclass
class Sample:
    """One masked training sample: model inputs plus loss targets."""

    seq: Sequence  # the clean sequence (targets)
    inputs: Tensor  # [L] tokens with MASK at masked slots
    loss_mask: Tensor  # [L] bool: masked visual-code positions
    uncond: Sample | None = None  # the same video and masks without the text (CFG's other row)


def make_sample(
    layout: Layout,
    codes: Tensor,
    text_ids: list[int] | None,
    cfg: DiffusionConfig,
    duration: int,
    fps: int,
    g: torch.Generator | None = None,
    twin: bool = False,
    context: int = 0,
) -> Sample:
    """codes [t, h, w] -> a masked AR-DF sample (text dropped with p = cfg.text_dropout); with
    `twin`, also its unconditional twin (no text, the same masks: guidance distillation).
    `context`: the clip's first frames are history (a window from late in a long video): they
    are masked as inputs like every frame, but only frames >= context are supervised."""
    drop = text_ids is None or float(torch.rand((), generator=g)) < cfg.text_dropout
    seq = layout.video(None if drop else text_ids, codes, duration, fps, close=True)
    m = content_mask(cfg.scheme, codes.shape[0], layout.content_len, cfg.min_mask_ratio, g)
    out = masked_sample(layout, seq, m, context)
    if twin:
        bare = seq if drop else layout.video(None, codes, duration, fps, close=True)
        out.uncond = masked_sample(layout, bare, m, context)
    return out


def masked_sample(layout: Layout, seq: Sequence, m: Tensor, context: int = 0) -> Sample:
    """Mask the content slots of every frame of `seq` by m [n_frames, L_f] (True = MASK); the
    loss covers the masked codes of frames >= `context`."""
    lf = layout.content_len
    slots = torch.zeros(len(seq), dtype=torch.bool)
    starts = torch.tensor([s.content_start for s in seq.spans])  # [n]
    pos = (starts.unsqueeze(1) + torch.arange(lf)).reshape(-1)  # [n*lf]
    slots[pos] = m.reshape(-1)
    inputs = seq.tokens.clone()
    inputs[slots] = layout.vocab.mask
    loss = slots & seq.is_code  # [L]
    if context:
        if not 0 <= context < len(seq.spans):
            raise ValueError(f"context {context} must be in [0, {len(seq.spans)}) frames")
        loss[: seq.spans[context].start] = False
    return Sample(seq=seq, inputs=inputs, loss_mask=loss)


def collate(samples: list[Sample], rope: str, pad_id: int) -> dict[str, Tensor]:
    """Right-pad samples: inputs/targets/frame [B, L], positions [B, 3, L], masks [B, L]; when
    the samples have unconditional twins, theirs too under keys prefixed "uncond_"."""
    out = _collate(samples, rope, pad_id)
    if samples and all(s.uncond is not None for s in samples):
        twins = _collate([s.uncond for s in samples], rope, pad_id)
        out.update({f"uncond_{k}": v for k, v in twins.items()})
    return out


def _collate(samples: list[Sample], rope: str, pad_id: int) -> dict[str, Tensor]:
    n = max(len(s.seq) for s in samples)
    b = len(samples)
    out = {
        "inputs": torch.full((b, n), pad_id, dtype=torch.long),
        "targets": torch.full((b, n), pad_id, dtype=torch.long),
        "positions": torch.zeros((b, 3, n), dtype=torch.long),
        "frame": torch.full((b, n), -1, dtype=torch.long),
        "valid": torch.zeros((b, n), dtype=torch.bool),
        "loss_mask": torch.zeros((b, n), dtype=torch.bool),
    }
    for i, s in enumerate(samples):
        m = len(s.seq)
        out["inputs"][i, :m] = s.inputs
        out["targets"][i, :m] = s.seq.tokens
        out["positions"][i, :, :m] = s.seq.positions(rope)
        out["frame"][i, :m] = s.seq.frame
        out["valid"][i, :m] = True
        out["loss_mask"][i, :m] = s.loss_mask
    return out


def _chunk_ce(h: Tensor, w: Tensor, y: Tensor) -> Tensor:
    """CE of h @ w^T against codes y [n] or, for y [n, V] float, against distributions."""
    return F.cross_entropy((h @ w.t()).float(), y, reduction="none")


def masked_visual_loss(
    model,
    hidden: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    frame: Tensor,
    chunk: int = 4096,
    soft: Tensor | None = None,
) -> dict[str, Tensor]:
    """Mean CE over the visual rows at masked code positions, plus per-frame sums and counts.

    hidden [B, L, D], targets/frame [B, L] long, loss_mask [B, L] bool. With `soft` [N, V] (a
    distribution over the visual codes per masked position, in the batch's row-major order) the
    term is the KL divergence KL(soft || model) instead of the CE of the target codes (the same
    gradient as the CE against `soft`). Also returns every term: per_token [N] (each masked
    code's, in the batch's row-major order), rows [N] (its sample) and frames [N] (its latent
    frame).
    """
    vocab = model.cfg.vocab_spec
    h = hidden[loss_mask]  # [N, D]
    y = vocab.code(targets[loss_mask]) if soft is None else soft  # [N] or [N, V]
    if soft is not None and soft.shape[0] != h.shape[0]:
        raise ValueError(f"soft targets for {soft.shape[0]} codes, the batch masks {h.shape[0]}")
    fr = frame[loss_mask]  # [N]
    w = model.lm_head.weight[model.visual_rows()]  # [V_vis, D]
    parts = []
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_ce, hc, w, yc, use_reentrant=False))
        else:
            parts.append(_chunk_ce(hc, w, yc))
        if soft is not None:  # CE - H(soft) = KL
            parts[-1] = parts[-1] + torch.special.xlogy(yc, yc).sum(-1)
    per_tok = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)  # [N]
    n_frames = int(frame.max().item()) + 1 if frame.numel() else 0
    n_frames = max(n_frames, 1)
    frame_sum = torch.zeros(n_frames, device=h.device).index_add_(0, fr, per_tok.detach())
    frame_count = torch.zeros(n_frames, device=h.device).index_add_(
        0, fr, torch.ones_like(per_tok.detach())
    )
    loss = per_tok.mean() if per_tok.numel() else hidden.sum() * 0.0
    rows = torch.arange(loss_mask.shape[0], device=h.device).unsqueeze(1).expand_as(loss_mask)
    return {
        "loss": loss,
        "frame_sum": frame_sum,
        "frame_count": frame_count,
        "n": per_tok.numel(),
        "per_token": per_tok,
        "rows": rows[loss_mask],
        "frames": fr,
    }


def pad_to(x: Tensor, n: int) -> Tensor:
    """A 1-D tensor zero-padded at the end to length n (per-frame sums of different lengths)."""
    return torch.cat([x, x.new_zeros(n - x.numel())]) if x.numel() < n else x


def ardf_loss(
    model, batch: dict[str, Tensor], chunk: int = 4096, mask=None, soft: Tensor | None = None
) -> dict[str, Tensor]:
    """Forward a collated batch with the frame-causal mask and return the AR-DF loss dict
    (against distributions `soft` [N, V] at the masked codes instead of the codes, if given)."""
    hidden = masked_hidden(model, batch, mask)
    return masked_visual_loss(
        model, hidden, batch["targets"], batch["loss_mask"], batch["frame"], chunk, soft
    )


def masked_hidden(model, batch: dict[str, Tensor], mask=None, prefix: str = "") -> Tensor:
    """The final hidden states [B, L, D] of a collated batch (its `prefix`ed keys: "uncond_"
    for the unconditional twins) under the frame-causal mask."""
    if mask is None:
        device = batch[prefix + "inputs"].device
        frame, valid = batch[prefix + "frame"], batch[prefix + "valid"]
        mask = frame_causal(frame, valid, model.cfg.attn_backend, device)
    return model(batch[prefix + "inputs"], batch[prefix + "positions"], mask, output="hidden")
