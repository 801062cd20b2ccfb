"""The bundled default model (src/lumos/assets/fmnist): it loads, is trained, and generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lumos.data import MovingFashionConfig, make_clip
from lumos.devices import cpu_has_fast_bf16, resolve_dtype
from lumos.pipeline import BUNDLED, Pipeline
from lumos.tokenizers import evaluate_reconstruction


def test_bundle_files_and_size():
    files = [p for p in BUNDLED.rglob("*") if p.is_file()]
    names = {p.relative_to(BUNDLED).as_posix() for p in files}
    for need in ("pipeline.json", "model/config.json", "model/model.safetensors"):
        assert need in names, f"bundled model lacks {need}"
    assert "text_tokenizer.json" in names and "tokenizer/model.safetensors" in names
    assert sum(p.stat().st_size for p in files) < 30 * 2**20  # <= 30 MB with the tokenizer
    card = (BUNDLED.parents[3] / "docs" / "MODEL_CARD.md").read_text()
    assert "lumos train" in card and "PSNR" in card


def test_bundled_tokenizer_is_trained():
    pipe = Pipeline.from_folder()
    clips = [
        torch.from_numpy(
            make_clip(np.random.default_rng(i), MovingFashionConfig(), "heldout").video
        )
        for i in range(4)
    ]
    rec = evaluate_reconstruction(pipe.visual, clips)
    assert rec["psnr"] > 22.0  # an untrained tokenizer gives ~13 dB


def test_bundled_pipeline_generates_video_and_image():
    pipe = Pipeline.from_folder()
    meta = json.loads((BUNDLED / "model" / "config.json").read_text())
    assert meta["model"]["vocab"] == pipe.model.cfg.vocab
    # sampling defaults chosen on seen prompts (docs/MODEL_CARD.md): CFG 4, no confidence noise
    sc = pipe.sampler_config()
    assert (sc.cfg, sc.tau0, sc.history_mask_ratio) == (4.0, 0.0, 0.7)
    video = pipe.text_to_video("a red sneaker moves left slowly", frames=3, steps=4, seed=1)
    assert video.shape == (3, 64, 64, 3) and video.dtype == torch.uint8
    image = pipe.text_to_image("a blue bag", steps=4)
    assert image.shape == (1, 64, 64, 3)
    # the clip is not blank: trained models draw items on a black background
    assert video.float().mean() > 1.0


def test_inference_dtype_auto_and_explicit():
    fast = cpu_has_fast_bf16()
    assert resolve_dtype(None, "cpu") == (torch.bfloat16 if fast else torch.float32)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("fp32", "cuda") == torch.float32
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    assert next(Pipeline.from_folder("random:tiny").model.parameters()).dtype == torch.float32
    rnd = Pipeline.from_folder("random:tiny", dtype="bfloat16")
    assert next(rnd.model.parameters()).dtype == torch.bfloat16
    for name, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        pipe = Pipeline.from_folder(dtype=name)
        assert next(pipe.model.parameters()).dtype == want
        video = pipe.text_to_video("a red sneaker moves left", frames=2, steps=4, seed=3)
        assert video.shape == (2, 64, 64, 3) and video.float().mean() > 1.0
