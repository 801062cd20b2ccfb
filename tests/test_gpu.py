"""GPU-only paths, each with its CPU reference test named in the docstring (skipped without CUDA).

- compiled FlexAttention training forward/backward == dense SDPA (CPU reference:
  test_masks.py::test_flex_equals_dense, test_diffusion.py::test_loss_equals_naive_full_logits)
- the KV-cached sampler on CUDA in bf16 agrees with a float32 CPU run (CPU reference:
  test_sampler.py::test_cached_logits_equal_full_recompute)
"""

from __future__ import annotations

import pytest
import torch

from lumos.config import SamplerConfig
from lumos.diffusion import ardf_loss
from lumos.masks import frame_causal_block_mask, frame_causal_dense
from lumos.model import build_model
from lumos.sampler import VideoBatch, VideoRequest

pytestmark = pytest.mark.gpu


def _batch(layout):
    from lumos.config import DiffusionConfig
    from lumos.diffusion import collate, make_sample

    g = torch.Generator().manual_seed(0)
    cfg = DiffusionConfig(text_dropout=0.0)
    samples = [
        make_sample(layout, torch.randint(0, 512, (4, 3, 4), generator=g), [5, 6], cfg, 2, 12, g)
        for _ in range(2)
    ]
    return collate(samples, "mm", 0)


def test_compiled_flex_matches_dense_with_gradients(tiny_cfg, layout):
    model = build_model(tiny_cfg, seed=0).cuda().train()
    b = {k: v.cuda() for k, v in _batch(layout).items()}
    dense = ardf_loss(model, b, mask=frame_causal_dense(b["frame"], b["valid"]))
    dense["loss"].backward()
    g_dense = model.lm_head.weight.grad.clone()
    model.zero_grad()
    flex = ardf_loss(model, b, mask=frame_causal_block_mask(b["frame"], b["valid"]))
    flex["loss"].backward()
    assert torch.allclose(dense["loss"], flex["loss"], atol=1e-4)
    assert torch.allclose(g_dense, model.lm_head.weight.grad, atol=1e-4)


def test_sampler_cuda_bf16_close_to_cpu(tiny_cfg, layout):
    sc = SamplerConfig(steps=3, cfg=3.0)
    outs = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = build_model(tiny_cfg, seed=0).to(device=device, dtype=dtype).eval()
        batch = VideoBatch(model, layout, [VideoRequest([5, 6], 1)], sc)
        codes = torch.zeros(1, layout.n_codes, dtype=torch.long, device=device)
        known = torch.zeros_like(codes, dtype=torch.bool)
        outs.append(batch.frame_logits(batch._blocks(), codes, known).float().cpu())
    assert torch.allclose(outs[0], outs[1], atol=5e-2, rtol=5e-2)
