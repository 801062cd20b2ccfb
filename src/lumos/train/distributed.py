"""torchrun / DDP: the process group, ranks and the device of this process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
