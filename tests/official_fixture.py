"""A tiny official Lumos-1 release, laid out as the released files are (tests only).

Written from the published description (method.md sections 1, 2 and 6 in docs/), not from any
release code:
- `Lumos-1-tiny/`: a HF Chameleon `config.json` with `mm_rope: true` and the released flags,
  `model.safetensors` with `model.`-prefixed keys, every q/k-norm weight and bias stored as
  `[model_parallel_size, head_dim]` = `[1, head_dim]`, an untied `lm_head.weight`, the extra
  `model.vqmodel.*` / `model.vocabulary_mapping.*` tensors, and a `text_tokenizer.json`;
- `Cosmos-Tokenizer-DV4x8x8/` beside it: TorchScript `encoder.jit` / `decoder.jit` with Cosmos'
  call conventions (encoder: float [B, 3, T, H, W] in [-1, 1] -> (indices [B, t, h, w], codes
  [B, 6, t, h, w]); decoder: indices -> [B, 3, 1 + 4 (t - 1), H, W] in [-1, 1]; 8x spatial and
  4x causal temporal compression, FSQ levels (8, 8, 8, 5, 5, 5) -> 64,000 indices).

The weights are random (bfloat16, as released); the tokenizer quantises each 8x8 cell's mean
colour, so a decoded video is blocky but deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lumos.sequence import official_vocab
from lumos.tokenizers import train_bpe

LEVELS = (8, 8, 8, 5, 5, 5)  # FSQ levels of DV4x8x8: 8*8*8*5*5*5 = 64,000 indices


class _Encoder(nn.Module):
    """[B, 3, T, H, W] in [-1, 1] -> (indices [B, t, h, w], codes [B, 6, t, h, w])."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, t, h, w = x.shape
        first = x[:, :, :1]  # the first frame gets its own latent (causal in time)
        rest = x[:, :, 1:].reshape(b, c, (t - 1) // 4, 4, h, w).mean(3)  # groups of 4
        lat = torch.cat([first, rest], 2)  # [B, 3, t', H, W]
        cell = lat.reshape(b, c, lat.shape[2], h // 8, 8, w // 8, 8).mean(6).mean(4)  # [B,3,t,h,w]
        digits = ((cell.clamp(-1.0, 1.0) + 1.0) * 3.5).round().long()  # 0..7 per colour
        bright = ((cell.mean(1) + 1.0) * 2.0).round().long().clamp(0, 4)  # 0..4
        idx = digits[:, 0] + 8 * digits[:, 1] + 64 * digits[:, 2] + 512 * bright
        codes = torch.cat([digits.float(), bright.unsqueeze(1).float().expand(b, 3, -1, -1, -1)], 1)
        return idx, codes


class _Decoder(nn.Module):
    """indices [B, t, h, w] -> [B, 3, 1 + 4 (t - 1), 8h, 8w] in [-1, 1]."""

    def forward(self, indices: Tensor) -> Tensor:
        i = indices.long()
        rgb = torch.stack([i % 8, (i // 8) % 8, (i // 64) % 8], 1).float() / 3.5 - 1.0
        up = rgb.repeat_interleave(8, 3).repeat_interleave(8, 4)  # [B, 3, t, H, W]
        first = up[:, :, :1]
        later = up[:, :, 1:].repeat_interleave(4, 2)  # each later latent -> 4 frames
        return torch.cat([first, later], 2)


def write_cosmos(folder: Path) -> Path:
    """TorchScript encoder.jit / decoder.jit with Cosmos' call conventions."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(_Encoder()), str(folder / "encoder.jit"))
    torch.jit.save(torch.jit.script(_Decoder()), str(folder / "decoder.jit"))
    return folder


HF_CONFIG = {
    "architectures": ["ChameleonForConditionalGeneration"],
    "model_type": "chameleon",
    "vocab_size": 129536,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 20480,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "swin_norm": False,
    "model_parallel_size": 1,
    "mm_rope": True,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "vq_config": {"embed_dim": 256, "num_embeddings": 8192},
    "vocabulary_map": {"<image>": 8711},
}


def release_state(cfg: dict, seed: int = 0, mp: int = 1) -> dict[str, Tensor]:
    """Random weights under the released key names and shapes (q/k norms [mp, head_dim])."""
    g = torch.Generator().manual_seed(seed)
    d, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h

    def rnd(*shape: int, std: float = 0.02) -> Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(v, d), "lm_head.weight": rnd(v, d, std=0.2)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rnd(h * hd, d)
        sd[p + "self_attn.k_proj.weight"] = rnd(hkv * hd, d)
        sd[p + "self_attn.v_proj.weight"] = rnd(hkv * hd, d)
        sd[p + "self_attn.o_proj.weight"] = rnd(d, h * hd)
        for norm in ("q_norm", "k_norm"):
            sd[p + f"self_attn.{norm}.weight"] = (1.0 + rnd(mp, hd, std=0.2)).to(torch.bfloat16)
            sd[p + f"self_attn.{norm}.bias"] = rnd(mp, hd, std=0.2)
        sd[p + "mlp.gate_proj.weight"] = rnd(ff, d)
        sd[p + "mlp.up_proj.weight"] = rnd(ff, d)
        sd[p + "mlp.down_proj.weight"] = rnd(d, ff)
        sd[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    sd["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    # Chameleon's image VQ-GAN and its vocabulary mapping ride along in the released files
    sd["model.vqmodel.quantize.embedding.weight"] = rnd(16, 8)
    sd["model.vqmodel.encoder.conv_in.weight"] = rnd(4, 3, 3, 3)
    sd["model.vocabulary_mapping.image_token_ids"] = torch.arange(16)
    return sd


def write_checkpoint(folder: Path, cfg: dict | None = None, state: dict | None = None) -> Path:
    """config.json + model.safetensors + text_tokenizer.json, as released."""
    cfg = dict(HF_CONFIG if cfg is None else cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(release_state(cfg) if state is None else state, str(folder / "model.safetensors"))
    captions = [
        "a red sneaker moves left",
        "a blue bag falls",
        "Generate a video with a resolution of 448x256, consisting of 24 frames at 12 frames "
        "per second, according to the following prompt:\n a person walks",
    ]
    text = train_bpe(captions * 4, 300)
    assert text.vocab_size < official_vocab().n_text
    text.save(folder / "text_tokenizer.json")
    return folder


def make_release(root: Path) -> tuple[Path, Path]:
    """root/Lumos-1-tiny and root/Cosmos-Tokenizer-DV4x8x8 beside it; returns both."""
    model = write_checkpoint(root / "Lumos-1-tiny")
    cosmos = write_cosmos(root / "Cosmos-Tokenizer-DV4x8x8")
    return model, cosmos
