"""Deterministic data order: endless per-stream positions, per-step batches (exact resume)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lumos.config import ModelConfig
from lumos.data import ShardDataset
from lumos.diffusion import Sample, collate, make_sample
from lumos.sequence import Layout
from lumos.train.config import TrainConfig
from lumos.train.distributed import DistInfo

VIDEO, IMAGE = "video", "image"
_STREAM_ID = {VIDEO: 0, IMAGE: 1}


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
        self.twins = bool(cfg.distill_cfg)  # unconditional twins for guidance distillation
        self._layouts: dict[tuple[int, int], Layout] = {}

    def layout(self, h: int, w: int) -> Layout:
        """The layout of an h x w latent grid (one per grid when the shards mix grids)."""
        if (h, w) not in self._layouts:
            self._layouts[(h, w)] = Layout(self.vocab, h, w, self.scales)
        return self._layouts[(h, w)]

    def sample(self, pos: int) -> Sample:
        i = self.order.index(pos)
        codes, text_ids = self.ds[i]  # [t, h, w], list[int]
        g = torch.Generator().manual_seed(_mix(self.seed, _STREAM_ID[self.name], 0, pos))
        lay = self.layout(codes.shape[1], codes.shape[2])
        return make_sample(
            lay,
            codes,
            text_ids,
            self.dcfg,
            self.duration,
            self.fps,
            g,
            twin=self.twins,
            context=self.ds.context(i),
        )


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


def open_shards(path: str | os.PathLike, what: str) -> ShardDataset:
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
