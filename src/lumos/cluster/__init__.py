"""Ray cluster layer (system.md): session hosts and grains, supervised workers, placement, client.

Orleans -> Ray: silo = a session host (`lumos.cluster.host`, a few long-lived actors, one per node
by default); grain = a `Session` object inside the host that its id maps to (one activation per
id cluster-wide); GPU-pinned worker grain = `WorkerActor` ("worker-<host>-<i>", restarted by Ray
when it dies); grain persistence = `lumos.store`; streams = the host's long-poll fan-out,
consumed by `LumosClient.subscribe` in the API.
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
