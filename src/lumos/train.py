"""Training with the AR-DF objective (method.md section 5): data order, loop, logs, checkpoints.

Recipe: AdamW (0.9, 0.95), weight decay 0.1 (not on norms and biases), grad clip 4.0, a linear
warm-up then a constant LR (or a cosine/linear decay, `--decay`), bf16 autocast (CUDA, bf16 CPUs)
with fp32 master weights, optional activation checkpointing and `torch.compile` per layer, DDP
under `torchrun`. Joint training alternates image batches and video batches on a fixed step
schedule: a cycle of `image_steps` image batches then `video_steps` video batches (the released
recipe: a batch of 6 images, then a batch of 1 video: `image_batch_size=6, batch_size=1,
image_steps=video_steps=1`).

Data are pre-tokenised shard folders (`lumos.data.write_shards`). Each stream (video, image) is
an endless sequence of positions 0, 1, 2, ...; epoch e of a stream is a permutation of the shard
samples seeded by (seed, stream, e), and the sample at position p draws its text dropout and mask
from a generator seeded by (seed, stream, p). A step's batch is therefore a pure function of the
step, the saved stream positions and the rank: rank r of W takes positions
[pos + r * B, pos + (r + 1) * B) of the global batch of W * B. Resuming from `out/latest` gives
exactly the losses of a run that never stopped.

Outputs in `out_dir`: `latest/` (model.safetensors + config.json with the train config and the
layout, trainer.pt with optimizer, scheduler, step, stream positions and RNG states),
`tb/` (TensorBoard: loss, lr, tokens/s, grad norm, MFU, per-frame losses) and `metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lumos.checkpoint import load_model, save_model
from lumos.config import MODEL_PRESETS, DiffusionConfig, ModelConfig, model_preset
from lumos.data import ShardDataset
from lumos.devices import cpu_has_fast_bf16
from lumos.diffusion import Sample, ardf_loss, collate, make_sample, pad_to
from lumos.model import Lumos, build_model
from lumos.sequence import Layout

TRAINER_STATE = "trainer.pt"
TRAINER_VERSION = 1
VIDEO, IMAGE = "video", "image"
_STREAM_ID = {VIDEO: 0, IMAGE: 1}


# =========================================================================== configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides its data folders, output folder and device."""

    model: str = "tiny"  # ModelConfig preset (ignored on resume: the checkpoint's config wins)
    lr: float = 1e-3
    warmup_steps: int = 10  # linear warm-up from lr / warmup_steps, then `decay`
    decay: str = "constant"  # after warm-up: constant | cosine | linear (min_lr_ratio at `steps`)
    min_lr_ratio: float = 0.1  # the final lr of a cosine/linear decay, as a fraction of lr
    steps: int = 100  # total optimizer steps of the run
    batch_size: int = 2  # videos per rank per video step
    image_batch_size: int = 4  # images per rank per image step
    image_steps: int = 1  # joint schedule: image_steps image batches, then video_steps videos
    video_steps: int = 1
    grad_clip: float = 4.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    adam_eps: float = 1e-8
    min_mask_ratio: float = 0.7
    text_dropout: float = 0.1
    scheme: str = "tube"  # tube | random | independent
    rope: str = "mm"  # mm | 1d | 3d (overrides the model preset)
    loss_chunk: int = 4096
    log_every: int = 10
    ckpt_every: int = 500  # 0: only at the end
    seed: int = 0
    duration: int = 2  # duration / fps number tokens of video samples
    fps: int = 12
    image_duration: int = 1  # ... of image samples (1-frame clips): T2I uses duration = fps = 1
    image_fps: int = 1
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer
    bf16: bool = True  # bf16 autocast on CUDA and bf16 CPUs (weights and optimizer stay fp32)
    num_workers: int = 0  # DataLoader worker processes building batches
    peak_flops: float | None = None  # per-device peak FLOP/s: enables MFU in the logs
    init_from: str | None = None  # a model folder (ours or official) to start from
    grow_layers: int = 0  # with init_from: deepen the loaded model to this many layers (0: keep)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; one of {sorted(MODEL_PRESETS)}")
        if self.rope not in ("mm", "1d", "3d"):
            raise ValueError(f"unknown rope {self.rope!r}; choose mm, 1d or 3d")
        DiffusionConfig(self.scheme, self.min_mask_ratio, self.text_dropout, self.loss_chunk)
        positive = ("steps", "batch_size", "image_batch_size", "log_every", "loss_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "image_steps", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.video_steps < 1:
            raise ValueError(f"video_steps must be >= 1, got {self.video_steps}")
        if self.lr <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("need lr > 0, grad_clip > 0 and weight_decay >= 0")
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"unknown decay {self.decay!r}; choose constant, cosine or linear")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError("peak_flops must be > 0")
        if self.grow_layers < 0:
            raise ValueError(f"grow_layers must be >= 0, got {self.grow_layers}")
        if self.grow_layers and not self.init_from:
            raise ValueError("grow_layers deepens a loaded model: it needs init_from")

    @property
    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(self.scheme, self.min_mask_ratio, self.text_dropout, self.loss_chunk)

    @property
    def schedule(self) -> str:
        """The joint schedule as 'images:videos' steps per cycle."""
        return f"{self.image_steps}:{self.video_steps}"

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**d)


