"""Vocabulary, token layout, MM-RoPE positions and allocation (method.md sections 1 and 3)."""

from __future__ import annotations

import pytest
import torch

from lumos.config import ModelConfig, model_preset
from lumos.rope import Rotary, apply_rotary, axis_allocation
from lumos.sequence import Kind, Layout, compact_vocab, official_vocab, prompt_text, vocab_spec


def test_official_vocab_ids():
    v = official_vocab()
    assert (v.bos, v.frame_start, v.frame_end, v.newline) == (0, 8197, 8196, 8803)
    assert (v.video_start, v.video_end, v.mask, v.sep) == (9004, 9005, 9003, 8710)
    assert v.number(12) == 8816 and v.visual_offset == 65536 and v.size == 129536
    with pytest.raises(ValueError):
        v.number(199)


def test_official_frame_lengths():
    v = official_vocab()
    assert Layout(v, 256 // 8, 448 // 8, (4, 8, 8)).block_len == 1828
    assert Layout(v, 384 // 8, 672 // 8, (4, 8, 8)).block_len == 4084


def test_official_frame_block_tokens():
    v = official_vocab()
    lay = Layout(v, 32, 56, (4, 8, 8))  # 448x256
    codes = torch.arange(32 * 56).view(32, 56)
    blk = lay.frame_block(0, 0, 3, codes)
    t = blk.tokens
    assert t[:3].tolist() == [8197, 8804 + 8, 8804 + 14] and t[-1] == 8196
    rows = t[3:-1].view(32, 57)
    assert (rows[:, -1] == 8803).all()
    assert rows[1, :56].tolist() == (65536 + codes[1]).tolist()


def test_compact_vocab_layout():
    v = compact_vocab(100, 50)
    ids = [v.bos, v.frame_start, v.frame_end, v.newline, v.video_start, v.video_end, v.mask, v.sep]
    assert len(set(ids)) == len(ids)
    assert v.visual_offset == v.number_base + v.max_number + 1
    assert v.size == v.visual_offset + 50
    assert vocab_spec("compact:100:50") == v
    with pytest.raises(ValueError):
        vocab_spec("nope")


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        ModelConfig(dim=96, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=8, vocab="tiny")
    ModelConfig(dim=96, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=8, vocab="tiny", rope="1d")
    with pytest.raises(ValueError, match="smaller than"):
        ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8, vocab_size=10)
    assert model_preset("1b").head_dim == 128 and model_preset("3b").head_dim == 128
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("7b")


def test_worked_t2v_example_positions():
    """Hand-computed: text of 3 ids, 2x3 latent grid, scales (4, 8, 8), 2 frames."""
    v = vocab_spec("tiny")
    lay = Layout(v, 2, 3, (4, 8, 8))
    seq = lay.video([5, 6, 7], torch.zeros(2, 2, 3, dtype=torch.long), duration=2, fps=12)
    # prefix: BOS t t t sep vs dur fps -> indices 0..7; p0 = 8 + 3 = 11
    assert seq.tokens[:8].tolist() == [0, 5, 6, 7, v.sep, v.video_start, v.number(2), v.number(12)]
    assert seq.pos3[:, :11].tolist() == [list(range(11))] * 3
    # frame 0 content 11..18 (row 0: cols 0,1,2,newline; row 1 the same)
    t, h, w = seq.pos3[:, 11:19].tolist()
    assert t == [11] * 8
    assert h == [11, 11, 11, 11, 19, 19, 19, 19]
    assert w == [11, 19, 27, 35, 11, 19, 27, 35]
    assert seq.pos3[:, 19].tolist() == [19, 19, 19]  # frame end: raw index
    # frame 1: header 20..22 raw, content 23..30 with t = 11 + 4
    assert seq.pos3[:, 20:23].tolist() == [[20, 21, 22]] * 3
    t, h, w = seq.pos3[:, 23:31].tolist()
    assert t == [15] * 8 and h == [11, 11, 11, 11, 19, 19, 19, 19]
    assert w == [11, 19, 27, 35, 11, 19, 27, 35]
    assert seq.pos3[:, 31].tolist() == [31, 31, 31]
    assert seq.kind[11:19].eq(Kind.CONTENT).all() and seq.kind[1:4].eq(Kind.TEXT).all()
    assert [(s.start, s.end) for s in seq.spans] == [(8, 20), (20, 32)]
    assert (
        seq.frame[8:20].eq(0).all() and seq.frame[20:32].eq(1).all() and seq.frame[:8].eq(-1).all()
    )
    # 1-D RoPE sees the absolute index everywhere
    assert seq.positions("1d")[:, 25].tolist() == [25, 25, 25]


def test_unconditional_sequence_starts_at_zero():
    v = vocab_spec("tiny")
    lay = Layout(v, 2, 3, (4, 8, 8))
    seq = lay.video(None, torch.zeros(1, 2, 3, dtype=torch.long), 2, 12)
    assert seq.tokens[0] == v.video_start and seq.index[0] == 0
    assert seq.pos3[:, 6].tolist() == [6, 6, 6]  # p0 = 3 + 3


def test_frames_vectorised_equals_blocks():
    lay = Layout(vocab_spec("tiny"), 3, 4, (1, 8, 8))
    codes = torch.randint(0, 512, (3, 3, 4))
    many = lay.frames(codes, 3, 2, 100, 50)
    one = [lay.frame_block(2 + i, 100 + i * lay.block_len, 50, codes[i]) for i in range(3)]
    assert torch.equal(many.tokens, torch.cat([b.tokens for b in one]))
    assert torch.equal(many.pos3, torch.cat([b.pos3 for b in one], 1))
    assert torch.equal(many.frame, torch.cat([b.frame for b in one]))


def test_prompt_template():
    s = prompt_text("a cat", 448, 256, 25, 12)
    assert s.startswith("Generate a video with a resolution of 448x256, consisting of 25 frames")
    assert s.endswith("according to the following prompt:\n a cat")


def test_mm_rope_allocation():
    a = axis_allocation("mm", 128)
    assert a.numel() == 64
    assert [(a == i).sum().item() for i in range(3)] == [16, 24, 24]
    assert a[:16].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 2, 2]
    assert torch.equal(a[16:32], a[:16])
    b = axis_allocation("3d", 128)
    assert b[:16].eq(0).all() and b[16:40].eq(1).all() and b[40:].eq(2).all()
    assert axis_allocation("1d", 96).eq(0).all()


