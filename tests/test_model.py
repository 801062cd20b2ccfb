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


def test_bf16_forward_runs(tiny_cfg):
    m = build_model(tiny_cfg, dtype=torch.bfloat16).eval()
    toks = torch.randint(0, tiny_cfg.vocab_size, (1, 5))
    pos = torch.arange(5).view(1, 1, 5).expand(1, 3, 5)
    with torch.no_grad():
        out = m(toks, pos)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_attention_inputs_match_the_textbook_formulas(tiny_cfg):
    """The fused q/k path (one LayerNorm for q and k, rotation by roll with a signed sin table)
    equals per-tensor HeadNorms and x cos + rotate_half(x) sin with the plain sin."""
    from lumos.model import _qk_norm
    from lumos.rope import Rotary, apply_rotary, axis_allocation, inv_freq

    torch.manual_seed(0)
    attn = build_model(tiny_cfg).layers[0].self_attn
    with torch.no_grad():
        for p in (attn.q_norm.weight, attn.q_norm.bias, attn.k_norm.weight, attn.k_norm.bias):
            p.normal_()
    b, n, h, hkv, d = 2, 5, attn.h, attn.hkv, attn.d
    q, k = torch.randn(b, n, h, d), torch.randn(b, n, hkv, d)
    qk = _qk_norm(q, k, attn.q_norm, attn.k_norm)
    assert torch.allclose(qk[:, :, :h], attn.q_norm(q), atol=1e-6)
    assert torch.allclose(qk[:, :, h:], attn.k_norm(k), atol=1e-6)

    pos = torch.randint(0, 50, (b, 3, n))
    cos, sin = Rotary("mm", d, 10000.0)(pos)
    ang = pos.index_select(1, axis_allocation("mm", d)).transpose(1, 2).float()
    ang = ang * inv_freq(d, 10000.0).float()
    ang = torch.cat([ang, ang], -1)  # [B, L, d]
    x = torch.randn(b, h, n, d)
    x1, x2 = x.chunk(2, -1)
    textbook = x * ang.cos().unsqueeze(1) + torch.cat([-x2, x1], -1) * ang.sin().unsqueeze(1)
    assert torch.equal(cos, ang.cos())
    assert torch.allclose(apply_rotary(x, cos, sin), textbook, atol=1e-6)
