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

Modules: `config` (TrainConfig, presets), `distributed` (torchrun/DDP), `batches` (data order),
`state` (model, optimizer, checkpoints), `loop` (`train`), `cli` (`lumos train`). Run it as
`lumos train ...` or `torchrun --nproc_per_node N -m lumos.train ...`.
"""

from lumos.train.batches import IMAGE, VIDEO, DataOrder, StepBatches, StepPlan, Stream
from lumos.train.cli import build_parser, config_from_args, main
from lumos.train.config import TRAIN_PRESETS, TrainConfig, model_flops_per_token, train_preset
from lumos.train.distributed import DistInfo, init_distributed, resolve_device
from lumos.train.loop import train
from lumos.train.state import (
    EMA,
    EMA_DIR,
    TRAINER_STATE,
    TRAINER_VERSION,
    grow_depth,
    load_trainer_state,
    lr_factor,
    make_optimizer,
    save_checkpoint,
    weights_digest,
)

__all__ = [
    "EMA",
    "EMA_DIR",
    "IMAGE",
    "TRAINER_STATE",
    "TRAINER_VERSION",
    "TRAIN_PRESETS",
    "VIDEO",
    "DataOrder",
    "DistInfo",
    "StepBatches",
    "StepPlan",
    "Stream",
    "TrainConfig",
    "build_parser",
    "config_from_args",
    "grow_depth",
    "init_distributed",
    "load_trainer_state",
    "lr_factor",
    "main",
    "make_optimizer",
    "model_flops_per_token",
    "resolve_device",
    "save_checkpoint",
    "train",
    "train_preset",
    "weights_digest",
]
