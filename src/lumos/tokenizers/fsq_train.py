"""Training loop, reconstruction metrics (PSNR, SSIM) and synthetic clips of the built-in FSQ
video tokenizer (:mod:`lumos.tokenizers.video_fsq`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import (
    VisualTokenizer,
    video_to_unit,
)
from .video_fsq import FSQTokenizerConfig, FSQVideoTokenizer

__all__ = ["evaluate_reconstruction", "make_synthetic_videos", "psnr", "ssim", "train_tokenizer"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-frame PSNR (dB) of two videos ``[..., H, W, 3]`` (uint8 or float in [0, data_range]).
    Returns ``[...]``; identical frames give 100 dB."""
    mse = (a.double() - b.double()).pow(2).mean(dim=(-3, -2, -1))  # [...]
    out = 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))
    return out.clamp(max=100.0).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 255.0,
    window: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004) of two videos ``[..., H, W, 3]``: Gaussian window
    (``window`` taps, ``sigma``), computed per channel on the valid region and averaged over
    channels and pixels. Returns ``[...]``."""
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    lead = a.shape[:-3]
    h, w, c = a.shape[-3:]
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma)
    x = a.double().reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)  # [N*C, 1, H, W]
    y = b.double().reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable valid convolution
        z = F.conv2d(z, g.view(1, 1, 1, -1))
        return F.conv2d(z, g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per = s.reshape(-1, c, s.shape[-2] * s.shape[-1]).mean(dim=(1, 2))  # [N]
    return per.reshape(lead).float()


def _iter_videos(videos: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield uint8 videos ``[T, H, W, 3]`` from one video, a batch ``[N, T, H, W, 3]`` or an
    iterable of videos."""
    if isinstance(videos, torch.Tensor):
        if videos.dim() == 4:
            yield videos
            return
        if videos.dim() == 5:
            yield from videos
            return
        raise ValueError(f"videos must be [T, H, W, 3] or [N, T, H, W, 3], got {videos.shape}")
    yield from videos


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: VisualTokenizer,
    videos: torch.Tensor | Iterable[torch.Tensor],
) -> dict[str, float]:
    """Encode and decode each uint8 video ``[T, H, W, 3]`` and compare the first T frames.

    ``videos`` is one video, a batch ``[N, T, H, W, 3]`` or an iterable of videos. Returns mean
    per-frame ``psnr`` (dB) and ``ssim`` over all frames, the number of ``frames`` and
    ``codebook_usage`` (fraction of the codebook used by all codes)."""
    psnrs, ssims = [], []
    used = torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    for video in _iter_videos(videos):
        codes = tokenizer.encode(video)  # [t, h, w]
        recon = tokenizer.decode(codes)[: video.shape[0]]  # [T, H, W, 3]
        used[codes.flatten()] = True
        psnrs.append(psnr(recon, video))
        ssims.append(ssim(recon, video))
    if not psnrs:
        raise ValueError("evaluate_reconstruction got no videos")
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "frames": int(sum(p.numel() for p in psnrs)),
        "codebook_usage": float(used.float().mean()),
    }


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _as_clips(item: Any) -> torch.Tensor:
    """Normalise one data item to uint8 clips ``[n, T, H, W, 3]``: rank 3 = one frame
    ``[H, W, 3]``, rank 4 = a batch of frames ``[B, H, W, 3]``, rank 5 = clips."""
    x = torch.as_tensor(item)
    if x.dtype != torch.uint8:
        raise ValueError(f"training data must be uint8 RGB, got {x.dtype}")
    if x.dim() == 3:
        x = x[None, None]
    elif x.dim() == 4:
        x = x[:, None]
    elif x.dim() != 5:
        raise ValueError(f"training items must have rank 3, 4 or 5, got {tuple(x.shape)}")
    if x.shape[-1] != 3:
        raise ValueError(f"training data must be RGB with channels last, got {tuple(x.shape)}")
    return x


