"""Common interface of Lumos visual tokenizers, input validation and a streaming decoder.

A visual tokenizer maps a uint8 RGB video ``[T, H, W, 3]`` to a grid of integer codes
``[t, h, w]`` and back. Compression is ``spatial`` in both image axes and ``temporal`` in time,
causal in time with the first-frame rule of Cosmos-style tokenizers: the first RGB frame gets its
own latent frame, every later group of ``temporal`` RGB frames shares one latent frame, so

    t = latent_frames(T) = 1 + ceil((T - 1) / temporal)
    T' = rgb_frames(t)   = 1 + temporal * (t - 1)

Pixels are scaled to [-1, 1] internally (:func:`video_to_unit` / :func:`unit_to_video`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque

import torch

__all__ = [
    "TokenizerLoadError",
    "VisualTokenizer",
    "StreamingDecoder",
    "decode_streams",
    "check_video",
    "check_codes",
    "pad_video_frames",
    "video_to_unit",
    "unit_to_video",
]


class TokenizerLoadError(RuntimeError):
    """A tokenizer folder or one of its files is missing, malformed or cannot be loaded."""


def check_video(video: object, spatial: int = 8) -> None:
    """Validate a video for encoding: a uint8 tensor ``[T, H, W, 3]`` with H, W multiples of
    ``spatial`` and at least one frame. Raises ``ValueError`` (``TypeError`` for non-tensors)."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.dtype != torch.uint8:
        raise ValueError(f"video must have dtype torch.uint8 (values 0..255), got {video.dtype}")
    if video.dim() != 4:
        raise ValueError(
            f"video must have shape [T, H, W, 3] (rank 4), got rank {video.dim()} "
            f"with shape {tuple(video.shape)}"
        )
    t, h, w, c = video.shape
    if c != 3:
        raise ValueError(f"video must have 3 RGB channels last, got shape {tuple(video.shape)}")
    if t < 1:
        raise ValueError("video must have at least one frame")
    if h < spatial or w < spatial or h % spatial or w % spatial:
        raise ValueError(
            f"video height and width must be positive multiples of {spatial}, got {h}x{w} (HxW)"
        )


def check_codes(codes: object, codebook_size: int) -> None:
    """Validate a code grid for decoding: an integer tensor ``[t, h, w]`` in [0, codebook_size)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() != 3:
        raise ValueError(f"codes must have shape [t, h, w] (rank 3), got {tuple(codes.shape)}")
    if codes.numel() == 0:
        raise ValueError(f"codes must not be empty, got shape {tuple(codes.shape)}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), got range [{lo}, {hi}]")


def check_video_batch(videos: object, spatial: int = 8) -> None:
    """Validate a batch ``[B, T, H, W, 3]`` (B >= 1) for ``encode_batch``: every element, as
    :func:`check_video` checks one video (shape and dtype are shared by the whole batch)."""
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f"videos must be a torch.Tensor, got {type(videos).__name__}")
    if videos.dim() != 5 or videos.shape[0] < 1:
        raise ValueError(f"encode_batch expects [B, T, H, W, 3], B >= 1, got {tuple(videos.shape)}")
    check_video(videos.flatten(0, 1), spatial)  # [B*T, H, W, 3]: one check covers every element


def check_codes_batch(codes: object, codebook_size: int) -> None:
    """Validate a batch of code grids ``[B, t, h, w]`` (B >= 1): every element's range, not just
    the first's."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 4 or codes.shape[0] < 1:
        raise ValueError(f"decode_batch expects [B, t, h, w], B >= 1, got {tuple(codes.shape)}")
    check_codes(codes.flatten(0, 1), codebook_size)  # [B*t, h, w]


