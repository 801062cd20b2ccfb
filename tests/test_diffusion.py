"""AR-DF objective: ratios, tube/random/independent masks, the masked visual loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lumos.config import DiffusionConfig
from lumos.diffusion import (
    ardf_loss,
    collate,
    content_mask,
    make_sample,
    mask_ratio,
    random_mask,
    tube_mask,
)
from lumos.masks import frame_causal_dense


def test_mask_ratio_floor():
    assert float(mask_ratio(0.0, 0.7)) == 1.0
    assert float(mask_ratio(1.0, 0.7)) == 0.7
    assert math.isclose(float(mask_ratio(1 / 3, 0.0)), math.cos(math.pi / 6))


def test_tube_mask_same_subset_every_frame():
    g = torch.Generator().manual_seed(0)
    m = tube_mask(5, 40, 0.75, g)
    assert m.shape == (5, 40) and m.sum(1).eq(30).all()
    assert (m == m[0]).all()


def test_random_mask_is_not_a_tube():
    g = torch.Generator().manual_seed(0)
    m = random_mask(5, 40, 0.75, g)
    assert m.sum() == 150 and not (m == m[0]).all()


def test_ratio_statistics():
    g = torch.Generator().manual_seed(0)
    ratios = torch.stack([content_mask("tube", 2, 200, 0.7, g).float().mean() for _ in range(2000)])
    tstar = 2 / math.pi * math.acos(0.7)
    expected = 2 / math.pi * math.sin(math.pi * tstar / 2) + 0.7 * (1 - tstar)
    assert ratios.min() >= 0.7 - 1e-6 and ratios.max() <= 1.0
    assert abs(ratios.mean().item() - expected) < 0.01


def test_independent_masks_differ_per_frame():
    g = torch.Generator().manual_seed(1)
    m = content_mask("independent", 6, 100, 0.0, g)
    assert len(set(m.sum(1).tolist())) > 1


def test_sample_masks_only_content_and_loss_only_on_codes(layout):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 512, (3, 3, 4), generator=g)
    s = make_sample(layout, codes, [5, 6], DiffusionConfig(text_dropout=0.0), 2, 12, g)
    v = layout.vocab
    masked = s.inputs == v.mask
    assert masked.sum() > 0
    assert (s.seq.kind[masked] == 2).all()  # only content slots
    assert s.loss_mask.sum() <= masked.sum() and (s.inputs[s.loss_mask] == v.mask).all()
    assert v.is_visual(s.seq.tokens[s.loss_mask]).all()  # masked new-lines get no loss
    # tube: the same content slots are masked in every frame
    per = [masked[sp.content_start : sp.content_start + layout.content_len] for sp in s.seq.spans]
    assert all(torch.equal(per[0], p) for p in per)


def test_context_frames_are_inputs_but_not_supervised(layout):
    codes = torch.randint(0, 512, (3, 3, 4), generator=torch.Generator().manual_seed(1))
    cfg = DiffusionConfig(text_dropout=0.0)
    full = make_sample(layout, codes, [5, 6], cfg, 2, 12, torch.Generator().manual_seed(2))
    late = make_sample(
        layout, codes, [5, 6], cfg, 2, 12, torch.Generator().manual_seed(2), context=2
    )
    assert torch.equal(full.inputs, late.inputs)  # the history is masked the same way
    cut = full.seq.spans[2].start
    assert not late.loss_mask[:cut].any() and full.loss_mask[:cut].any()
    assert torch.equal(late.loss_mask[cut:], full.loss_mask[cut:])
    with pytest.raises(ValueError, match="context 3 must be in"):
        make_sample(layout, codes, [5], cfg, 2, 12, context=3)


def test_text_dropout_starts_at_video_start(layout):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 512, (2, 3, 4), generator=g)
    s = make_sample(layout, codes, [5, 6], DiffusionConfig(text_dropout=1.0), 2, 12, g)
    assert s.seq.tokens[0] == layout.vocab.video_start and s.seq.index[0] == 0


def _batch(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = DiffusionConfig(text_dropout=0.0)
    samples = [
        make_sample(
            layout, torch.randint(0, 512, (3, 3, 4), generator=g), [5, 6, 7], cfg, 2, 12, g
        ),
        make_sample(layout, torch.randint(0, 512, (2, 3, 4), generator=g), [9], cfg, 2, 12, g),
    ]
    return collate(samples, "mm", 0)


def test_loss_equals_naive_full_logits(tiny_model, layout):
    b = _batch(layout)
    out = ardf_loss(tiny_model, b, chunk=7)  # small chunks on purpose
    logits = tiny_model(b["inputs"], b["positions"], frame_causal_dense(b["frame"], b["valid"]))
    v = layout.vocab
    vis = logits[..., v.visual_offset : v.visual_offset + v.codebook_size]
    naive = F.cross_entropy(vis[b["loss_mask"]], b["targets"][b["loss_mask"]] - v.visual_offset)
    assert torch.allclose(out["loss"], naive, atol=1e-5)
    assert out["frame_count"].sum() == b["loss_mask"].sum()
    assert torch.allclose(out["frame_sum"].sum() / out["frame_count"].sum(), naive, atol=1e-5)
    # every term, with its sample row and latent frame (what the ablations benchmark reads)
    per = F.cross_entropy(
        vis[b["loss_mask"]], b["targets"][b["loss_mask"]] - v.visual_offset, reduction="none"
    )
    assert torch.allclose(out["per_token"], per, atol=1e-5)
    rows = torch.nonzero(b["loss_mask"])[:, 0]
    assert torch.equal(out["rows"], rows) and torch.equal(out["frames"], b["frame"][b["loss_mask"]])
    assert set(out["rows"].tolist()) == {0, 1}


def test_only_masked_visual_positions_contribute(tiny_model, layout):
    b = _batch(layout)
    base = ardf_loss(tiny_model, b)["loss"]
    changed = dict(b)
    t = b["targets"].clone()
    t[~b["loss_mask"] & layout.vocab.is_visual(t)] = layout.vocab.visual_offset  # unmasked targets
    changed["targets"] = t
    assert torch.equal(ardf_loss(tiny_model, changed)["loss"], base)


def test_loss_backward_reaches_head_and_embeddings(tiny_model, layout):
    model = tiny_model.train()
    try:
        model.zero_grad()
        ardf_loss(model, _batch(layout))["loss"].backward()
        assert model.lm_head.weight.grad.abs().sum() > 0
        assert model.embed_tokens.weight.grad.abs().sum() > 0
        v = layout.vocab
        text_rows = model.lm_head.weight.grad[: v.visual_offset]
        assert text_rows.abs().sum() == 0  # only the visual rows are projected
    finally:
        model.zero_grad()
        model.eval()
