"""Configuration dataclasses with named presets.

Config is data: a frozen dataclass per concern, validated at construction, with named presets
(`tiny` for CPU tests, `fmnist` for the bundled model, `1b` and `3b` for the official checkpoints'
dimensions). CLI flags only override fields of a preset (`dataclasses.replace`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lumos.sequence import VocabSpec, vocab_spec

RopeKind = Literal["mm", "1d", "3d"]
AttnBackend = Literal["auto", "sdpa", "flex"]


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of the Chameleon-style decoder and its positional scheme."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: str = "official"  # name of a VocabSpec preset (see lumos.sequence.vocab_spec)
    vocab_size: int = 0  # 0: exactly the vocab spec's size
    rope: RopeKind = "mm"
    rope_theta: float = 10000.0
    rope_scales: tuple[int, int, int] = (4, 8, 8)  # (t, h, w) = the tokenizer's compression
    norm_eps: float = 1e-5  # RMSNorm
    qk_norm_eps: float = 1e-5  # the q/k LayerNorm (HF Chameleon: LayerNorm's default 1e-5)
    # frame-causal masks of full forwards (training, prefill): "flex" = a compiled FlexAttention
    # BlockMask, "sdpa" = a dense boolean mask, "auto" = flex on CUDA, dense elsewhere (CPU
    # FlexAttention has no backward and runs uncompiled). Per-frame steps never need a mask.
    attn_backend: AttnBackend = "auto"

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.rope in ("mm", "3d") and self.head_dim % 32:
            raise ValueError(
                f"head_dim={self.head_dim} must be a multiple of 32 for {self.rope!r} RoPE "
                "(16 frequencies per time:height:width group of 4:6:6)"
            )
        if self.rope not in ("mm", "1d", "3d"):
            raise ValueError(f"unknown rope {self.rope!r}; choose mm, 1d or 3d")
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise ValueError(
                f"unknown attn_backend {self.attn_backend!r}; choose auto, sdpa or flex"
            )
        if not (self.norm_eps > 0 and self.qk_norm_eps > 0):
            raise ValueError("norm_eps and qk_norm_eps must be > 0")
        if len(self.rope_scales) != 3 or min(self.rope_scales) < 1:
            raise ValueError(f"rope_scales must be 3 positive ints, got {self.rope_scales}")
        spec = self.vocab_spec
        if self.vocab_size == 0:
            object.__setattr__(self, "vocab_size", spec.size)
        if self.vocab_size < spec.size:
            raise ValueError(
                f"vocab_size={self.vocab_size} is smaller than the {self.vocab!r} vocabulary "
                f"({spec.size} ids)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def vocab_spec(self) -> VocabSpec:
        return vocab_spec(self.vocab)

    def replace(self, **changes: object) -> ModelConfig:
        if "vocab" in changes and "vocab_size" not in changes:
            changes["vocab_size"] = 0  # follow the new vocabulary's size
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        d = dict(d)
        if "rope_scales" in d:
            d["rope_scales"] = tuple(d["rope_scales"])
        return cls(**d)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token of one row holds (keys + values of every layer)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        """Parameter count (embedding and head included)."""
        hd, kv = self.head_dim, self.n_kv_heads * self.head_dim
        attn = (
            self.dim * self.dim * 2 + self.dim * kv * 2 + 2 * hd * (self.n_heads + self.n_kv_heads)
        )
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim


MODEL_PRESETS: dict[str, ModelConfig] = {
    # CPU tests: seconds. Compact vocabulary, head_dim 32.
    "tiny": ModelConfig(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=344,
        vocab="tiny",
        rope_scales=(1, 8, 8),
    ),
    # the bundled Moving Fashion-MNIST model (64x64 frames, 8x8 latent grid, per-frame tokenizer),
    # sized to train on the 2-core CPU in about an hour (the shipped weights were grown to 8
    # layers by `lumos train --grow-layers` in stages 4 and 6; see docs/MODEL_CARD.md)
    "fmnist": ModelConfig(
        dim=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=6,
        ffn_dim=512,
        vocab="fmnist",
        rope_scales=(1, 8, 8),
    ),
    # Chameleon-like dimensions of the official 1B / 3B checkpoints (head_dim 128)
    "1b": ModelConfig(
        dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192, rope_theta=10000.0
    ),
    "3b": ModelConfig(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, rope_theta=10000.0
    ),
}


def model_preset(name: str, **overrides: object) -> ModelConfig:
    """A named preset, with optional field overrides (validated)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    cfg = MODEL_PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


@dataclass(frozen=True)
class SamplerConfig:
    """Per-frame MaskGIT decoding (method.md section 7)."""

    steps: int = 50
    cfg: float = 15.0  # 15 for video, 16 for images (the pipeline picks by mode)
    tau0: float = 1.0  # Gumbel temperature of the confidence, decays to 0 within each frame
    history_mask_ratio: float = 0.7  # AR-DF inference masking of committed frames
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0  # of the code distribution (after CFG); < 1 sharpens it
    reference_compat: bool = False  # reproduce the released code's compounding temperature
    # rolling context: at most `window` committed latent frames in the KV cache (None: all),
    # re-based to start at frame 0 and slid by `window_stride` frames (docs/LONG_VIDEO.md)
    window: int | None = None
    window_stride: int = 1
    # classifier-free guidance on the first `guidance_steps` steps of each frame only (None:
    # every step); later steps run the conditional row alone (docs/LONG_VIDEO.md, real time)
    guidance_steps: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")
        if not self.tau0 >= 0.0:
            raise ValueError(f"tau0 must be >= 0, got {self.tau0}")
        if not 0.0 <= self.history_mask_ratio < 1.0:
            raise ValueError("history_mask_ratio must be in [0, 1)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.guidance_steps is not None and self.guidance_steps < 1:
            raise ValueError(f"guidance_steps must be >= 1 (or None), got {self.guidance_steps}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 latent frame (or None), got {self.window}")
        if not 1 <= self.window_stride <= (self.window or self.window_stride):
            raise ValueError(
                f"window_stride must be in [1, window], got {self.window_stride} "
                f"(window {self.window})"
            )


@dataclass(frozen=True)
class DiffusionConfig:
    """AR-DF training objective (method.md section 5)."""

    scheme: Literal["tube", "random", "independent"] = "tube"
    min_mask_ratio: float = 0.7
    text_dropout: float = 0.1
    loss_chunk: int = 4096  # masked positions projected onto the visual rows per chunk

    def __post_init__(self) -> None:
        if self.scheme not in ("tube", "random", "independent"):
            raise ValueError(f"unknown masking scheme {self.scheme!r}")
        if not 0.0 <= self.min_mask_ratio <= 1.0:
            raise ValueError("min_mask_ratio must be in [0, 1]")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ValueError("text_dropout must be in [0, 1]")
