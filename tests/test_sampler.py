"""Per-frame KV-cached MaskGIT sampler: cache == recompute, batched CFG, determinism, I2V."""

from __future__ import annotations

import math

import pytest
import torch

from lumos.config import SamplerConfig
from lumos.sampler import (
    VideoBatch,
    VideoRequest,
    generate,
    history_mask,
    keep_count,
    maskgit_step,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _probe(batch, seed=3):
    """Logits of the next block with a fixed partial frame (half the slots known)."""
    n = batch.layout.n_codes
    codes = torch.randint(0, 512, (batch.b, n), generator=_gen(seed))
    known = torch.rand(batch.b, n, generator=_gen(seed + 1)) < 0.5
    return batch.frame_logits(batch._blocks(), codes, known)


def test_history_mask_indices():
    m = history_mask(20, 0.7)
    n = round(0.7 * 20)
    assert m.sum() == n
    assert torch.nonzero(m).squeeze(1).tolist() == [round(i * 20 / n) for i in range(n)]


def test_keep_schedule():
    n, s = 100, 10
    masked, seen = n, []
    for step in range(s):
        masked = keep_count(n, step, s, masked)
        seen.append(masked)
    assert seen[-1] == 0
    assert seen[0] == math.floor(n * math.cos(math.pi / 2 / s))
    assert all(a >= b for a, b in zip(seen, seen[1:]))


def test_maskgit_step_keeps_known_and_remasks_least_confident():
    g = _gen(0)
    codes = torch.tensor([[7, 0, 0, 0]])
    known = torch.tensor([[True, False, False, False]])
    logits = torch.full((1, 4, 10), -50.0)
    logits[0, 1, 3] = logits[0, 1, 5] = 50.0  # log p(x) = log 1/2
    logits[0, 2, 4] = 50.0  # log p(x) = 0: most confident
    logits[0, 3] = 0.0  # uniform: least confident
    assert keep_count(4, 0, 4, 3) == 2
    new, k = maskgit_step(codes, known, logits, 0, 4, 0.0, [g])
    assert new[0, 0] == 7 and new[0, 1] in (3, 5) and new[0, 2] == 4
    assert k.tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("given", [0, 2])
def test_cached_logits_equal_full_recompute(tiny_model, layout, given):
    sc = SamplerConfig(steps=4, cfg=3.0)
    giv = torch.randint(0, 512, (given, 3, 4), generator=_gen(0)) if given else None
    outs = []
    for use_cache in (True, False):
        req = VideoRequest([5, 6, 7], 2, given=giv, generator=_gen(11))
        batch = VideoBatch(tiny_model, layout, [req], sc, use_cache=use_cache)
        batch.next_frame()  # one committed, history-masked frame in the context
        outs.append(_probe(batch))
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_batched_cfg_equals_two_separate_passes(tiny_model, layout):
    g = 4.0
    both = VideoBatch(tiny_model, layout, [VideoRequest([5, 6], 1)], SamplerConfig(steps=2, cfg=g))
    cond = VideoBatch(tiny_model, layout, [VideoRequest([5, 6], 1)], SamplerConfig(steps=2, cfg=1))
    unc = VideoBatch(tiny_model, layout, [VideoRequest(None, 1)], SamplerConfig(steps=2, cfg=1))
    lb, lc, lu = _probe(both), _probe(cond), _probe(unc)
    assert lb.shape[0] == 2 and lc.shape[0] == 1
    assert torch.allclose(lb[0], lc[0], atol=1e-4) and torch.allclose(lb[1], lu[0], atol=1e-4)


def test_same_seed_same_video_and_all_decoded(tiny_model, layout):
    sc = SamplerConfig(steps=6, cfg=5.0)
    a = generate(tiny_model, layout, [VideoRequest([5], 3, generator=_gen(1))], sc)[0]
    b = generate(tiny_model, layout, [VideoRequest([5], 3, generator=_gen(1))], sc)[0]
    c = generate(tiny_model, layout, [VideoRequest([5], 3, generator=_gen(2))], sc)[0]
    assert a.shape == (3, 3, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a < layout.vocab.codebook_size)).all()


def test_every_slot_decoded_after_s_steps(tiny_model, layout):
    sc = SamplerConfig(steps=5, cfg=2.0)
    batch = VideoBatch(tiny_model, layout, [VideoRequest([5], 1, generator=_gen(0))], sc)
    masked_after = []
    import lumos.sampler as smp

    orig = smp.maskgit_step

    def spy(*a, **k):
        codes, known = orig(*a, **k)
        masked_after.append(int((~known).sum()))
        return codes, known

    smp.maskgit_step = spy
    try:
        batch.next_frame()
    finally:
        smp.maskgit_step = orig
    n = layout.n_codes
    assert len(masked_after) == 5 and masked_after[-1] == 0
    assert masked_after[0] == math.floor(n * math.cos(math.pi / 2 * 1 / 5))


