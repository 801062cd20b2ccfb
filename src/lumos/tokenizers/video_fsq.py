"""Lumos' built-in small causal FSQ video tokenizer, its training loop and reconstruction metrics.

:class:`FSQVideoTokenizer` is a convolutional encoder / FSQ / decoder that implements
:class:`~lumos.tokenizers.base.VisualTokenizer`. It is meant for small experiments (e.g. 64x64
frames) where the official Cosmos tokenizer is too large; it runs on a CPU.

Design:

* ``log2(spatial)`` stride-2 downsampling stages (widths ``config.channels``), a residual block per
  stage, a 1x1 projection to ``len(levels)`` channels and :class:`~lumos.tokenizers.fsq.FSQ`.
  The decoder mirrors it with nearest-neighbour upsampling.
* Causal in time: convolutions with a temporal kernel pad the past side only (replicating the
  first frame); normalisation is per frame. For ``temporal`` in {2, 4} the last
  ``log2(temporal)`` encoder stages also halve time with a causal stride-2 convolution that keeps
  the first frame on its own (T = 1 + 2k -> 1 + k); the decoder turns each latent frame into two
  frames and drops the first one (t -> 2t - 1). With ``temporal = 1`` and
  ``temporal_kernel = 1`` frames are independent.
* Internally activations use the frame-major layout ``[B, T, C, H, W]`` so that per-frame 2-D
  convolutions need no copies; the public tensor API uses ``[B, 3, T, H, W]`` in [-1, 1] like
  Cosmos.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    TokenizerLoadError,
    VisualTokenizer,
    check_codes,
    check_codes_batch,
    check_video,
    check_video_batch,
    pad_video_frames,
    unit_to_video,
    video_to_unit,
)
from .fsq import FSQ

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "FORMAT_NAME",
    "PRESETS",
    "FSQTokenizerConfig",
    "FSQVideoTokenizer",
    "train_tokenizer",
    "evaluate_reconstruction",
    "psnr",
    "ssim",
    "make_synthetic_videos",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "lumos-fsq-video-tokenizer"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class FSQTokenizerConfig:
    """Hyper-parameters of :class:`FSQVideoTokenizer`.

    ``channels`` holds one width per resolution, full resolution first, so it has
    ``log2(spatial) + 1`` entries. ``image_size`` is the nominal (square) frame size the model was
    built / trained for; any H, W that are multiples of ``spatial`` work. ``norm`` is the per-frame
    normalisation in the residual blocks: ``"none"`` (residual blocks start as the identity; it
    trained fastest in our CPU experiments), ``"group"`` or ``"channel"``.
    """

    channels: tuple[int, ...] = (32, 64, 128, 128)
    levels: tuple[int, ...] = (8, 5, 5, 5)
    spatial: int = 8
    temporal: int = 1
    image_size: int = 64
    num_res_blocks: int = 1
    temporal_kernel: int = 1
    norm_groups: int = 8
    norm: str = "none"
    name: str = "custom"

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.levels = tuple(int(v) for v in self.levels)
        self.validate()

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def num_down(self) -> int:
        """Number of spatial stride-2 stages, ``log2(spatial)``."""
        return int(math.log2(self.spatial))

    @property
    def num_time_down(self) -> int:
        """Number of temporal stride-2 stages, ``log2(temporal)``."""
        return int(math.log2(self.temporal))

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings."""
        s = self.spatial
        if s < 2 or s & (s - 1):
            raise ValueError(f"spatial must be a power of two >= 2, got {s}")
        if self.temporal not in (1, 2, 4):
            raise ValueError(f"temporal must be 1, 2 or 4, got {self.temporal}")
        if self.num_time_down > self.num_down:
            raise ValueError("temporal compression needs at least as many spatial stages")
        if len(self.channels) != self.num_down + 1:
            raise ValueError(
                f"channels needs log2(spatial) + 1 = {self.num_down + 1} widths, "
                f"got {len(self.channels)}: {self.channels}"
            )
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        if not self.levels or any(v < 2 for v in self.levels):
            raise ValueError(f"levels must be a non-empty tuple of ints >= 2, got {self.levels}")
        if self.image_size % s:
            raise ValueError(f"image_size {self.image_size} is not a multiple of spatial {s}")
        if self.norm not in ("group", "channel", "none"):
            raise ValueError(f"norm must be 'group', 'channel' or 'none', got {self.norm!r}")
        if self.num_res_blocks < 0 or self.temporal_kernel < 1 or self.norm_groups < 1:
            raise ValueError("num_res_blocks >= 0, temporal_kernel >= 1, norm_groups >= 1 needed")

    @classmethod
    def preset(cls, name: str) -> FSQTokenizerConfig:
        """A named preset (see :data:`PRESETS`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**asdict(PRESETS[name]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FSQTokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown tokenizer config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, FSQTokenizerConfig] = {
    # 64x64 RGB frames -> 8x8 latent grid, per-frame (temporal = 1), 1,000 codes.
    "fmnist64": FSQTokenizerConfig(
        channels=(32, 64, 128, 128),
        levels=(8, 5, 5, 5),
        spatial=8,
        temporal=1,
        image_size=64,
        num_res_blocks=1,
        temporal_kernel=1,
        norm="none",
        name="fmnist64",
    ),
}


# --------------------------------------------------------------------------------------------------
# Building blocks (activations are [B, T, C, H, W])
# --------------------------------------------------------------------------------------------------


class CausalConv(nn.Module):
    """Conv over ``[B, T, C, H, W]``: ``k x k`` in space, ``kt`` in time padded on the past side
    only (replicating the first frame), optional stride ``st`` in time and ``ss`` in space.
    With ``kt == 1`` and ``st == 1`` it runs as a per-frame 2-D convolution."""

    def __init__(self, cin: int, cout: int, k: int = 3, kt: int = 1, ss: int = 1, st: int = 1):
        super().__init__()
        self.kt, self.st, self.ss, self.pad = kt, st, ss, k // 2
        self.conv = nn.Conv3d(
            cin, cout, (kt, k, k), stride=(st, ss, ss), padding=(0, k // 2, k // 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        if self.kt == 1 and self.st == 1:
            y = F.conv2d(
                x.flatten(0, 1),  # [B*T, C, H, W]
                self.conv.weight[:, :, 0],
                self.conv.bias,
                stride=self.ss,
                padding=self.pad,
            )  # [B*T, C', H', W']
            return y.unflatten(0, (b, t))  # [B, T, C', H', W']
        xc = x.transpose(1, 2)  # [B, C, T, H, W]
        if self.kt > 1:
            past = xc[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)  # replicate first frame
            xc = torch.cat([past, xc], dim=2)  # [B, C, T + kt - 1, H, W]
        return self.conv(xc).transpose(1, 2)  # [B, T', C', H', W']


class FrameNorm(nn.Module):
    """Per-frame normalisation (keeps the network causal in time).

    ``"group"``: GroupNorm over each frame; ``"channel"``: LayerNorm over the channels of each
    pixel; ``"none"``: identity."""

    def __init__(self, channels: int, groups: int, kind: str = "group") -> None:
        super().__init__()
        self.kind = kind
        if kind == "group":
            self.norm: nn.Module = nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)
        elif kind == "channel":
            self.norm = nn.LayerNorm(channels, eps=1e-6)
        elif kind == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"unknown norm {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "group":
            return self.norm(x.flatten(0, 1)).unflatten(0, x.shape[:2])  # [B, T, C, H, W]
        if self.kind == "channel":
            return self.norm(x.movedim(2, -1)).movedim(-1, 2)  # [B, T, C, H, W]
        return x


class ResBlock(nn.Module):
    """Pre-norm residual block: (norm, SiLU, conv) x 2 plus a (1x1) skip."""

    def __init__(self, cin: int, cout: int, kt: int, groups: int, norm: str = "group") -> None:
        super().__init__()
        self.norm1 = FrameNorm(cin, groups, norm)
        self.conv1 = CausalConv(cin, cout, 3, kt)
        self.norm2 = FrameNorm(cout, groups, norm)
        self.conv2 = CausalConv(cout, cout, 3, kt)
        self.skip = CausalConv(cin, cout, 1, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.conv.weight)  # start as identity: faster, stabler training
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 in space; optionally causal stride-2 in time (T = 1 + 2k -> 1 + k; frame 0
    keeps its own output frame)."""

    def __init__(self, cin: int, cout: int, kt: int, time: bool) -> None:
        super().__init__()
        self.time = time
        self.conv = CausalConv(cin, cout, 3, 3 if time else kt, ss=2, st=2 if time else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time and (x.shape[1] - 1) % 2:
            raise ValueError(f"temporal downsampling needs 1 + 2k frames, got {x.shape[1]}")
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 in space then conv; optionally x2 in time (t -> 2t - 1; the first latent gives
    one frame, every later latent two)."""

    def __init__(self, cin: int, cout: int, kt: int, time: bool) -> None:
        super().__init__()
        self.time = time
        self.conv = CausalConv(cin, cout * (2 if time else 1), 3, kt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1), scale_factor=2.0, mode="nearest").unflatten(0, (b, t))
        y = self.conv(x)  # [B, t, C' * r, 2H, 2W]
        if not self.time:
            return y
        y = y.unflatten(2, (2, -1))  # [B, t, 2, C', 2H, 2W]: latent j -> frames 2j-1, 2j
        y = y.flatten(1, 2)  # [B, 2t, C', 2H, 2W]
        return y[:, 1:]  # [B, 2t - 1, C', 2H, 2W]


class Encoder(nn.Module):
    def __init__(self, cfg: FSQTokenizerConfig) -> None:
        super().__init__()
        ch, kt, g, nk = cfg.channels, cfg.temporal_kernel, cfg.norm_groups, cfg.norm
        self.conv_in = CausalConv(3, ch[0], 3, kt)
        stages = []
        for i in range(cfg.num_down):
            blocks: list[nn.Module] = [
                ResBlock(ch[i], ch[i], kt, g, nk) for _ in range(cfg.num_res_blocks)
            ]
            time_down = i >= cfg.num_down - cfg.num_time_down
            blocks.append(Downsample(ch[i], ch[i + 1], kt, time_down))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.mid = nn.Sequential(
            *[ResBlock(ch[-1], ch[-1], kt, g, nk) for _ in range(cfg.num_res_blocks)]
        )
        self.norm_out = FrameNorm(ch[-1], g, nk)
        self.conv_out = CausalConv(ch[-1], len(cfg.levels), 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, T, C0, H, W]
        h = self.mid(self.stages(h))  # [B, t, Cn, h, w]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, t, d, h, w]


class Decoder(nn.Module):
    def __init__(self, cfg: FSQTokenizerConfig) -> None:
        super().__init__()
        ch, kt, g, nk = cfg.channels, cfg.temporal_kernel, cfg.norm_groups, cfg.norm
        self.conv_in = CausalConv(len(cfg.levels), ch[-1], 3, kt)
        self.mid = nn.Sequential(
            *[ResBlock(ch[-1], ch[-1], kt, g, nk) for _ in range(cfg.num_res_blocks)]
        )
        stages = []
        for i in reversed(range(cfg.num_down)):
            time_up = i >= cfg.num_down - cfg.num_time_down
            blocks: list[nn.Module] = [Upsample(ch[i + 1], ch[i], kt, time_up)]
            blocks += [ResBlock(ch[i], ch[i], kt, g, nk) for _ in range(cfg.num_res_blocks)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm_out = FrameNorm(ch[0], g, nk)
        self.conv_out = CausalConv(ch[0], 3, 3, kt)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, t, Cn, h, w]
        h = self.stages(h)  # [B, T', C0, H, W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, T', 3, H, W]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


class FSQVideoTokenizer(nn.Module, VisualTokenizer):
    """Small causal conv + FSQ video tokenizer implementing :class:`VisualTokenizer`.

    ``encode`` / ``decode`` take and return CPU tensors (the model may live on any device);
    ``forward`` is the differentiable float path used for training.
    """

    def __init__(self, config: FSQTokenizerConfig | str = "fmnist64") -> None:
        super().__init__()
        if isinstance(config, str):
            config = FSQTokenizerConfig.preset(config)
        self.config = config
        self.codebook_size = config.codebook_size
        self.spatial = config.spatial
        self.temporal = config.temporal
        # per-frame convolutions and no temporal compression: each latent decodes on its own
        self.context_latents = 0 if config.temporal == 1 and config.temporal_kernel == 1 else None
        self.encoder = Encoder(config)
        self.quantizer = FSQ(config.levels)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- differentiable float API ([B, 3, T, H, W] in [-1, 1]) ----------------------------------

    def encode_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, 3, T, H, W]`` in [-1, 1] -> (codes ``[B, t, h, w, d]``, indices
        ``[B, t, h, w]``). Frames are padded (last frame repeated) to ``1 + temporal * k``."""
        x = pad_video_frames(x, self.temporal, dim=2).transpose(1, 2)  # [B, T, 3, H, W]
        z = self.encoder(x).permute(0, 1, 3, 4, 2)  # [B, t, h, w, d]
        return self.quantizer(z)

    def decode_float(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codes ``[B, t, h, w, d]`` -> ``[B, 3, T', H, W]`` (unclamped, ~[-1, 1])."""
        y = self.decoder(codes.permute(0, 1, 4, 2, 3))  # [B, T', 3, H, W]
        return y.transpose(1, 2)  # [B, 3, T', H, W]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, 3, T, H, W]`` in [-1, 1] -> (reconstruction ``[B, 3, T', H, W]``,
        indices ``[B, t, h, w]``), with ``T' = rgb_frames(latent_frames(T)) >= T``."""
        codes, indices = self.encode_float(x)
        return self.decode_float(codes), indices

    # ---- integer / uint8 API ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_batch(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` -> int64 CPU codes ``[B, t, h, w]``."""
        check_video_batch(videos, self.spatial)
        x = video_to_unit(videos.to(self.device)).to(self.dtype)  # [B, 3, T, H, W]
        _, indices = self.encode_float(x)
        return indices.cpu()

    @torch.no_grad()
    def decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[B, t, h, w]`` -> uint8 CPU video ``[B, rgb_frames(t), H, W, 3]``."""
        check_codes_batch(codes, self.codebook_size)
        q = self.quantizer.indices_to_codes(codes.to(self.device)).to(self.dtype)  # [B,t,h,w,d]
        return unit_to_video(self.decode_float(q)).cpu()  # [B, T', H, W, 3]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> int64 CPU codes ``[latent_frames(T), H/s, W/s]``."""
        check_video(video, self.spatial)
        return self.encode_batch(video.unsqueeze(0))[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[t, h, w]`` -> uint8 CPU video ``[rgb_frames(t), h*s, w*s, 3]``."""
        check_codes(codes, self.codebook_size)
        return self.decode_batch(codes.unsqueeze(0))[0]

    # ---- persistence -----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if needed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config.to_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> FSQVideoTokenizer:
        """Load a tokenizer written by :meth:`save`; raises :class:`TokenizerLoadError`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerLoadError(f"tokenizer folder {str(folder)!r} does not exist")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise TokenizerLoadError(f"tokenizer folder {str(folder)!r} has no {name}")
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
                raise ValueError(f"'format' is not {FORMAT_NAME!r}")
            config = FSQTokenizerConfig.from_dict(meta["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenizerLoadError(
                f"bad {CONFIG_FILE} in tokenizer folder {str(folder)!r}: {exc}"
            ) from exc
        model = cls(config)
        try:
            state = load_file(str(folder / WEIGHTS_FILE))
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # safetensors raises its own error types
            raise TokenizerLoadError(
                f"cannot load {WEIGHTS_FILE} from tokenizer folder {str(folder)!r}: {exc}"
            ) from exc
        return model.to(device).eval()


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
