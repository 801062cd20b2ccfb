"""Frame-causal masks: structure, per-sample isolation, flex == dense."""

from __future__ import annotations

import pytest
import torch

from lumos.masks import cache_key_mask, frame_causal_block_mask, frame_causal_dense
from lumos.sequence import pad_batch


def test_dense_structure_by_hand():
    # 2 prefix tokens, a 3-token frame block, a 2-token frame block, one closing token
    frame = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, -1]])
    m = frame_causal_dense(frame)[0, 0].int()
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(m, expect)


def test_masks_are_per_sample():
    # sample 0 has frame 0 at 1..3; sample 1 has its frame 0 at 4..6: no leak across samples
    frame = torch.tensor([[-1, 0, 0, 0, -1, -1, -1], [-1, -1, -1, -1, 0, 0, 0]])
    m = frame_causal_dense(frame)[:, 0]
    assert m[0, 1, 3] and not m[1, 1, 3]  # bidirectional only where that sample has a frame
    assert m[1, 4, 6] and not m[0, 4, 6]


def test_padding_keys_are_hidden():
    frame = torch.tensor([[-1, 0, 0, -1], [-1, 0, 0, 0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    m = frame_causal_dense(frame, valid)[:, 0]
    assert not m[0, :3, 3].any()
    assert m[0, 3, 3]  # a padded query sees only itself


def test_cache_key_mask():
    m = cache_key_mask(torch.tensor([2, 4]), 3, 7)[:, 0, 0]
    assert m.int().tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]


def test_flex_equals_dense(tiny_model, layout):
    s1 = layout.video([5, 6, 7], torch.randint(0, 512, (3, 3, 4)), 2, 12, close=True)
    s2 = layout.video(None, torch.randint(0, 512, (2, 3, 4)), 2, 12)
    b = pad_batch([s1, s2], "mm", 0)
    with torch.no_grad():
        dense = tiny_model(b["tokens"], b["positions"], frame_causal_dense(b["frame"], b["valid"]))
        block = frame_causal_block_mask(b["frame"], b["valid"])
        flex = tiny_model(b["tokens"], b["positions"], block)
    v = b["valid"]
    assert torch.allclose(dense[v], flex[v], atol=1e-4)


def test_backend_dispatch_of_the_full_forward_mask():
    from lumos.masks import frame_causal, uses_flex

    frame = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1]])
    valid = torch.ones_like(frame, dtype=torch.bool)
    dense = frame_causal(frame, valid, "auto", "cpu")  # CPU: the dense SDPA mask
    assert isinstance(dense, torch.Tensor) and torch.equal(dense, frame_causal_dense(frame, valid))
    assert torch.equal(frame_causal(frame, valid, "sdpa", "cpu"), dense)
    assert not isinstance(frame_causal(frame, valid, "flex", "cpu"), torch.Tensor)  # BlockMask
    assert uses_flex("auto", "cuda:0") and not uses_flex("sdpa", "cuda")
    with pytest.raises(ValueError, match="unknown attention backend"):
        uses_flex("xformers", "cpu")
