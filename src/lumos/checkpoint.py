"""Model folders: our own format and the official Chameleon-format checkpoints.

Our format: `config.json` ({"format": "lumos", "model": ModelConfig fields, ...}) and
`model.safetensors` with our parameter names. Official: a HF Chameleon folder (`config.json` with
vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
intermediate_size, rope_theta, rms_norm_eps, mm_rope; one or more `*.safetensors` shards with the
HF key names of method.md section 6; q/k norms as [heads, head_dim], [head_dim] or the
released converter's [model_parallel_size, head_dim]). Config values the decoder does not
implement are refused, naming the key; strict loading refuses missing and unexpected keys
(Chameleon's `model.vqmodel.*` and `model.vocabulary_mapping.*` are known extras, ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lumos.config import ModelConfig
from lumos.model import Lumos, build_model
from lumos.sequence import vocab_spec

IGNORED_PREFIXES = ("model.vqmodel.", "model.vocabulary_mapping.")  # Chameleon's image VQ

# Chameleon config values this decoder does not implement: (key, the value we implement, why).
# A checkpoint asking for anything else is refused rather than run through the wrong network.
_UNSUPPORTED: tuple[tuple[str, object, str], ...] = (
    ("swin_norm", False, "post-norm (Swin) blocks are not implemented; only pre-norm"),
    ("attention_bias", False, "attention projections have no bias here"),
    ("mlp_bias", False, "MLP projections have no bias here"),
    ("tie_word_embeddings", False, "the decoder has an untied lm_head"),
    ("rope_scaling", None, "RoPE scaling is not implemented"),
)
_ACTIVATIONS = ("silu", "swish")


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every reason the checkpoint does not fit the model, all at once."""
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} missing keys: {', '.join(self.missing)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} unexpected keys: {', '.join(self.unexpected)}")
        return out

    def raise_if_incomplete(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("checkpoint does not match the model: " + "; ".join(problems))


def save_model(model: Lumos, folder: str | Path, extra: dict | None = None) -> None:
    """Write config.json + model.safetensors (contiguous CPU tensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    meta = {"format": "lumos", "model": model.cfg.to_dict(), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_hf_config(hf: dict) -> None:
    """Refuse, naming the key, every Chameleon config value the decoder does not implement."""
    bad = []
    for key, ours, why in _UNSUPPORTED:
        if key in hf and hf[key] != ours and not (ours is False and hf[key] is None):
            bad.append(f"{key}={json.dumps(hf[key])} ({why})")
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        bad.append(f"hidden_act={json.dumps(act)} (only SiLU / SwiGLU is implemented)")
    if bad:
        raise ValueError("unsupported Chameleon config.json: " + "; ".join(bad))


def config_from_hf(hf: dict, vocab: str = "official", **overrides) -> ModelConfig:
    """ModelConfig from a HF Chameleon config.json dict (refusing what we do not implement)."""
    check_hf_config(hf)
    try:
        kw = dict(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            vocab=vocab,
            vocab_size=hf["vocab_size"],
            rope="mm" if hf.get("mm_rope", True) else "1d",
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        )
    except KeyError as e:
        raise ValueError(f"Chameleon config.json lacks {e}") from None
    kw.update(overrides)
    return ModelConfig(**kw)


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def _hf_to_ours(key: str) -> str | None:
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return key[len("model.") :]
    return None


def _fit_head_norm(t: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
    """A q/k-norm tensor stored [head_dim] (shared) or [mp, head_dim] (the released converter:
    one row per model-parallel rank, repeated over that rank's heads) -> dst's [heads, head_dim];
    None when it cannot be."""
    if dst.dim() != 2 or t.shape[-1] != dst.shape[1]:
        return None
    if t.dim() == 1:
        return t.expand_as(dst)
    mp, heads = t.shape[0], dst.shape[0]
    if t.dim() == 2 and heads % mp == 0:
        return t.repeat_interleave(heads // mp, dim=0)  # rank r's row -> its heads
    return None


def load_into(model: Lumos, folder: str | Path, hf_names: bool) -> LoadReport:
    """Copy every tensor of the folder's safetensors into the model (in its dtype/device)."""
    folder = Path(folder)
    params = dict(model.state_dict())
    seen: set[str] = set()
    shapes: list[str] = []
    rep = LoadReport()
    with torch.no_grad():
        for shard in _shards(folder):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    if hf_names and key.startswith(IGNORED_PREFIXES):
                        rep.ignored.append(key)
                        continue
                    name = _hf_to_ours(key) if hf_names else key
                    if name is None or name not in params:
                        rep.unexpected.append(key)
                        continue
                    t = f.get_tensor(key)
                    dst = params[name]
                    if t.shape != dst.shape:
                        fitted = _fit_head_norm(t, dst) if name.endswith(_NORM_SUFFIXES) else None
                        if fitted is None:
                            shapes.append(
                                f"{key}: checkpoint shape {tuple(t.shape)} != model "
                                f"{tuple(dst.shape)}"
                            )
                            continue
                        t = fitted
                    dst.copy_(t.to(dst.dtype))
                    seen.add(name)
    if shapes:  # never run with a parameter left unloaded: always an error, all of them at once
        raise ValueError(f"{len(shapes)} tensors do not fit the model: " + "; ".join(shapes))
    rep.missing = sorted(set(params) - seen)
    return rep


_NORM_SUFFIXES = ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")


def load_model(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vocab: str | None = None,
    strict: bool = True,
    **overrides,
) -> tuple[Lumos, LoadReport]:
    """Load our folder or an official Chameleon folder; returns (model in eval mode, report).

    strict: every parameter must be in the checkpoint and every checkpoint key must be a
    parameter (or a known extra, IGNORED_PREFIXES); all problems are reported at once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    raw = read_config(folder)
    if raw.get("format") == "lumos":
        cfg = ModelConfig.from_dict(raw["model"])
        if vocab:  # keep the stored size (the lm_head's rows) when the new vocabulary fits in it
            size = cfg.vocab_size if cfg.vocab_size >= vocab_spec(vocab).size else 0
            overrides = {"vocab": vocab, "vocab_size": size, **overrides}
        if overrides:
            cfg = cfg.replace(**overrides)
        hf = False
    else:
        cfg = config_from_hf(raw, vocab=vocab or "official", **overrides)
        hf = True
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    rep = load_into(model, folder, hf_names=hf)
    if strict:
        rep.raise_if_incomplete()
    return model.eval(), rep
