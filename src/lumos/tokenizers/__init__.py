"""Tokenizers of Lumos: visual tokenizers (Cosmos DV4x8x8 adapter, built-in FSQ video tokenizer),
the FSQ quantizer, a streaming decoder and the text tokenizer.

:func:`load_visual_tokenizer` picks the right visual tokenizer class from a folder's contents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import (
    StreamingDecoder,
    TokenizerLoadError,
    VisualTokenizer,
    check_codes,
    check_codes_batch,
    check_video,
    check_video_batch,
    decode_streams,
    pad_video_frames,
    unit_to_video,
    video_to_unit,
)
from .cosmos import DECODER_FILE, ENCODER_FILE, CosmosTokenizer
from .fsq import FSQ, round_ste
from .fsq_train import evaluate_reconstruction, make_synthetic_videos, psnr, ssim, train_tokenizer
from .text import PAD_TOKEN, TextTokenizer, train_bpe
from .video_fsq import CONFIG_FILE, PRESETS, WEIGHTS_FILE, FSQTokenizerConfig, FSQVideoTokenizer

__all__ = [
    "CONFIG_FILE",
    "DECODER_FILE",
    "ENCODER_FILE",
    "FSQ",
    "PAD_TOKEN",
    "PRESETS",
    "WEIGHTS_FILE",
    "CosmosTokenizer",
    "FSQTokenizerConfig",
    "FSQVideoTokenizer",
    "StreamingDecoder",
    "decode_streams",
    "TextTokenizer",
    "TokenizerLoadError",
    "VisualTokenizer",
    "check_codes",
    "check_codes_batch",
    "check_video",
    "check_video_batch",
    "evaluate_reconstruction",
    "load_visual_tokenizer",
    "make_synthetic_videos",
    "pad_video_frames",
    "psnr",
    "round_ste",
    "ssim",
    "train_bpe",
    "train_tokenizer",
    "unit_to_video",
    "video_to_unit",
]


def load_visual_tokenizer(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> VisualTokenizer:
    """Load the visual tokenizer stored in ``folder``.

    * ``encoder.jit`` + ``decoder.jit`` -> :class:`CosmosTokenizer` (``dtype`` defaults to
      bfloat16 on CUDA and float32 elsewhere);
    * ``config.json`` + ``model.safetensors`` -> :class:`FSQVideoTokenizer` (float32; ``dtype``
      casts it if given).

    Raises :class:`TokenizerLoadError` when the folder is missing or matches neither layout.
    """
    path = Path(folder)
    if not path.is_dir():
        raise TokenizerLoadError(f"visual tokenizer folder {str(path)!r} does not exist")
    has = {name: (path / name).is_file() for name in (ENCODER_FILE, DECODER_FILE)}
    if any(has.values()):
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return CosmosTokenizer(path, device=device, dtype=dtype)  # names a missing file
    if (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        model = FSQVideoTokenizer.load(path, device=device)  # names a missing file
        return model.to(dtype) if dtype is not None else model
    raise TokenizerLoadError(
        f"{str(path)!r} is not a visual tokenizer folder: expected {ENCODER_FILE} + "
        f"{DECODER_FILE} (Cosmos) or {CONFIG_FILE} + {WEIGHTS_FILE} (Lumos FSQ tokenizer)"
    )
