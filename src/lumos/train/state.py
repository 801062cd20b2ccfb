"""Model building and growth, the optimizer and lr schedule, RNG states and checkpoints."""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lumos.checkpoint import load_model, save_model
from lumos.config import ModelConfig, model_preset
from lumos.data import ShardDataset
from lumos.model import Lumos, build_model
from lumos.train.config import TrainConfig
from lumos.train.distributed import DistInfo

TRAINER_STATE = "trainer.pt"
TRAINER_VERSION = 1
EMA_DIR = "ema"  # latest/ema: the averaged weights, a model folder


# =========================================================================== model, optimizer


def build_train_model(cfg: TrainConfig, dev: torch.device, resume_dir: Path | None) -> Lumos:
    if resume_dir is not None:
        model, _ = load_model(resume_dir, device=dev)
    elif cfg.init_from:
        model, rep = load_model(cfg.init_from, device=dev, rope=cfg.rope)
        if rep.unexpected:
            print(f"init_from: ignored {len(rep.unexpected)} unexpected keys", file=sys.stderr)
        if cfg.grow_layers:
            model = grow_depth(model, cfg.grow_layers)
    else:
        model = build_model(model_preset(cfg.model, rope=cfg.rope), device=dev, seed=cfg.seed)
    return model.float().train()


@torch.no_grad()
def grow_depth(model: Lumos, n_layers: int) -> Lumos:
    """A deeper copy of `model` that computes the same function (function-preserving growth).

    The old layers keep their order, spread evenly over `n_layers` slots; each new layer is a copy
    of the old layer before it with its output projections (o_proj, down_proj) zeroed, so its
    residual branches add nothing until training moves them."""
    old = model.cfg.n_layers
    if n_layers < old:
        raise ValueError(f"cannot grow a {old}-layer model to {n_layers} layers")
    w = model.embed_tokens.weight
    cfg = model.cfg.replace(n_layers=n_layers)
    grown = build_model(cfg, device=w.device, dtype=w.dtype, init=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for k in range(n_layers):
        src = k * old // n_layers  # 0,0,1,2,2,3 for 4 -> 6
        new = k > 0 and src == (k - 1) * old // n_layers  # a second slot of the same old layer
        for name, t in model.layers[src].state_dict().items():
            zero = new and name in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
            state[f"layers.{k}.{name}"] = torch.zeros_like(t) if zero else t
    grown.load_state_dict(state)  # copies into the grown model's own tensors
    return grown.train(model.training)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The lr multiplier after `step` optimizer steps: linear warm-up over warmup_steps, then
    constant or a cosine/linear decay that reaches min_lr_ratio at cfg.steps."""
    w = cfg.warmup_steps
    if w and step < w:
        return (step + 1) / w
    if cfg.decay == "constant":
        return 1.0
    span = max(1, cfg.steps - w)
    progress = min(1.0, max(0.0, (step - w) / span))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False):
    """AdamW with weight decay on matrices and embeddings (not on norms and biases), plus a
    LambdaLR following `lr_factor` (warm-up, then constant or decaying)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if "norm" in name or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kw = {"fused": True} if fused else {}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, cfg))
    return opt, sched


def weights_digest(model: nn.Module) -> str:
    """sha256 (16 hex chars) of every tensor of the state dict, bit-exact."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# =========================================================================== RNG and checkpoints


def rng_state(dev: torch.device) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def set_rng_state(state: dict, dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


def layout_info(model_cfg: ModelConfig, ds: ShardDataset, cfg: TrainConfig) -> dict:
    grid = ds.grid or [None, *ds.shape(0)[1:]]
    return {
        "t": grid[0],  # latent frames per sample (None: varies)
        "h": grid[1],
        "w": grid[2],
        "grid_varies": ds.grid is None,
        "compression": list(model_cfg.rope_scales),  # tokenizer (t, h, w) compression
        "vocab": model_cfg.vocab,
        "tokenizer": ds.tokenizer,
        "codebook_size": ds.codebook_size,
        "duration": cfg.duration,
        "fps": cfg.fps,
        "image_duration": cfg.image_duration,
        "image_fps": cfg.image_fps,
    }


class EMA:
    """An exponential moving average of the weights, for sampling: after every optimizer step
    ema = d * ema + (1 - d) * w with d = min(decay, (1 + n) / (10 + n)) after n updates (a short
    warm-up so early weights fade fast). Kept in float32 on the model's device."""

    def __init__(self, model: Lumos, decay: float, updates: int = 0) -> None:
        self.decay, self.updates = float(decay), int(updates)
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: Lumos) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1


def load_ema(ckpt: Path, model: Lumos, cfg: TrainConfig, state: dict | None) -> EMA | None:
    """The run's EMA (None when cfg.ema_decay is 0): resumed from ckpt/ema with its update count,
    or started from the model's weights."""
    if not cfg.ema_decay:
        return None
    ema = EMA(model, cfg.ema_decay)
    if state is not None and (ckpt / EMA_DIR).is_dir():
        saved, _ = load_model(ckpt / EMA_DIR, device=next(model.parameters()).device)
        ema.model.load_state_dict(saved.state_dict())
        ema.updates = int(state.get("ema_updates", 0))
    return ema


def save_checkpoint(
    out_dir: Path,
    model: Lumos,
    opt: torch.optim.Optimizer,
    sched,
    step: int,
    positions: dict[str, int],
    cfg: TrainConfig,
    layout: dict,
    info: DistInfo,
    dev: torch.device,
    ema: EMA | None = None,
) -> Path:
    """Write out_dir/latest atomically (rank 0; every rank contributes its RNG states); with an
    EMA, latest/ema/ is a model folder of the averaged weights (load it like any model)."""
    rng = rng_state(dev)
    rngs = [rng]
    if info.enabled:
        rngs = [None] * info.world_size
        dist.all_gather_object(rngs, rng)
    final = out_dir / "latest"
    if info.is_main:
        tmp, old = out_dir / "latest.tmp", out_dir / "latest.old"
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"train": cfg.to_dict(), "layout": layout, "step": step}
        save_model(model, tmp, extra=extra)
        if ema is not None:
            save_model(ema.model, tmp / EMA_DIR, extra={**extra, "ema_decay": ema.decay})
        state = {
            "version": TRAINER_VERSION,
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "data": {"positions": dict(positions), "seed": cfg.seed, "order": "per-epoch perm"},
            "rng": rngs,
            "world_size": info.world_size,
            "train_config": cfg.to_dict(),
            "ema_updates": ema.updates if ema is not None else 0,
        }
        torch.save(state, tmp / TRAINER_STATE)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if info.enabled:
        dist.barrier()
    return final


def load_trainer_state(ckpt: Path) -> dict:
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no {TRAINER_STATE} in {ckpt}")
    return torch.load(path, map_location="cpu", weights_only=False)
