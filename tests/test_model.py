"""The transformer: meta-device build, shapes, GQA, dtype, per-head q/k norm."""

from __future__ import annotations

import torch

from lumos.config import model_preset
from lumos.kvcache import KVCache
from lumos.model import build_model


def test_meta_build_and_param_count():
    cfg = model_preset("tiny")
    m = build_model(cfg)
    assert not any(p.is_meta for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params()
    assert m.layers[0].self_attn.q_norm.weight.shape == (cfg.n_heads, cfg.head_dim)
    assert m.layers[0].self_attn.k_norm.weight.shape == (cfg.n_kv_heads, cfg.head_dim)


def test_1b_preset_param_count():
    n = model_preset("1b").num_params()
    assert 1.2e9 < n < 1.8e9


def test_forward_shapes_and_hidden(tiny_model, tiny_cfg):
    toks = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    pos = torch.arange(9).view(1, 1, 9).expand(2, 3, 9)
    with torch.no_grad():
        logits = tiny_model(toks, pos)
        hidden = tiny_model(toks, pos, output="hidden")
    assert logits.shape == (2, 9, tiny_cfg.vocab_size) and hidden.shape == (2, 9, tiny_cfg.dim)
    assert torch.allclose(tiny_model.project(hidden), logits, atol=1e-5)


def test_kv_cache_prefix_then_block_equals_one_pass(tiny_model, tiny_cfg):
    """Causal prefill in two chunks through the cache equals one causal pass."""
    toks = torch.randint(0, tiny_cfg.vocab_size, (1, 10))
    pos = torch.arange(10).view(1, 1, 10).expand(1, 3, 10)
    causal = torch.ones(10, 10, dtype=torch.bool).tril().view(1, 1, 10, 10)
    with torch.no_grad():
        full = tiny_model(toks, pos, causal)
        cache = KVCache.for_model(tiny_cfg, 1, 4)  # grows on demand
        a = tiny_model(toks[:, :6], pos[..., :6], causal[..., :6, :6], cache)
        cache.advance(6)
        b = tiny_model(toks[:, 6:], pos[..., 6:], causal[..., 6:, :], cache)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)
    assert cache.capacity >= 10 and cache.bytes_used > 0


def test_kv_cache_ragged_rows_select_and_stack(tiny_cfg):
    c = KVCache.for_model(tiny_cfg, 2, 8)
    k = torch.randn(2, tiny_cfg.n_kv_heads, 3, tiny_cfg.head_dim)
    c.advance([2, 5])
    ko, _ = c.update(0, k, k)
    assert ko.shape[2] == 8
    assert torch.equal(c.k[0, 0, :, 2:5], k[0]) and torch.equal(c.k[0, 1, :, 5:8], k[1])
    c.advance(3)
    one = c.select([1])
    assert one.lengths == [8] and torch.equal(one.k[0, 0, :, 5:8], k[1])
    both = KVCache.stack([c.select([0]), one])
    assert both.lengths == [5, 8] and torch.equal(both.k[0, 1, :, 5:8], k[1])
    c.truncate([1, 1])
    assert c.lengths == [1, 1]


def test_bf16_forward_runs(tiny_cfg):
    m = build_model(tiny_cfg, dtype=torch.bfloat16).eval()
    toks = torch.randint(0, tiny_cfg.vocab_size, (1, 5))
    pos = torch.arange(5).view(1, 1, 5).expand(1, 3, 5)
    with torch.no_grad():
        out = m(toks, pos)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