def _batches(
    data: torch.Tensor | Iterable[Any], batch: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless stream of uint8 clip batches ``[batch, T, H, W, 3]``."""
    if isinstance(data, torch.Tensor):
        if data.dim() not in (4, 5):
            raise ValueError("a tensor dataset must be [N, H, W, 3] frames or [N, T, H, W, 3]")
        clips = _as_clips(data)  # [N, T, H, W, 3]
        n = clips.shape[0]
        while True:
            yield clips[torch.randint(n, (batch,), generator=gen)]
    buf: list[torch.Tensor] = []
    count = 0
    while True:
        produced = False
        for item in data:
            produced = True
            clips = _as_clips(item)
            buf.append(clips)
            count += clips.shape[0]
            while count >= batch:
                allc = torch.cat(buf)
                yield allc[:batch]
                rest = allc[batch:]
                buf, count = ([rest] if rest.shape[0] else []), rest.shape[0]
        if not produced or iter(data) is data:
            if count:  # an exhausted iterator: flush what is left, then stop
                yield torch.cat(buf)
            return


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_tokenizer(
    cfg: FSQTokenizerConfig | str,
    data: torch.Tensor | Iterable[Any],
    steps: int = 2000,
    lr: float = 5e-4,
    batch: int = 32,
    device: str | torch.device = "cpu",
    log_every: int = 50,
    out_dir: str | Path | None = None,
    *,
    model: FSQVideoTokenizer | None = None,
    seed: int = 0,
    warmup: int | None = None,
    grad_clip: float = 1.0,
    log_fn: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train an :class:`FSQVideoTokenizer` with L1 + L2 reconstruction loss and Adam.

    ``data`` is a uint8 tensor of frames ``[N, H, W, 3]`` or clips ``[N, T, H, W, 3]`` (random
    batches of ``batch`` are drawn), or an iterable of frames ``[H, W, 3]``, frame batches
    ``[B, H, W, 3]`` or clip batches ``[B, T, H, W, 3]`` (re-batched to ``batch``; a re-iterable
    is cycled, an iterator ends training early when exhausted). Clips should have
    ``1 + temporal * k`` frames. Pass ``model`` to train an existing tokenizer in place (its
    config wins over ``cfg``). LR: linear warm-up then cosine decay to 10%.

    With ``out_dir`` the model (``config.json`` + ``model.safetensors``) and ``metrics.json``
    are written there. Returns metrics: ``steps``, ``final_loss`` (mean of the last log window),
    ``train_psnr`` (dB, last log window), ``loss_history`` (list of ``[step, loss]``),
    ``seconds``, ``parameters``.
    """
    torch.manual_seed(seed)
    if model is None:
        model = FSQVideoTokenizer(cfg)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, min(100, steps // 20)) if warmup is None else max(1, warmup)
    history: list[list[float]] = []
    window_loss, window_mse, window_n = 0.0, 0.0, 0
    last_loss, last_psnr = float("nan"), float("nan")
    start = time.perf_counter()
    batches = _batches(data, batch, gen)
    step = 0
    while step < steps:
        try:
            clips = next(batches)
        except StopIteration:  # an iterator ran out of data
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        x = video_to_unit(clips.to(device))  # [B, 3, T, H, W] in [-1, 1]
        recon, _ = model(x)  # [B, 3, T', H, W]
        recon = recon[:, :, : x.shape[2]]
        mse = F.mse_loss(recon, x)
        loss = F.l1_loss(recon, x) + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        window_loss += float(loss.detach())
        window_mse += float(mse.detach())
        window_n += 1
        if step % log_every == 0 or step == steps:
            last_loss = window_loss / window_n
            # pixels span [-1, 1] (range 2): PSNR = 10 log10(4 / mse)
            last_psnr = 10 * math.log10(4.0 / max(window_mse / window_n, 1e-12))
            history.append([step, last_loss])
            record = {"step": step, "loss": last_loss, "psnr": last_psnr}
            record["lr"] = opt.param_groups[0]["lr"]
            logger.info("tokenizer step %d loss %.5f psnr %.2f dB", step, last_loss, last_psnr)
            if log_fn is not None:
                log_fn(record)
            window_loss, window_mse, window_n = 0.0, 0.0, 0
    if window_n:
        last_loss = window_loss / window_n
        last_psnr = 10 * math.log10(4.0 / max(window_mse / window_n, 1e-12))
        history.append([step, last_loss])
    model.eval()
    metrics: dict[str, Any] = {
        "steps": step,
        "final_loss": last_loss,
        "train_psnr": last_psnr,
        "loss_history": history,
        "seconds": time.perf_counter() - start,
        "parameters": model.num_parameters(),
        "config": model.config.to_dict(),
    }
    if out_dir is not None:
        out = model.save(out_dir)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# --------------------------------------------------------------------------------------------------
# Synthetic data (tests, smoke runs)
# --------------------------------------------------------------------------------------------------


def make_synthetic_videos(
    n: int,
    frames: int = 1,
    size: int = 64,
    seed: int = 0,
    max_shapes: int = 3,
) -> torch.Tensor:
    """``n`` uint8 clips ``[n, frames, size, size, 3]`` of coloured ellipses and rectangles moving
    linearly (bouncing off the borders) over a smooth two-colour gradient background."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # [S]
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [S, S]
    out = torch.empty(n, frames, size, size, 3, dtype=torch.uint8)
    for i in range(n):
        c0, c1, direction = rand(3), rand(3), rand(2) * 2 - 1
        ramp = (xx * direction[0] + yy * direction[1]).unsqueeze(-1)  # [S, S, 1]
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-6)
        bg = c0 * (1 - ramp) + c1 * ramp  # [S, S, 3]
        k = 1 + int(torch.randint(max_shapes, (1,), generator=gen))
        centre, vel = rand(k, 2) * 0.6 + 0.2, (rand(k, 2) * 2 - 1) * 0.06
        radius, colour = rand(k, 2) * 0.15 + 0.08, rand(k, 3)
        is_rect = rand(k) < 0.5
        for f in range(frames):
            pos = centre + vel * f  # [k, 2], reflected into [0, 1]
            pos = 1 - (1 - pos.remainder(2.0)).abs()
            img = bg.clone()
            for j in range(k):
                dy = (yy - pos[j, 0]) / radius[j, 0]
                dx = (xx - pos[j, 1]) / radius[j, 1]
                if is_rect[j]:
                    mask = (dy.abs() <= 1) & (dx.abs() <= 1)
                else:
                    mask = dy**2 + dx**2 <= 1
                img[mask] = colour[j]
            out[i, f] = (img * 255).round().to(torch.uint8)
    return out
