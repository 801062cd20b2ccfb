"""Ray cluster layer (system.md): session actors, worker actors, placement, runtime, client.

Orleans -> Ray: silo = Ray cluster; session grain = `SessionActor` ("session:<id>"); GPU-pinned
worker grain = `WorkerActor` ("worker-<host>-<i>"); grain persistence = `lumos.store`; streams =
the session actor's long-poll fan-out, consumed by `LumosClient.subscribe` in the API.
"""

from lumos.cluster.client import LimitExceeded, LumosClient, NoWorkersError, SessionNotFoundError
from lumos.cluster.runtime import Limits, ServeConfig

__all__ = [
    "LimitExceeded",
    "Limits",
    "LumosClient",
    "NoWorkersError",
    "ServeConfig",
    "SessionNotFoundError",
]
