"""Adapter for NVIDIA's Cosmos-Tokenizer DV4x8x8 (discrete video, TorchScript release).

The user downloads the tokenizer folder themselves; it holds ``encoder.jit`` and ``decoder.jit``.
Call conventions of the discrete TorchScript modules:

* ``encoder(x)`` with ``x`` float ``[B, 3, T, H, W]`` in [-1, 1] returns a tuple whose first element
  is the integer indices ``[B, t, h, w]`` (the second is the quantized FSQ codes);
* ``decoder(indices)`` with ``indices`` ``[B, t, h, w]`` returns float ``[B, 3, T', H, W]`` in
  [-1, 1], ``T' = 1 + 4 (t - 1)``.

DV4x8x8 uses FSQ levels (8, 8, 8, 5, 5, 5) -> 64,000 codes, 8x spatial and 4x causal temporal
compression. Videos whose ``T - 1`` is not a multiple of 4 are padded by repeating the last frame.
"""

from __future__ import annotations

from pathlib import Path

import torch

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

__all__ = ["CosmosTokenizer", "TokenizerLoadError", "ENCODER_FILE", "DECODER_FILE"]

ENCODER_FILE = "encoder.jit"
DECODER_FILE = "decoder.jit"


def _load_jit(folder: Path, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    path = folder / name
    if not path.is_file():
        raise TokenizerLoadError(
            f"Cosmos tokenizer folder {str(folder)!r} has no {name} (expected {str(path)!r})"
        )
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # TorchScript raises RuntimeError or its own types
        raise TokenizerLoadError(
            f"cannot load {name} from Cosmos tokenizer folder {str(folder)!r}: {exc}"
        ) from exc
    return module.to(device=device, dtype=dtype).eval()


class CosmosTokenizer(VisualTokenizer):
    """Cosmos-Tokenizer-DV4x8x8 behind the :class:`VisualTokenizer` interface.

    ``folder`` holds ``encoder.jit`` and ``decoder.jit``. The modules run on ``device`` in
    ``dtype`` (bfloat16 is the released precision; use float32 for exact CPU tests). Outputs of
    :meth:`encode` / :meth:`decode` are CPU tensors.
    """

    def __init__(
        self,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        *,
        codebook_size: int = 64_000,
        spatial: int = 8,
        temporal: int = 4,
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TokenizerLoadError(
                f"Cosmos tokenizer folder {str(self.folder)!r} does not exist or is not a "
                f"directory (it must contain {ENCODER_FILE} and {DECODER_FILE})"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.codebook_size = codebook_size
        self.spatial = spatial
        self.temporal = temporal
        self.encoder = _load_jit(self.folder, ENCODER_FILE, self.device, dtype)
        self.decoder = _load_jit(self.folder, DECODER_FILE, self.device, dtype)

    def __repr__(self) -> str:
        return (
            f"CosmosTokenizer(folder={str(self.folder)!r}, device={str(self.device)!r}, "
            f"dtype={self.dtype}, codebook_size={self.codebook_size})"
        )

    @torch.no_grad()
    def encode_batch(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` -> int64 CPU codes ``[B, latent_frames(T), H/8, W/8]``."""
        check_video_batch(videos, self.spatial)
        b, t, h, w, _ = videos.shape
        x = video_to_unit(videos.to(self.device))  # [B, 3, T, H, W] in [-1, 1]
        x = pad_video_frames(x, self.temporal, dim=2).to(self.dtype)  # [B, 3, 1 + 4k, H, W]
        out = self.encoder(x)
        indices = out[0] if isinstance(out, (tuple, list)) else out  # [B, t, h, w]
        expected = (b, *self.latent_shape(t, h, w))
        if not isinstance(indices, torch.Tensor) or tuple(indices.shape) != expected:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices)
            raise RuntimeError(
                f"Cosmos encoder returned indices of shape {got}, expected {expected}; is "
                f"{str(self.folder)!r} a discrete DV4x8x8 tokenizer?"
            )
        return indices.to("cpu", torch.long)

    @torch.no_grad()
    def decode_batch(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[B, t, h, w]`` -> uint8 CPU video ``[B, 1 + 4(t - 1), 8h, 8w, 3]``."""
        check_codes_batch(codes, self.codebook_size)
        y = self.decoder(codes.to(self.device, torch.long))  # [B, 3, T', H, W] in [-1, 1]
        if isinstance(y, (tuple, list)):
            y = y[0]
        return unit_to_video(y).cpu()  # [B, T', H, W, 3]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> int64 CPU codes ``[latent_frames(T), H/8, W/8]``."""
        check_video(video, self.spatial)
        return self.encode_batch(video.unsqueeze(0))[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[t, h, w]`` -> uint8 CPU video ``[1 + 4(t - 1), 8h, 8w, 3]``."""
        check_codes(codes, self.codebook_size)
        return self.decode_batch(codes.unsqueeze(0))[0]