def test_commit_history_masks_cache_not_video(tiny_model, layout):
    sc = SamplerConfig(steps=3, cfg=2.0)
    batch = VideoBatch(tiny_model, layout, [VideoRequest([5], 1, generator=_gen(0))], sc)
    codes = batch.next_frame()
    v = layout.vocab
    for row in batch.rows:  # cond and uncond caches hold the same masked pattern
        block = row.tokens[-layout.block_len :]
        content = block[3 : 3 + layout.content_len]
        assert torch.equal(content == v.mask, history_mask(layout.content_len, 0.7))
    assert (codes >= 0).all()


def test_i2v_given_frame_is_history_masked(tiny_model, layout):
    giv = torch.randint(0, 512, (1, 3, 4), generator=_gen(0))
    batch = VideoBatch(
        tiny_model, layout, [VideoRequest([5], 1, given=giv)], SamplerConfig(steps=2)
    )
    sp = batch.rows[0].spans[0]
    content = batch.rows[0].tokens[sp.content_start : sp.content_start + layout.content_len]
    assert torch.equal(content == layout.vocab.mask, history_mask(layout.content_len, 0.7))
    out = generate(tiny_model, layout, [VideoRequest([5], 2, given=giv)], SamplerConfig(steps=2))
    assert torch.equal(out[0][0], giv[0]) and out[0].shape[0] == 3


def test_continuation_rebuilds_the_same_cache(tiny_model, layout):
    sc = SamplerConfig(steps=3, cfg=3.0)
    first = VideoBatch(tiny_model, layout, [VideoRequest([5, 6], 4, generator=_gen(5))], sc)
    frames = torch.cat([first.next_frame() for _ in range(2)])  # [2, h, w]
    later = VideoBatch(tiny_model, layout, [VideoRequest([5, 6], 2, given=frames)], sc)
    assert first.cache.lengths == later.cache.lengths
    assert torch.allclose(_probe(first), _probe(later), atol=1e-4)


def test_several_videos_in_one_batch_match_alone(tiny_model, layout):
    sc = SamplerConfig(steps=4, cfg=3.0)
    reqs = lambda: [  # noqa: E731
        VideoRequest([5, 6, 7], 2, generator=_gen(1)),
        VideoRequest([9], 2, given=torch.zeros(1, 3, 4, dtype=torch.long), generator=_gen(2)),
    ]
    together = generate(tiny_model, layout, reqs(), sc)
    alone = [generate(tiny_model, layout, [r], sc)[0] for r in reqs()]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def test_tau_resets_per_frame_unless_reference_compat(tiny_model, layout):
    sc = SamplerConfig(steps=3, reference_compat=True)
    batch = VideoBatch(tiny_model, layout, [VideoRequest([5], 2, generator=_gen(0))], sc)
    batch.next_frame()
    assert batch._tau_state == 0.0  # the released code's compounding temperature is 0 from now on
    from lumos.sampler import tau_at

    assert tau_at(SamplerConfig(steps=3), 0) == pytest.approx(2 / 3)


def test_top_k_top_p_filters():
    from lumos.sampler import filter_logits

    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(x, 2, None)[0, [0, 3]]).all()
    y = filter_logits(x, None, 0.5)
    assert torch.isfinite(y[0, 1]) and torch.isinf(y[0, [0, 3]]).all()


def test_temperature_sharpens_the_code_distribution():
    from lumos.sampler import _categorical, filter_logits

    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.allclose(filter_logits(x, None, None, 0.5), 2 * x)
    assert torch.equal(filter_logits(x, None, None, 1.0), x)
    # with temperature the nucleus is taken from the sharpened distribution: 3.0 alone is > 0.5
    assert torch.isinf(filter_logits(x, None, 0.5, 0.5)[0, [0, 2, 3]]).all()
    g = _gen(0)
    rows = torch.tensor([[0.0, 1.0, 0.5, -1.0]]).expand(4000, 4)
    cold = _categorical(filter_logits(rows, None, None, 0.25).softmax(-1), g)
    warm = _categorical(rows.softmax(-1), g)
    assert (cold == 1).float().mean() > (warm == 1).float().mean() + 0.3
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplerConfig(temperature=0.0)


def test_gumbel_noise_is_finite_and_gumbel_distributed():
    from lumos.sampler import _gumbel

    x = _gumbel((200_000,), _gen(0), "cpu")
    assert torch.isfinite(x).all()
    assert abs(x.mean().item() - 0.5772) < 0.02  # Euler-Mascheroni
    assert abs(x.var().item() - math.pi**2 / 6) < 0.05
