"""The in-worker serving engine (system.md): scheduler, KV-cache pool and the batched step.

Plain PyTorch, no Ray: the cluster's worker actor is a thin shell around `Engine`.
"""

from lumos.engine.engine import Engine, EngineRequest, FrameEvent
from lumos.engine.pool import KVPool, PoolStats
from lumos.engine.scheduler import Scheduler

__all__ = ["Engine", "EngineRequest", "FrameEvent", "KVPool", "PoolStats", "Scheduler"]