_JOINT = TrainConfig(  # joint image/video stage of the released recipe (use --init-from)
    model="1b",
    lr=2.5e-5,
    warmup_steps=500,
    steps=100_000,
    batch_size=1,
    image_batch_size=6,
    log_every=10,
    ckpt_every=1000,
    activation_checkpointing=True,
    num_workers=4,
)
_IMAGE = _JOINT.replace(lr=5e-5, batch_size=6, image_steps=0, duration=0, fps=0)  # --data: images

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # CPU tests: a few seconds
    "tiny": TrainConfig(
        model="tiny", lr=1e-3, warmup_steps=5, steps=30, log_every=5, ckpt_every=0, bf16=False
    ),
    # the bundled Moving Fashion-MNIST model, trained from scratch
    "fmnist": TrainConfig(
        model="fmnist",
        lr=5e-4,
        warmup_steps=200,
        steps=20_000,
        batch_size=8,
        image_batch_size=32,
        log_every=20,
        ckpt_every=500,
        num_workers=0,
        fps=8,  # 16 RGB frames at 8 fps = 2 s (the pipeline's defaults)
    ),
    "1b": _JOINT,
    "3b": _JOINT.replace(model="3b"),
    "1b-image": _IMAGE,
    "3b-image": _IMAGE.replace(model="3b", lr=1e-4),
}


def train_preset(name: str, **overrides: object) -> TrainConfig:
    """A named TrainConfig preset with optional field overrides (validated)."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown train preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    cfg = TRAIN_PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


def model_flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul params) + 12 x layers x dim x seq_len (attention).

    Matmul params are the decoder layers plus the visual rows of lm_head (the AR-DF loss projects
    onto the visual sub-vocabulary only; the embedding is a lookup). The attention term counts the
    full L x L score and value products (a dense frame-causal mask computes all of them).
    """
    c = model_cfg
    layers = c.num_params() - 2 * c.vocab_size * c.dim - c.dim  # decoder layers only
    head = c.vocab_spec.codebook_size * c.dim
    return 6.0 * (layers + head) + 12.0 * c.n_layers * c.dim * float(seq_len)


# =========================================================================== distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _wants_cuda(device: str | torch.device | None) -> bool:
    if device is None or str(device) == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def init_distributed(device: str | torch.device | None = "auto") -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): nccl for CUDA, gloo for CPU. A single process returns rank 0 of 1.
    Idempotent: an existing process group is reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = _wants_cuda(device)
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local)


def resolve_device(device: str | torch.device, info: DistInfo) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' under torchrun -> cuda:LOCAL_RANK."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank if info.enabled else 0)
    return dev


# =========================================================================== data order


def _mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, dtype=np.uint64)[0]) >> 1