def video_to_unit(video: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` (or batched ``[B, T, H, W, 3]``) -> float32 ``[B, 3, T, H, W]``
    in [-1, 1] (B = 1 for an unbatched video)."""
    if video.dim() == 4:
        video = video.unsqueeze(0)  # [1, T, H, W, 3]
    x = video.permute(0, 4, 1, 2, 3).float()  # [B, 3, T, H, W] in [0, 255]
    return x / 127.5 - 1.0


def unit_to_video(x: torch.Tensor) -> torch.Tensor:
    """float ``[B, 3, T, H, W]`` in [-1, 1] -> uint8 ``[B, T, H, W, 3]`` (rounded, clamped)."""
    y = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()  # [B, 3, T, H, W] in [0, 255]
    return y.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()  # [B, T, H, W, 3]


def pad_video_frames(x: torch.Tensor, temporal: int, dim: int = 2) -> torch.Tensor:
    """Repeat the last frame along ``dim`` until ``T - 1`` is a multiple of ``temporal``.

    The encoder of a causal tokenizer consumes ``1 + temporal * k`` frames; a shorter tail group is
    completed by repeating the last frame, which matches ``latent_frames(T)``."""
    t = x.shape[dim]
    need = (-(t - 1)) % temporal
    if need == 0:
        return x
    last = x.narrow(dim, t - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = need
    return torch.cat([x, last.repeat(*reps)], dim=dim)


class VisualTokenizer(ABC):
    """Abstract visual tokenizer.

    Implementations set ``codebook_size``, ``spatial`` and ``temporal`` and implement
    :meth:`encode` / :meth:`decode`. Outputs are CPU tensors.
    """

    codebook_size: int
    spatial: int
    temporal: int
    # earlier latents that the pixels of a new latent depend on (0: latents decode independently);
    # None: not declared, and a StreamingDecoder keeps the window it is given
    context_latents: int | None = None

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` RGB frames: ``1 + ceil((T - 1) / temporal)``."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return 1 + math.ceil((num_frames - 1) / self.temporal)

    def rgb_frames(self, num_latents: int) -> int:
        """RGB frames produced by decoding ``num_latents`` latents: ``1 + temporal * (t - 1)``."""
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        return 1 + self.temporal * (num_latents - 1)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Shape ``(t, h, w)`` of the codes of a ``num_frames x height x width`` video."""
        return (
            self.latent_frames(num_frames),
            height // self.spatial,
            width // self.spatial,
        )

    def check_video(self, video: torch.Tensor) -> None:
        """Validate a video for :meth:`encode` (see :func:`check_video`)."""
        check_video(video, self.spatial)

    @abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> int64 codes ``[t, h, w]`` in [0, codebook_size)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes ``[t, h, w]`` -> uint8 video ``[rgb_frames(t), H, W, 3]``."""

    def decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[B, t, h, w]`` -> uint8 ``[B, rgb_frames(t), H, W, 3]`` (one by one unless
        an implementation batches)."""
        return torch.stack([self.decode(c) for c in codes])


class StreamingDecoder:
    """Decode latent frames one at a time as they are committed, for frame-by-frame streaming.

    Each :meth:`push` of one latent frame ``[h, w]`` returns only the NEW RGB frames it adds
    (1 for the first latent, ``temporal`` for each later one). The decoder re-decodes the last
    ``window`` latents (the new one included) so that earlier latents serve as causal context, and
    returns the tail. With ``window`` >= the number of latents pushed, the concatenated output
    equals ``tokenizer.decode`` of all codes; a smaller window bounds the cost per frame. A
    tokenizer that declares ``context_latents`` caps the window at ``context_latents + 1`` (1 for
    a per-frame tokenizer: each latent decodes alone, exactly).
    """

    def __init__(self, tokenizer: VisualTokenizer, window: int = 2) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if tokenizer.temporal > 1 and window < 2:
            raise ValueError(
                f"window must be >= 2 for a tokenizer with temporal={tokenizer.temporal}: a lone "
                "latent decodes to a single frame"
            )
        self.tokenizer = tokenizer
        ctx = getattr(tokenizer, "context_latents", None)
        self.window = window if ctx is None else min(window, ctx + 1)  # no more than it needs
        self._latents: deque[torch.Tensor] = deque(maxlen=self.window)  # each [h, w]
        self.latents_pushed = 0
        self.frames_emitted = 0

    def reset(self) -> None:
        """Forget all context (start a new video)."""
        self._latents.clear()
        self.latents_pushed = 0
        self.frames_emitted = 0

    def prime(self, codes: torch.Tensor) -> None:
        """Take latents ``[t, h, w]`` that were already shown (a stored video being continued) as
        causal context, without decoding them: the next push returns only its own new frames."""
        if codes.dim() != 3 or codes.shape[0] == 0:
            raise ValueError(f"prime expects latents [t, h, w], t >= 1, got {tuple(codes.shape)}")
        for c in codes[-self.window :]:
            self._append(c)
        self.latents_pushed += int(codes.shape[0])
        self.frames_emitted = self.tokenizer.rgb_frames(self.latents_pushed)

    def _append(self, codes: torch.Tensor) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"push expects one latent frame of shape [h, w], got {shape}")
        if self._latents and self._latents[-1].shape != codes.shape:
            raise ValueError(
                f"latent frame shape changed from {tuple(self._latents[-1].shape)} "
                f"to {tuple(codes.shape)}; call reset() to start a new video"
            )
        self._latents.append(codes.detach().to("cpu", torch.long))

    def stage(self, codes: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Commit one latent frame ``[h, w]``; return (the latents to decode ``[k, h, w]``, how
        many of the decoded RGB frames are new). :func:`decode_streams` decodes many at once."""
        self._append(codes)
        new = 1 if self.latents_pushed == 0 else self.tokenizer.temporal
        self.latents_pushed += 1
        self.frames_emitted += new
        return torch.stack(list(self._latents)), new  # [k, h, w], k <= window

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """Commit one latent frame ``[h, w]``; return its new RGB frames uint8 ``[n, H, W, 3]``."""
        return decode_streams([self], [codes])[0]


def decode_streams(
    decoders: list[StreamingDecoder], codes: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Push one latent frame ``[h, w]`` into each decoder (distinct decoders, e.g. one per
    session) and return each one's new RGB frames ``[n, H, W, 3]``, as ``push`` would, but with
    one ``decode_batch`` per group of equal windows: one forward for a step's committed frames."""
    if len(decoders) != len(codes):
        raise ValueError(f"{len(decoders)} decoders for {len(codes)} latent frames")
    staged = [d.stage(c) for d, c in zip(decoders, codes)]
    groups: dict[tuple, list[int]] = {}
    for i, (d, (window, _)) in enumerate(zip(decoders, staged)):
        groups.setdefault((id(d.tokenizer), tuple(window.shape)), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(decoders)
    for idx in groups.values():
        batch = torch.stack([staged[i][0] for i in idx])  # [b, k, h, w]
        frames = decoders[idx[0]].tokenizer.decode_batch(batch)  # [b, T', H, W, 3]
        for j, i in enumerate(idx):
            out[i] = frames[j, -staged[i][1] :]
    return out  # type: ignore[return-value]
