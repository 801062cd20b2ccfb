"""Training configuration: `TrainConfig`, its named presets and the FLOPs per token."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lumos.config import MODEL_PRESETS, DiffusionConfig, ModelConfig

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
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights for sampling (latest/ema/)
    # > 1: guidance distillation at this CFG scale, the init_from model as the frozen teacher
    # (lumos.train.distill); 0: the AR-DF objective
    distill_cfg: float = 0.0

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
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grow_layers and not self.init_from:
            raise ValueError("grow_layers deepens a loaded model: it needs init_from")
        if self.distill_cfg != 0.0 and not self.distill_cfg > 1.0:
            raise ValueError(f"distill_cfg must be > 1 (or 0: off), got {self.distill_cfg}")
        if self.distill_cfg and not self.init_from:
            raise ValueError("distill_cfg distils a teacher: it needs init_from (the teacher)")

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
