"""Per-frame KV-cached MaskGIT sampler: cache == recompute, batched CFG, determinism, I2V, and
the rolling context window (positions, exactness when it never slides, continuation)."""

from __future__ import annotations

import math

import pytest
import torch

from lumos.config import SamplerConfig
from lumos.sampler import (
    VideoRequest,
    VideoState,
    block_forward,
    cache_tokens,
    code_logits,
    generate,
    history_mask,
    keep_count,
    maskgit_step,
    prefill,
    window_start,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _state(model, layout, text, sc, given=None, seed=0):
    return VideoState(layout, sc, text, 2, 12, given, _gen(seed), model.cfg.rope)


def _probe(model, layout, text, sc, given=None, seed=3):
    """Logits of the next block after `given` frames with a fixed partial frame (half known)."""
    st = _state(model, layout, text, sc, given)
    cache = prefill(model, layout, st.prefill_rows(), st.capacity(1))
    st.begin_frame()
    n = layout.n_codes
    st.codes = torch.randint(0, 512, (1, n), generator=_gen(seed))
    st.known = torch.rand(1, n, generator=_gen(seed + 1)) < 0.5
    hidden = block_forward(model, st.step_tokens(), st.block_pos, cache)
    return code_logits(model, hidden, layout.code_offsets)


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


WINDOWS = [(None, 1), (2, 1), (3, 2)]  # (window, stride): none, slide every frame, every 2nd


@pytest.mark.parametrize("window,stride", WINDOWS)
@pytest.mark.parametrize("given,g", [(0, None), (2, None), (2, 1)])
def test_cached_logits_equal_full_recompute(tiny_model, layout, given, g, window, stride):
    """Every step's logits with the cache (incremental commits, window rebuilds) equal a full
    frame-causal recompute of the window + block, and so do the codes."""
    sc = SamplerConfig(steps=3, cfg=3.0, window=window, window_stride=stride, guidance_steps=g)
    giv = torch.randint(0, 512, (given, 3, 4), generator=_gen(0)) if given else None
    runs = []
    for use_cache in (True, False):
        seen = {}
        req = VideoRequest([5, 6, 7], 6, given=giv, generator=_gen(11))
        codes = generate(
            tiny_model,
            layout,
            [req],
            sc,
            use_cache=use_cache,
            on_logits=lambda i, k, s, lg, seen=seen: seen.__setitem__((i, k, s), lg.clone()),
        )[0]
        runs.append((codes, seen))
    (c1, l1), (c2, l2) = runs
    assert torch.equal(c1, c2) and set(l1) == set(l2) and len(l1) == 6 * 3
    for key in l1:
        assert torch.allclose(l1[key], l2[key], atol=1e-4), key


def test_batched_cfg_equals_two_separate_passes(tiny_model, layout):
    g = 4.0
    lb = _probe(tiny_model, layout, [5, 6], SamplerConfig(steps=2, cfg=g))
    lc = _probe(tiny_model, layout, [5, 6], SamplerConfig(steps=2, cfg=1))
    lu = _probe(tiny_model, layout, None, SamplerConfig(steps=2, cfg=1))
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
    masked_after = []
    import lumos.sampler as smp

    orig = smp.maskgit_step

    def spy(*a, **k):
        codes, known = orig(*a, **k)
        masked_after.append(int((~known).sum()))
        return codes, known

    smp.maskgit_step = spy
    try:
        generate(tiny_model, layout, [VideoRequest([5], 1, generator=_gen(0))], sc)
    finally:
        smp.maskgit_step = orig
    n = layout.n_codes
    assert len(masked_after) == 5 and masked_after[-1] == 0
    assert masked_after[0] == math.floor(n * math.cos(math.pi / 2 * 1 / 5))


def test_commit_history_masks_cache_not_video(tiny_model, layout):
    sc = SamplerConfig(steps=3, cfg=2.0)
    st = _state(tiny_model, layout, [5], sc)
    cache = prefill(tiny_model, layout, st.prefill_rows(), st.capacity(1))
    st.begin_frame()
    while not st.frame_done:
        st.decode(
            code_logits(
                tiny_model,
                block_forward(tiny_model, st.step_tokens(), st.block_pos, cache),
                layout.code_offsets,
            )
        )
    toks = st.commit_tokens()  # [rows, B_f]: what enters the cache
    v, hm = layout.vocab, history_mask(layout.content_len, 0.7)
    for row in toks:  # cond and uncond caches hold the same masked pattern
        content = row[3 : 3 + layout.content_len]
        assert torch.equal(content == v.mask, hm)
    codes = st.committed()  # the video keeps every code
    assert codes.shape == (3, 4) and (codes >= 0).all()
    assert torch.equal(st.frames[-1], codes) and st.k == 1
    for row in st.prefill_rows():  # a rebuild masks the same slots
        block = row.tokens[-layout.block_len :]
        assert torch.equal(block[3 : 3 + layout.content_len] == v.mask, hm)


def test_i2v_given_frame_is_history_masked(tiny_model, layout):
    giv = torch.randint(0, 512, (1, 3, 4), generator=_gen(0))
    st = _state(tiny_model, layout, [5], SamplerConfig(steps=2), given=giv)
    row = st.prefill_rows()[0]
    sp = row.spans[0]
    content = row.tokens[sp.content_start : sp.content_start + layout.content_len]
    assert torch.equal(content == layout.vocab.mask, history_mask(layout.content_len, 0.7))
    out = generate(tiny_model, layout, [VideoRequest([5], 2, given=giv)], SamplerConfig(steps=2))
    assert torch.equal(out[0][0], giv[0]) and out[0].shape[0] == 3


def test_continuation_rebuilds_the_same_cache(tiny_model, layout):
    sc = SamplerConfig(steps=3, cfg=3.0)
    frames = generate(tiny_model, layout, [VideoRequest([5, 6], 2, generator=_gen(5))], sc)[0]
    st = _state(tiny_model, layout, [5, 6], sc, given=frames)
    assert st.lengths == [len(p) + 2 * layout.block_len for p in st.prefixes]
    a = _probe(tiny_model, layout, [5, 6], sc, given=frames)
    b = _probe(tiny_model, layout, [5, 6], sc, given=frames.clone())
    assert torch.equal(a, b)


def test_several_videos_in_one_batch_match_alone(tiny_model, layout):
    sc = SamplerConfig(steps=4, cfg=3.0, window=2)  # the second video slides a frame earlier
    reqs = lambda: [  # noqa: E731
        VideoRequest([5, 6, 7], 4, generator=_gen(1)),
        VideoRequest([9], 4, given=torch.zeros(1, 3, 4, dtype=torch.long), generator=_gen(2)),
    ]
    together = generate(tiny_model, layout, reqs(), sc)
    alone = [generate(tiny_model, layout, [r], sc)[0] for r in reqs()]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


# -- the rolling window --------------------------------------------------------------------------


def test_window_start_rule():
    assert [window_start(k, None) for k in (0, 15, 10_000)] == [0, 0, 0]
    assert [window_start(k, 15) for k in (0, 15, 16, 17, 10_000)] == [0, 0, 1, 2, 9_985]
    # stride 4: the window moves every 4th frame; the decoded frame sits at local 12..15
    starts = [window_start(k, 15, 4) for k in range(14, 26)]
    assert starts == [0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12]
    for k in range(0, 200):
        local = k - window_start(k, 15, 4)
        assert local <= 15 and (k <= 15 or local >= 12)
    with pytest.raises(ValueError, match="window_stride"):
        SamplerConfig(window=3, window_stride=4)
    with pytest.raises(ValueError, match="window must be"):
        SamplerConfig(window=0)


def test_frame_10000_sees_positions_of_a_training_clip(tiny_model, layout):
    """Latent frame 10,000 with W = 15: its block and the window's frames carry the positions
    of frames 0..15 of a fresh video (docs/LONG_VIDEO.md)."""
    sc = SamplerConfig(steps=2, window=15)
    given = torch.randint(0, 512, (10_000, 3, 4), generator=_gen(0))
    st = _state(tiny_model, layout, [5, 6], sc, given=given)
    fresh = _state(tiny_model, layout, [5, 6], sc, given=given[:15])
    assert st.start == 9_985 and len(st.frames) == 15 and torch.equal(st.frames[0], given[9_985])
    rows, ref = st.prefill_rows(), fresh.prefill_rows()
    for a, b in zip(rows, ref):
        assert torch.equal(a.pos3, b.pos3) and torch.equal(a.index, b.index)
    st.begin_frame()
    fresh.begin_frame()
    assert torch.equal(st.block_pos, fresh.block_pos)
    p0 = st.p0[0]
    lf = layout.content_len
    assert torch.equal(st.block_pos[0, 0, 3 : 3 + lf], torch.full((lf,), p0 + 15))  # t = p0 + 15
    assert int(st.block_pos.max()) < len(st.prefixes[0]) + 16 * layout.block_len
    assert st.lengths == fresh.lengths  # the cache is a 15-frame cache, not a 10,000-frame one


def test_window_at_least_the_video_gives_todays_codes(tiny_model, layout):
    """W >= the video's length never slides: exactly the codes of no window (same seeds); a
    smaller window keeps frames 0..W and changes what follows."""
    for seed in (0, 1):
        base = dict(steps=3, cfg=3.0)
        req = lambda seed=seed: [VideoRequest([5, 6], 7, generator=_gen(seed))]  # noqa: E731
        today = generate(tiny_model, layout, req(), SamplerConfig(**base))[0]
        for window, stride in ((7, 1), (7, 7), (50, 3)):
            sc = SamplerConfig(**base, window=window, window_stride=stride)
            assert torch.equal(generate(tiny_model, layout, req(), sc)[0], today)
        small = generate(tiny_model, layout, req(), SamplerConfig(**base, window=2))[0]
        assert torch.equal(small[:3], today[:3]) and not torch.equal(small, today)


@pytest.mark.parametrize("window,stride", [(2, 1), (3, 2)])
def test_windowed_continuation_equals_one_long_run(tiny_model, layout, window, stride):
    """Continuing a video from its stored frames re-derives the same window (a(k) depends on k
    alone): 3 + 5 frames in two calls == 8 frames in one."""
    sc = SamplerConfig(steps=3, cfg=2.0, window=window, window_stride=stride)
    whole = generate(tiny_model, layout, [VideoRequest([5], 8, generator=_gen(4))], sc)[0]
    g = _gen(4)
    first = generate(tiny_model, layout, [VideoRequest([5], 3, generator=g)], sc)[0]
    both = generate(tiny_model, layout, [VideoRequest([5], 5, given=first, generator=g)], sc)[0]
    assert torch.equal(both, whole)


def test_window_bounds_the_cache(tiny_model, layout):
    sc = SamplerConfig(steps=2, window=4)
    bl = layout.block_len
    assert cache_tokens(10, 0, 3, bl, sc) == 10 + 3 * bl
    assert cache_tokens(10, 0, 1024, bl, sc) == cache_tokens(10, 5000, 16, bl, sc) == 10 + 5 * bl
    assert cache_tokens(10, 100, 1024, bl, SamplerConfig()) == 10 + 1124 * bl
    giv = torch.randint(0, 512, (40, 3, 4), generator=_gen(0))
    st = _state(tiny_model, layout, [5], sc, given=giv)
    assert len(st.frames) == 4 and st.capacity(1000) == st.capacity(2)


def test_tau_resets_per_frame_unless_reference_compat(tiny_model, layout):
    sc = SamplerConfig(steps=3, reference_compat=True)
    st = _state(tiny_model, layout, [5], sc)
    cache = prefill(tiny_model, layout, st.prefill_rows(), st.capacity(1))
    st.begin_frame()
    while not st.frame_done:
        hidden = block_forward(tiny_model, st.step_tokens(), st.block_pos, cache)
        st.decode(code_logits(tiny_model, hidden, layout.code_offsets))
    assert st.tau_state == 0.0  # the released code's compounding temperature is 0 from now on
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


def test_guidance_steps_at_least_the_steps_gives_todays_codes(tiny_model, layout):
    """CFG on the first G >= S steps is CFG on every step; G < S changes the video, and its
    late steps see the conditional row's logits alone."""

    def run(g, seen=None):
        sc = SamplerConfig(steps=4, cfg=3.0, guidance_steps=g)
        req = VideoRequest([5, 6, 7], 3, generator=_gen(2))
        hook = None if seen is None else (lambda i, k, s, lg: seen.append((s, lg.shape[0])))
        return generate(tiny_model, layout, [req], sc, on_logits=hook)[0]

    ref = run(None)
    assert torch.equal(run(4), ref) and torch.equal(run(9), ref)
    seen: list = []
    assert not torch.equal(run(2, seen), ref)
    assert sorted(set(seen)) == [(0, 2), (1, 2), (2, 1), (3, 1)]


def test_guidance_steps_must_be_positive():
    with pytest.raises(ValueError, match="guidance_steps"):
        SamplerConfig(guidance_steps=0)
