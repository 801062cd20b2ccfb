"""Frame-causal attention masks (method.md section 4), as small factory functions.

Causal everywhere, plus full bidirectional attention inside each frame block (frame start ..
frame end inclusive), per sample: `frame` ids [B, L] are the latent frame number of every token
of a frame block and -1 elsewhere, so blocks of different samples never see each other (the
released code's batch-union leak is not reproduced). `valid` [B, L] masks right padding.

Two backends with one definition: a dense boolean mask for SDPA (CPU, reference) and a
FlexAttention BlockMask (GPU). At inference no mask is needed for a single sequence (the frame
being decoded attends to the whole cache plus itself); a batch of caches of different lengths
uses `cache_key_mask`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def frame_causal_dense(frame: Tensor, valid: Tensor | None = None) -> Tensor:
    """frame [B, L] long, valid [B, L] bool -> allowed [B, 1, L, L] bool (True = attend)."""
    b, n = frame.shape
    i = torch.arange(n, device=frame.device)
    causal = i.view(1, n, 1) >= i.view(1, 1, n)  # [1, L, L]
    same = (frame.unsqueeze(2) == frame.unsqueeze(1)) & (frame >= 0).unsqueeze(2)  # [B, L, L]
    allowed = causal | same
    if valid is not None:
        allowed = allowed & valid.unsqueeze(1)  # keys must be real tokens
        # padded queries attend to themselves only (keeps softmax finite; outputs are ignored)
        allowed = allowed | (
            torch.eye(n, dtype=torch.bool, device=frame.device) & ~valid.unsqueeze(2)
        )
    return allowed.unsqueeze(1)


def frame_causal_block_mask(frame: Tensor, valid: Tensor | None = None, block_size: int = 128):
    """The same mask as a FlexAttention BlockMask (built lazily; needs torch>=2.5)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = frame.shape
    if valid is None:
        valid = torch.ones_like(frame, dtype=torch.bool)

    def mask_mod(bi, h, q, kv):  # noqa: ARG001 - FlexAttention signature
        fq, fk = frame[bi, q], frame[bi, kv]
        attend = (kv <= q) | ((fq == fk) & (fq >= 0))
        return (attend & valid[bi, kv]) | ((q == kv) & ~valid[bi, q])

    return create_block_mask(
        mask_mod, B=b, H=None, Q_LEN=n, KV_LEN=n, device=frame.device, BLOCK_SIZE=block_size
    )


def uses_flex(backend: str, device: torch.device | str) -> bool:
    """Whether a ModelConfig.attn_backend means FlexAttention on this device ("auto": on CUDA)."""
    if backend not in ("auto", "sdpa", "flex"):
        raise ValueError(f"unknown attention backend {backend!r}; choose auto, sdpa or flex")
    return backend == "flex" or (backend == "auto" and torch.device(device).type == "cuda")


def frame_causal(frame: Tensor, valid: Tensor | None, backend: str, device: torch.device | str):
    """The frame-causal mask of a full forward (training, prefill) for `backend` on `device`:
    a FlexAttention BlockMask (`uses_flex`) or the dense bool [B, 1, L, L] mask."""
    frame = frame.to(device)
    valid = None if valid is None else valid.to(device)
    if uses_flex(backend, device):
        return frame_causal_block_mask(frame, valid)
    return frame_causal_dense(frame, valid)


def cache_key_mask(lengths: Tensor, n_new: int, total: int) -> Tensor:
    """Queries of a new block against a batch of caches of per-row `lengths` [B].

    Keys [0, total) are valid for row b if j < lengths[b] (its history) or lengths[b] <= j <
    lengths[b] + n_new (the block itself, bidirectional). Returns [B, 1, 1, total] bool.
    """
    j = torch.arange(total, device=lengths.device).view(1, -1)
    ok = j < (lengths.view(-1, 1) + n_new)
    return ok.view(-1, 1, 1, total)
