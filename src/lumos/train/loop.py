"""The AR-DF training loop: forward, backward, logs, checkpoints (`train`)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lumos.devices import cpu_has_fast_bf16
from lumos.diffusion import ardf_loss, pad_to
from lumos.model import Lumos
from lumos.train.batches import IMAGE, VIDEO, StepBatches, StepPlan, Stream, open_shards
from lumos.train.config import TrainConfig, model_flops_per_token
from lumos.train.distill import frozen_teacher, guided_targets
from lumos.train.distributed import DistInfo, init_distributed, resolve_device
from lumos.train.state import (
    build_train_model,
    layout_info,
    load_ema,
    load_trainer_state,
    make_optimizer,
    save_checkpoint,
    set_rng_state,
    weights_digest,
)


class ARDFObjective(nn.Module):
    """The model plus its AR-DF loss in one module, so DDP sees every parameter in forward.

    With a `teacher` (guidance distillation, `lumos.train.distill`) the targets are the
    teacher's CFG distributions at scale `distill_cfg` instead of the clean codes; the teacher
    is held outside the module's parameters (never trained, saved or synchronised)."""

    def __init__(
        self, model: Lumos, chunk: int, teacher: Lumos | None = None, distill_cfg: float = 0.0
    ) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk
        self.__dict__["teacher"] = teacher  # not a submodule
        self.distill_cfg = distill_cfg

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        soft = None
        if self.teacher is not None:
            soft = guided_targets(self.teacher, batch, self.distill_cfg, self.chunk)
        return ardf_loss(self.model, batch, self.chunk, soft=soft)


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

    video_ds = open_shards(video_data, "video")
    image_ds = open_shards(image_data, "image") if image_data else None
    if image_ds is not None and cfg.image_steps == 0:
        raise ValueError("image data given but image_steps=0: no step would read it")

    state = load_trainer_state(ckpt) if resume else None
    if state is None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
    model = build_train_model(cfg, dev, ckpt if resume else None)
    ema = load_ema(ckpt, model, cfg, state)  # None unless cfg.ema_decay
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
    teacher = None
    if cfg.distill_cfg:  # the --init-from model, as loaded before any training step
        teacher = frozen_teacher(build_train_model(cfg, dev, None))
    objective: nn.Module = ARDFObjective(model, cfg.loss_chunk, teacher, cfg.distill_cfg)
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
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0], dev)

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
    layout = layout_info(mcfg, video_ds, cfg)

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
        if ema is not None:
            ema.update(model)
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
                out, model, opt, sched, step, plan.positions(step), cfg, layout, info, dev, ema
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
        "ema_digest": weights_digest(ema.model) if ema is not None else None,
        "world_size": info.world_size,
        "rank": info.rank,
        "bf16": use_bf16,
        "last_log": last_log,
    }
