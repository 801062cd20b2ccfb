"""GPU-only paths, each with its CPU reference test named in the docstring (skipped without CUDA).

- compiled FlexAttention training forward/backward == dense SDPA (CPU reference:
  test_masks.py::test_flex_equals_dense, test_diffusion.py::test_loss_equals_naive_full_logits)
- the KV-cached sampler on CUDA in bf16 agrees with a float32 CPU run (CPU reference:
  test_sampler.py::test_cached_logits_equal_full_recompute)
- attn_backend auto picks a compiled FlexAttention BlockMask on CUDA, equal to the dense mask
  (CPU reference: test_masks.py::test_flex_equals_dense)
"""

from __future__ import annotations

import pytest
import torch

from lumos.config import SamplerConfig
from lumos.diffusion import ardf_loss
from lumos.masks import frame_causal_block_mask, frame_causal_dense
from lumos.model import build_model
from lumos.sampler import VideoRequest, generate

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
        first: list[torch.Tensor] = []  # the first step's guided logits of frame 0

        def keep(video, k, step, logits, first=first):
            if k == 0 and step == 0:
                first.append(logits.float().cpu())

        g = torch.Generator(device=device).manual_seed(0)
        generate(model, layout, [VideoRequest([5, 6], 1, generator=g)], sc, on_logits=keep)
        outs.append(first[0])
    assert torch.allclose(outs[0], outs[1], atol=5e-2, rtol=5e-2)


def test_official_prefill_uses_compiled_flex_on_cuda(tiny_cfg, layout):
    """attn_backend auto: the prefill's frame-causal mask is a BlockMask on CUDA and gives the
    dense mask's cache (CPU reference: test_masks.py::test_flex_equals_dense)."""
    from lumos.masks import frame_causal, uses_flex

    assert uses_flex("auto", "cuda") and not uses_flex("auto", "cpu")
    b = _batch(layout)
    mask = frame_causal(b["frame"], b["valid"], "auto", "cuda")
    assert not isinstance(mask, torch.Tensor)  # a FlexAttention BlockMask
    model = build_model(tiny_cfg, seed=0).cuda().eval()
    with torch.no_grad():
        dense = model(b["inputs"].cuda(), b["positions"].cuda(), frame_causal_dense(
            b["frame"].cuda(), b["valid"].cuda()))  # fmt: skip
        flex = model(b["inputs"].cuda(), b["positions"].cuda(), mask)
    valid = b["valid"].cuda()
    assert torch.allclose(dense[valid], flex[valid], atol=1e-3)