def test_text_tokens_get_plain_1d_rope():
    rot_mm, rot_1d = Rotary("mm", 64, 10000.0), Rotary("1d", 64, 10000.0)
    pos = torch.arange(10).view(1, 1, 10).expand(1, 3, 10)
    c1, s1 = rot_mm(pos)
    c2, s2 = rot_1d(pos)
    assert torch.allclose(c1, c2) and torch.allclose(s1, s2)


@pytest.mark.parametrize("kind", ["mm", "3d"])
def test_rope_scores_depend_only_on_axis_differences(kind):
    torch.manual_seed(0)
    rot = Rotary(kind, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)

    def score(pq, pk):
        cq, sq = rot(torch.tensor(pq).view(1, 3, 1))
        ck, sk = rot(torch.tensor(pk).view(1, 3, 1))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    base = score([10, 20, 30], [4, 9, 1])
    shifted = score([10 + 7, 20 + 3, 30 - 5], [4 + 7, 9 + 3, 1 - 5])
    assert torch.allclose(base, shifted, atol=1e-4)
    if kind == "mm":  # every axis spans the whole spectrum: a unit step on any axis is visible
        for axis in range(3):
            p = [10, 20, 30]
            p[axis] += 1
            assert not torch.allclose(base, score(p, [4, 9, 1]), atol=1e-3)


def test_naive_3d_gives_width_only_low_frequencies():
    """The imbalance MM-RoPE fixes: contiguous bands leave w with the slowest frequencies."""
    from lumos.rope import inv_freq

    f = inv_freq(128, 10000.0)
    naive, mm = axis_allocation("3d", 128), axis_allocation("mm", 128)
    assert f[naive == 2].max() < f[naive == 0].min()
    for axis in range(3):
        assert f[mm == axis].max() > 0.4 and f[mm == axis].min() < 1e-3
