"""Memory an official Lumos-1 model needs per resolution: weights, KV cache per session, the
per-step logits, from the presets' dimensions (the released config.json files give the same).

    python benchmarks/official_memory.py --json out.json
    python benchmarks/official_memory.py --check   # also build a real KVCache on CPU (tiny)

A session holds two cache rows (the conditional and the unconditional stream of CFG): the prompt
prefix (the official template is ~60-90 text tokens) plus every committed frame block of
h*(w+1)+4 tokens. The per-step logits are float32 over the 64,000 codes at each of the frame's
h*w code positions, for both rows. Figures are bfloat16 weights and caches (the GPU dtype).
The `1b` / `3b` presets hold Chameleon-like dimensions; `--model DIR` reads a release's own
config.json instead.
"""

from __future__ import annotations

import argparse

import torch

from lumos.config import model_preset
from lumos.kvcache import KVCache
from lumos.sequence import Layout
from lumos.settings import OFFICIAL_RESOLUTIONS
from report import emit

GIB = 1024**3
PREFIX_TOKENS = 96  # BOS + template text (<= 90 BPE ids for a short caption) + separators


def estimate(preset: str, resolution: str, latent_frames: int = 7, cfg=None) -> dict:
    cfg = cfg or model_preset(preset)
    h, w = (x // 8 for x in OFFICIAL_RESOLUTIONS[resolution])
    layout = Layout(cfg.vocab_spec, h, w, cfg.rope_scales)
    per_token = cfg.kv_bytes_per_token(2)
    rows = 2  # CFG: conditional + unconditional
    session_tokens = PREFIX_TOKENS + latent_frames * layout.block_len
    return {
        f"{preset}_{resolution}_params_B": round(cfg.num_params() / 1e9, 3),
        f"{preset}_{resolution}_weights_GiB": round(cfg.num_params() * 2 / GIB, 2),
        f"{preset}_{resolution}_frame_tokens": layout.block_len,
        f"{preset}_{resolution}_kv_MiB_per_frame": round(
            rows * layout.block_len * per_token / 2**20, 1
        ),
        f"{preset}_{resolution}_kv_GiB_per_session": round(
            rows * session_tokens * per_token / GIB, 2
        ),
        f"{preset}_{resolution}_step_logits_GiB": round(
            rows * layout.n_codes * cfg.vocab_spec.codebook_size * 4 / GIB, 2
        ),
    }


def check_against_a_real_cache() -> int:
    """bytes_used of a filled KVCache equals the kv_bytes_per_token rule (tiny preset)."""
    cfg = model_preset("tiny")
    cache = KVCache.for_model(cfg, batch=2, capacity=64, dtype=torch.bfloat16)
    cache.advance(50)
    want = 2 * 50 * cfg.kv_bytes_per_token(2)
    if cache.bytes_used != want:
        raise SystemExit(f"KVCache holds {cache.bytes_used} bytes, the rule says {want}")
    return cache.bytes_used


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=7, help="latent frames per session (25 RGB: 7)")
    p.add_argument("--check", action="store_true")
    p.add_argument(
        "--model", default=None, help="an official folder: use its config.json, not the presets"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    res: dict = {"latent_frames_per_session": args.frames, "prefix_tokens": PREFIX_TOKENS}
    models = {"1b": None, "3b": None}
    if args.model:
        from lumos.checkpoint import config_from_hf, read_config

        models = {"model": config_from_hf(read_config(args.model))}
    for name, cfg in models.items():
        for resolution in OFFICIAL_RESOLUTIONS:
            res.update(estimate(name, resolution, args.frames, cfg))
    if args.check:
        res["tiny_cache_bytes_checked"] = check_against_a_real_cache()
    emit(res, args.json)


if __name__ == "__main__":
    main()
