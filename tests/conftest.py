"""Shared fixtures: a tiny model and layouts, CPU only."""

from __future__ import annotations

import pytest
import torch

from lumos.config import model_preset
from lumos.model import build_model
from lumos.sequence import Layout

# One intra-op thread: the suite runs beside Ray workers, servers and subprocesses on 2 cores,
# where torch's spinning thread pool is up to 100x slower than a single thread.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (CPU reference test stands beside it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg():
    return model_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg, seed=0).eval()


@pytest.fixture(scope="session")
def layout(tiny_cfg):
    return Layout(tiny_cfg.vocab_spec, 3, 4, tiny_cfg.rope_scales)
