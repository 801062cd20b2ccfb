"""Checkpoint folders: our format round trip; official Chameleon format vs HF transformers."""

from __future__ import annotations

import json

import pytest
import torch

from lumos.checkpoint import load_model, save_model
from lumos.config import model_preset
from lumos.model import build_model


def test_our_format_round_trip(tmp_path):
    cfg = model_preset("tiny", rope="3d")
    m = build_model(cfg, seed=3).eval()
    save_model(m, tmp_path, extra={"note": "x"})
    m2, rep = load_model(tmp_path)
    assert not rep.missing and not rep.unexpected and m2.cfg == cfg
    toks = torch.randint(0, cfg.vocab_size, (1, 7))
    pos = torch.arange(7).view(1, 1, 7).expand(1, 3, 7)
    with torch.no_grad():
        assert torch.equal(m(toks, pos), m2(toks, pos))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="lacks"):
        load_model(tmp_path)


def _hf_chameleon(tmp_path, vocab_size):
    transformers = pytest.importorskip("transformers")
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    hf_cfg = ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 16,
            "base_channels": 32,
            "channel_multiplier": [1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "resolution": 16,
            "latent_channels": 32,
        },
        vocabulary_map={"<image>": vocab_size - 1},
        image_token_id=vocab_size - 1,
    )
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # non-trivial q/k norms (per head) so the test can tell them apart
        for layer in hf.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["mm_rope"] = False  # compare with 1-D RoPE, as transformers implements it
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return transformers, hf


def test_official_chameleon_folder_matches_transformers(tmp_path):
    vocab_size = model_preset("tiny").vocab_size
    _, hf = _hf_chameleon(tmp_path, vocab_size)
    ours, rep = load_model(tmp_path, vocab="tiny")
    assert rep.missing == [] and rep.unexpected == []
    assert any(k.startswith("model.vqmodel.") for k in rep.ignored)
    assert ours.cfg.rope == "1d" and ours.cfg.n_kv_heads == 2
    toks = torch.randint(1, 300, (2, 12))
    pos = torch.arange(12).view(1, 1, 12).expand(2, 3, 12)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().view(1, 1, 12, 12)
    with torch.no_grad():
        hidden = hf.model(input_ids=toks).last_hidden_state
        ref = hf.lm_head(hidden)
        mine = ours(toks, pos, causal)
    assert torch.allclose(mine, ref, atol=1e-4), (mine - ref).abs().max()
