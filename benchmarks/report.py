"""Shared helpers of the benchmarks: a two-column table on stdout and the same dict as JSON, and
the device sync before reading a clock."""

from __future__ import annotations

import json


def emit(res: dict, json_path: str | None) -> None:
    """Print `res` as a metric/value table and write it to `json_path` when given."""
    width = max(len(k) for k in res)
    print(f"{'metric':<{width}}  value")
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA) so a timer reads finished work."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
