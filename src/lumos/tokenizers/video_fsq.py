"""Lumos' built-in small causal FSQ video tokenizer (training and metrics: `fsq_train`).

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