class DataOrder:
    """Endless deterministic order over n samples: epoch e is a permutation seeded by
    (seed, stream, e); position p maps to sample perm(p // n)[p % n]."""

    def __init__(self, n: int, seed: int, stream: int) -> None:
        if n < 1:
            raise ValueError("cannot order an empty dataset")
        self.n, self.seed, self.stream = n, seed, stream
        self._perms: dict[int, Tensor] = {}

    def perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, self.stream, 1, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)  # [n]
        return self._perms[epoch]

    def index(self, pos: int) -> int:
        return int(self.perm(pos // self.n)[pos % self.n])

    def take(self, pos: int, count: int) -> list[int]:
        return [self.index(p) for p in range(pos, pos + count)]


class Stream:
    """One shard dataset as an endless stream of masked AR-DF samples."""

    def __init__(
        self,
        name: str,
        ds: ShardDataset,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        batch_size: int,
        duration: int,
        fps: int,
    ) -> None:
        self.name, self.ds, self.batch_size = name, ds, batch_size
        self.vocab, self.scales = model_cfg.vocab_spec, model_cfg.rope_scales
        self.dcfg, self.duration, self.fps, self.seed = cfg.diffusion, duration, fps, cfg.seed
        self.order = DataOrder(len(ds), cfg.seed, _STREAM_ID[name])
        self._layouts: dict[tuple[int, int], Layout] = {}

    def layout(self, h: int, w: int) -> Layout:
        """The layout of an h x w latent grid (one per grid when the shards mix grids)."""
        if (h, w) not in self._layouts:
            self._layouts[(h, w)] = Layout(self.vocab, h, w, self.scales)
        return self._layouts[(h, w)]

    def sample(self, pos: int) -> Sample:
        codes, text_ids = self.ds[self.order.index(pos)]  # [t, h, w], list[int]
        g = torch.Generator().manual_seed(_mix(self.seed, _STREAM_ID[self.name], 0, pos))
        lay = self.layout(codes.shape[1], codes.shape[2])
        return make_sample(lay, codes, text_ids, self.dcfg, self.duration, self.fps, g)


class StepPlan:
    """Which stream each step reads and at which global position, from a start point.

    Step s is an image step when s % (image_steps + video_steps) < image_steps (absolute step
    numbers, so the schedule survives resuming). Global batches are batch_size x world_size.
    """

    def __init__(
        self,
        start_step: int,
        positions: dict[str, int],
        global_batch: dict[str, int],
        image_steps: int,
        video_steps: int,
    ) -> None:
        self.start, self.pos0, self.gb = start_step, dict(positions), dict(global_batch)
        self.i, self.c = image_steps, image_steps + video_steps

    def _images_before(self, step: int) -> int:
        return (step // self.c) * self.i + min(step % self.c, self.i)

    def kind(self, step: int) -> str:
        return IMAGE if step % self.c < self.i else VIDEO

    def positions(self, step: int) -> dict[str, int]:
        """Global stream positions just before `step` (step >= start)."""
        n_img = self._images_before(step) - self._images_before(self.start)
        n_vid = (step - self.start) - n_img
        return {
            VIDEO: self.pos0.get(VIDEO, 0) + self.gb.get(VIDEO, 0) * n_vid,
            IMAGE: self.pos0.get(IMAGE, 0) + self.gb.get(IMAGE, 0) * n_img,
        }


class StepBatches(torch.utils.data.Dataset):
    """Item j: (step, kind, collated rank-local batch) of step start + j; a pure function of j."""

    def __init__(
        self,
        streams: dict[str, Stream],
        plan: StepPlan,
        start: int,
        stop: int,
        info: DistInfo,
        rope: str,
        pad_id: int,
    ) -> None:
        self.streams, self.plan, self.start, self.stop = streams, plan, start, stop
        self.rank, self.rope, self.pad_id = info.rank, rope, pad_id

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, j: int) -> tuple[int, str, dict[str, Tensor]]:
        step = self.start + j
        kind = self.plan.kind(step)
        s = self.streams[kind]
        first = self.plan.positions(step)[kind] + self.rank * s.batch_size
        samples = [s.sample(p) for p in range(first, first + s.batch_size)]
        return step, kind, collate(samples, self.rope, self.pad_id)


def _open_shards(path: str | os.PathLike, what: str) -> ShardDataset:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{what} data folder {p} does not exist (expected a shard folder written by "
            "lumos.data.write_shards)"
        )
    if not p.is_dir():
        raise NotADirectoryError(f"{what} data {p} is not a folder of shards")
    ds = ShardDataset(p)
    if len(ds) == 0:
        raise ValueError(f"{what} data folder {p} holds no samples")
    return ds


# =========================================================================== model, optimizer


class ARDFObjective(nn.Module):
    """The model plus its AR-DF loss in one module, so DDP sees every parameter in forward."""

    def __init__(self, model: Lumos, chunk: int) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return ardf_loss(self.model, batch, self.chunk)


def _build_model(cfg: TrainConfig, dev: torch.device, resume_dir: Path | None) -> Lumos:
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


def _rng_state(dev: torch.device) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(state: dict, dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


def _layout_info(model_cfg: ModelConfig, ds: ShardDataset, cfg: TrainConfig) -> dict:
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
) -> Path:
    """Write out_dir/latest atomically (rank 0; every rank contributes its RNG states)."""
    rng = _rng_state(dev)
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
        state = {
            "version": TRAINER_VERSION,
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "data": {"positions": dict(positions), "seed": cfg.seed, "order": "per-epoch perm"},
            "rng": rngs,
            "world_size": info.world_size,
            "train_config": cfg.to_dict(),
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


# =========================================================================== logging


class _Interval:
    """Accumulators between two log steps."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.kind_losses: dict[str, list[float]] = {VIDEO: [], IMAGE: []}
        self.tokens = 0.0
        self.padded = 0.0  # sequence slots incl. right padding (global)
        self.samples = 0  # samples (global)
        self.seconds = 0.0
        self.frame_sum: Tensor | None = None  # [F] video steps only (rank-local)
        self.frame_count: Tensor | None = None

    def add_frames(self, fs: Tensor, fc: Tensor) -> None:
        if self.frame_sum is None:
            self.frame_sum, self.frame_count = fs.detach().clone(), fc.detach().clone()
            return
        n = max(fs.numel(), self.frame_sum.numel())
        self.frame_sum = pad_to(self.frame_sum, n) + pad_to(fs.detach(), n)
        self.frame_count = pad_to(self.frame_count, n) + pad_to(fc.detach(), n)


def _per_frame(iv: _Interval, info: DistInfo, dev: torch.device) -> list[float | None]:
    """Global per-frame mean losses of the interval's video steps (a collective under DDP)."""
    fs = iv.frame_sum if iv.frame_sum is not None else torch.zeros(0, device=dev)
    fc = iv.frame_count if iv.frame_count is not None else torch.zeros(0, device=dev)
    if info.enabled:
        n = torch.tensor([fs.numel()], device=dev)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        both = torch.stack([pad_to(fs.float(), int(n)), pad_to(fc.float(), int(n))])  # [2, F]
        dist.all_reduce(both)
        fs, fc = both[0], both[1]
    return [float(s / c) if c > 0 else None for s, c in zip(fs.tolist(), fc.tolist())]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after `step` by a run that stopped before its next checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(x + "\n" for x in keep))


# =========================================================================== the loop


def train(
    cfg: TrainConfig,
    video_data: str,
    image_data: str | None,
    out_dir: str,
    resume: bool = False,
    device: str = "auto",
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume from out_dir/latest) until cfg.steps, or for at most `max_steps` steps
    in this call. Works alone or under torchrun (DDP; rank 0 logs and saves).

    Returns a summary: step (completed steps), start_step, losses (the global loss of every step
    of this call), steps, per_frame_loss (last log), tokens_per_s (after the first step),
    checkpoint, weights_digest, world_size, rank, last_log.
    """
    info = init_distributed(device)
    dev = resolve_device(device, info)
    out = Path(out_dir)
    ckpt = out / "latest"

    video_ds = _open_shards(video_data, "video")
    image_ds = _open_shards(image_data, "image") if image_data else None
    if image_ds is not None and cfg.image_steps == 0:
        raise ValueError("image data given but image_steps=0: no step would read it")

    state = load_trainer_state(ckpt) if resume else None
    if state is None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
    model = _build_model(cfg, dev, ckpt if resume else None)
    mcfg = model.cfg
    vocab = mcfg.vocab_spec
    for ds, what in ((video_ds, "video"), (image_ds, "image")):
        if ds is not None and ds.codebook_size > vocab.codebook_size:
            raise ValueError(
                f"{what} shards in {ds.root} use {ds.codebook_size} codes but the model's "
                f"vocabulary {mcfg.vocab!r} has {vocab.codebook_size}"
            )
    model.checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        for layer in model.layers:
            layer.compile()
    objective: nn.Module = ARDFObjective(model, cfg.loss_chunk)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[dev.index] if dev.type == "cuda" else None)

    opt, sched = make_optimizer(model, cfg, fused=dev.type == "cuda")
    start = 0
    positions = {VIDEO: 0, IMAGE: 0}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
        positions.update(state["data"]["positions"])
        rngs = state["rng"]
        _set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0], dev)

    image_steps = cfg.image_steps if image_ds is not None else 0
    streams = {VIDEO: Stream(VIDEO, video_ds, mcfg, cfg, cfg.batch_size, cfg.duration, cfg.fps)}
    if image_ds is not None:
        streams[IMAGE] = Stream(
            IMAGE, image_ds, mcfg, cfg, cfg.image_batch_size, cfg.image_duration, cfg.image_fps
        )
    gb = {k: s.batch_size * info.world_size for k, s in streams.items()}
    plan = StepPlan(start, positions, gb, image_steps, cfg.video_steps)
    stop = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    batches = StepBatches(streams, plan, start, stop, info, mcfg.rope, vocab.pad)
    workers = cfg.num_workers
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    layout = _layout_info(mcfg, video_ds, cfg)

    writer = None
    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _truncate_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
        writer = SummaryWriter(str(out / "tb"), purge_step=start if resume else None)
    from tqdm.auto import tqdm

    pbar = tqdm(
        total=stop,
        initial=start,
        disable=not (progress and info.is_main),
        desc="train",
        dynamic_ncols=True,
    )

    # bf16 autocast on CUDA, and on CPUs that multiply bf16 matrices in hardware (AVX512-BF16, AMX)
    use_bf16 = cfg.bf16 and (dev.type == "cuda" or (dev.type == "cpu" and cpu_has_fast_bf16()))
    losses: list[float] = []
    steps_done: list[int] = []
    iv = _Interval()
    last_log: dict | None = None
    steady_tokens, steady_seconds = 0.0, 0.0
    prev = time.perf_counter()
    step = start
    for step_idx, kind, batch in loader:
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            res = objective(batch)
        n_local = float(res["n"])
        stats = torch.stack(
            [
                res["loss"].detach().double() * n_local,
                torch.tensor(n_local, dtype=torch.float64, device=dev),
                batch["valid"].sum().double(),
                torch.tensor(float(batch["valid"].numel()), dtype=torch.float64, device=dev),
            ]
        )  # [4]: loss sum, masked tokens, sequence tokens, padded tokens
        if info.enabled:
            dist.all_reduce(stats)
        # DDP averages gradients over ranks: weight each rank by its share of the masked tokens
        scale = (n_local * info.world_size) / stats[1].clamp_min(1.0)
        (res["loss"] * scale.float()).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if kind == VIDEO:
            iv.add_frames(res["frame_sum"], res["frame_count"])

        loss_sum, n_tok, seq_tok, pad_tok = stats.tolist()
        loss = loss_sum / max(n_tok, 1.0)
        now = time.perf_counter()
        dt, prev = now - prev, now
        step = step_idx + 1
        losses.append(loss)
        steps_done.append(step)
        iv.losses.append(loss)
        iv.kind_losses[kind].append(loss)
        iv.tokens += seq_tok
        iv.padded += pad_tok
        iv.samples += gb[kind]
        iv.seconds += dt
        if step > start + 1:
            steady_tokens += seq_tok
            steady_seconds += dt
        pbar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seq_tok / dt:.0f}", refresh=False)
        pbar.update(1)

        if step % cfg.log_every == 0 or step == stop:
            per_frame = _per_frame(iv, info, dev)
            rec = {
                "step": step,
                "loss": sum(iv.losses) / len(iv.losses),
                "per_frame_loss": per_frame,
                "tokens_per_s": iv.tokens / max(iv.seconds, 1e-9),
                "lr": lr,
                "grad_norm": float(gnorm),
            }
            for k, v in iv.kind_losses.items():
                if v and image_steps:
                    rec[f"loss_{k}"] = sum(v) / len(v)
            if cfg.peak_flops:
                fpt = model_flops_per_token(mcfg, round(iv.padded / max(iv.samples, 1)))
                rec["mfu"] = fpt * rec["tokens_per_s"] / (cfg.peak_flops * info.world_size)
            last_log = rec
            if writer is not None:
                for key in ("loss", "lr", "tokens_per_s", "grad_norm", "mfu"):
                    if key in rec:
                        writer.add_scalar(f"train/{key}", rec[key], step)
                for k in (VIDEO, IMAGE):
                    if f"loss_{k}" in rec:
                        writer.add_scalar(f"train/loss_{k}", rec[f"loss_{k}"], step)
                for f, v in enumerate(per_frame):
                    if v is not None:
                        writer.add_scalar(f"frame_loss/frame_{f:02d}", v, step)
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            iv = _Interval()

        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == stop:
            save_checkpoint(
                out, model, opt, sched, step, plan.positions(step), cfg, layout, info, dev
            )
    pbar.close()
    if writer is not None:
        writer.flush()
        writer.close()
    return {
        "step": step,
        "start_step": start,
        "losses": losses,
        "steps": steps_done,
        "per_frame_loss": last_log["per_frame_loss"] if last_log else [],
        "tokens_per_s": steady_tokens / steady_seconds if steady_seconds else None,
        "checkpoint": str(ckpt),
        "weights_digest": weights_digest(model),
        "world_size": info.world_size,
        "rank": info.rank,
        "bf16": use_bf16,
        "last_log": last_log,
    }


# =========================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumos train",
        description="Train a Lumos model with the AR-DF objective on pre-tokenised shards "
        "(run under torchrun for several processes).",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(TRAIN_PRESETS),
        help="train preset (default: fmnist; on --resume: the checkpoint's config)",
    )
    p.add_argument("--data", required=True, help="video shard folder (lumos.data.write_shards)")
    p.add_argument("--image-data", default=None, help="image shard folder for joint training")
    p.add_argument("--out", required=True, help="run folder (latest/, tb/, metrics.jsonl)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--max-steps", type=int, help="at most this many steps in this invocation")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, dest="warmup_steps")
    p.add_argument("--decay", choices=["constant", "cosine", "linear"], help="lr after the warm-up")
    p.add_argument("--min-lr-ratio", type=float, help="final lr of a decay, as a fraction of --lr")
    p.add_argument("--batch-size", type=int, help="videos per process per video step")
    p.add_argument("--image-batch-size", type=int, help="images per process per image step")
    p.add_argument("--schedule", help="joint schedule IMAGES:VIDEOS steps per cycle, e.g. 1:1")
    p.add_argument("--rope", choices=["mm", "1d", "3d"])
    p.add_argument("--scheme", choices=["tube", "random", "independent"])
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--peak-flops", type=float, help="per-device peak FLOP/s (logs MFU)")
    p.add_argument("--init-from", help="model folder to start from (ours or official)")
    p.add_argument(
        "--grow-layers",
        type=int,
        help="with --init-from: deepen the model to N layers (new layers start as identities)",
    )
    p.add_argument(
        "--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_FLAG_FIELDS = (
    "steps",
    "lr",
    "warmup_steps",
    "decay",
    "min_lr_ratio",
    "batch_size",
    "image_batch_size",
    "rope",
    "scheme",
    "seed",
    "log_every",
    "ckpt_every",
    "num_workers",
    "peak_flops",
    "init_from",
    "grow_layers",
    "activation_checkpointing",
    "compile",
    "bf16",
)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset (or, on --resume, the checkpoint's config) with the given flags applied."""
    base: TrainConfig | None = None
    if args.resume and args.preset is None:
        path = Path(args.out) / "latest" / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text()).get("train")
            base = TrainConfig.from_dict(saved) if saved else None
    if base is None:
        base = train_preset(args.preset or "fmnist")
    changes = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f) is not None}
    if args.schedule is not None:
        try:
            i, v = (int(x) for x in args.schedule.split(":"))
        except ValueError:
            raise ValueError(f"--schedule must be IMAGES:VIDEOS, got {args.schedule!r}") from None
        changes.update(image_steps=i, video_steps=v)
    return base.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        res = train(
            cfg,
            args.data,
            args.image_data,
            args.out,
            resume=args.resume,
            device=args.device,
            max_steps=args.max_steps,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"lumos train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    last = res["losses"][-1] if res["losses"] else float("nan")
    tps = res["tokens_per_s"]
    line = (
        f"[rank {res['rank']}/{res['world_size']}] done step={res['step']} loss={last:.6f} "
        f"tokens_per_s={tps if tps is None else round(tps, 1)} weights={res['weights_digest']}\n"
    )
    sys.stdout.write(line)  # one write per rank: lines of several ranks do not interleave
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
