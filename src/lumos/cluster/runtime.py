"""Cluster runtime: the serving config, Ray start/connect, actor names and worker discovery.

Orleans terms (system.md): silos are session hosts ("host-<store key>-<i>", lumos.cluster.host),
grains are session objects inside them; workers are GPU-pinned grains named "worker-<host>-<i>"
in the namespace, supervised by Ray (max_restarts=-1). Everything that both the API process and
the actors need (names, seeds, error messages, the list of errors that mean "that actor is gone")
lives here, and nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from lumos.cluster.limits import Limits
from lumos.devices import COMPILE_CHOICES, DTYPE_CHOICES
from lumos.settings import parse_resolution

WORKER_PREFIX = "worker-"
HOST_PREFIX = "host-"

# Errors that mean "the actor (or the object it was producing) is gone": retry elsewhere.
ACTOR_GONE_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(ray.exceptions, name)
    for name in (
        "RayActorError",  # ActorDiedError, ActorUnavailableError are subclasses
        "ObjectLostError",  # OwnerDiedError, ObjectReconstructionFailed* are subclasses
        "WorkerCrashedError",
        "NodeDiedError",
    )
    if hasattr(ray.exceptions, name)
)


@dataclass
class ServeConfig:
    """Everything `lumos serve` (and `LumosClient.start`) needs.

    ray_address None starts a local Ray (random ports, never 6379); store_url is a sqlite:/// or
    redis:// URL (relative SQLite paths are resolved against the working directory of the process
    that builds the config); model None is the bundled model. workers local worker actors are
    started when none is registered; worker_resources None means {"num_gpus": 1} when Ray sees a
    GPU, else {"num_cpus": 1}.
    """

    ray_address: str | None = None
    namespace: str = "lumos"
    store_url: str = "sqlite:///.lumos/lumos.db"
    model: str | None = None
    workers: int = 1
    worker_resources: dict[str, float] | None = None
    max_batch: int = 8
    kv_budget_bytes: int | None = None
    batching: bool = True  # False: one forward per session per step (the benchmark's reference)
    dtype: str = "auto"  # the workers' inference dtype: auto | float32 | bfloat16
    # compile the workers' frame steps (in the background, serving eagerly meanwhile):
    # auto (on for AMX CPUs in bf16) | on | off
    compile: str = "auto"
    resolution: str | None = None  # "WIDTHxHEIGHT" for the workers' model (None: the folder's)
    session_idle_s: float = 300.0
    # session hosts (silos) of the cluster, fixed when its first API process starts (host 0
    # records it); None: one per alive Ray node then
    session_hosts: int | None = None
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"  # the API's bind address (used by `lumos serve`)
    port: int = 8000
    ray_init_kwargs: dict[str, Any] = field(default_factory=dict)  # extra ray.init options
    # bearer token of the operator endpoint /api/admin/health; None: env LUMOS_ADMIN_TOKEN, and
    # neither set: the endpoint answers 404
    admin_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.resolution is not None:
            parse_resolution(self.resolution)  # a clear error here, not in every worker
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.session_hosts is not None and self.session_hosts < 1:
            raise ValueError(f"session_hosts must be >= 1, got {self.session_hosts}")
        if self.session_idle_s <= 0:
            raise ValueError(f"session_idle_s must be > 0, got {self.session_idle_s}")
        if isinstance(self.limits, dict):
            self.limits = Limits(**self.limits)
        self.store_url = resolve_store_url(self.store_url)
        if self.admin_token is None:
            self.admin_token = os.environ.get("LUMOS_ADMIN_TOKEN") or None
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters long")

    # flat read access to the limits (cfg.max_prompt_chars == cfg.limits.max_prompt_chars)
    @property
    def max_prompt_chars(self) -> int:
        return self.limits.max_prompt_chars

    @property
    def max_frames_per_request(self) -> int:
        return self.limits.max_frames_per_request

    @property
    def max_frames_per_session(self) -> int:
        return self.limits.max_frames_per_session

    @property
    def max_sessions(self) -> int:
        return self.limits.max_sessions

    @property
    def max_image_bytes(self) -> int:
        return self.limits.max_image_bytes

    def resources(self) -> dict[str, float]:
        """Ray resources of one worker actor."""
        if self.worker_resources is not None:
            return dict(self.worker_resources)
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        return {"num_gpus": 1} if gpus > 0 else {"num_cpus": 1}


def resolve_store_url(url: str) -> str:
    """Make a relative sqlite:/// path absolute (actors run in other working directories)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        path = url[len(prefix) :]
        if path and path != ":memory:":
            return prefix + os.path.abspath(path)
    return url


# -- Ray ------------------------------------------------------------------------------------------


def connect(cfg: ServeConfig) -> bool:
    """Connect to cfg.ray_address, or start a local Ray; True if this call started Ray.

    An already initialised Ray (e.g. a test's) is reused as is.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": cfg.namespace, "include_dashboard": False}
    kwargs.update(cfg.ray_init_kwargs)
    if cfg.ray_address:
        kwargs.pop("include_dashboard", None)
        ray.init(address=cfg.ray_address, **kwargs)
        return False
    # a new local instance: GCS and every other port are chosen at random (port 0)
    os.environ.pop("RAY_GCS_SERVER_PORT", None)
    kwargs.setdefault("address", "local")  # never join another cluster running on this machine
    ray.init(**kwargs)
    return True


def hostname() -> str:
    return socket.gethostname().split(".")[0] or "local"


def current_node() -> str | None:
    """This process's Ray node id (None outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def worker_name(index: int, host: str | None = None) -> str:
    return f"{WORKER_PREFIX}{host or hostname()}-{index}"


def host_name(store_url: str, index: int) -> str:
    """The name of session host `index` of the cluster serving the store at store_url."""
    key = hashlib.sha1(store_url.encode()).hexdigest()[:10]
    return f"{HOST_PREFIX}{key}-{index}"


def error_message(exc: BaseException) -> str:
    """A one-line message for an exception (a Ray task error's innermost cause preferred)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def list_workers(namespace: str) -> list[str]:
    """Names of the registered (alive or restarting) worker actors in the namespace."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"]
        for a in names
        if a.get("namespace") == namespace and a["name"].startswith(WORKER_PREFIX)
    )


def get_actor(name: str, namespace: str):
    """The named actor's handle, or None if no actor holds that name."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def start_workers(
    namespace: str,
    count: int,
    resources: dict[str, Any],
    *,
    host: str | None = None,
    node_id: str | None = None,
    **worker_kwargs: Any,
) -> list:
    """Get or create `count` detached, supervised worker actors "worker-<host>-<i>".

    resources: Ray actor options (num_cpus, num_gpus, resources={"lumos_gpu": 1}, ...);
    node_id pins them to that node (`lumos worker`). max_restarts=-1: Ray restarts a worker
    whose process dies (on its node); its sessions resume from their stored frames.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lumos.cluster.worker import WorkerActor

    options: dict[str, Any] = dict(resources)
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    handles = []
    for i in range(count):
        name = worker_name(i, host)
        handles.append(
            WorkerActor.options(
                name=name,
                namespace=namespace,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                **options,
            ).remote(name=name, **worker_kwargs)
        )
    return handles


def start_local_workers(cfg: ServeConfig, count: int | None = None, host: str | None = None):
    """Get or create `count` (default cfg.workers) worker actors for cfg (see start_workers)."""
    return start_workers(
        cfg.namespace,
        cfg.workers if count is None else count,
        cfg.resources(),
        host=host,
        model=cfg.model,
        max_batch=cfg.max_batch,
        kv_budget_bytes=cfg.kv_budget_bytes,
        batching=cfg.batching,
        dtype=cfg.dtype,
        compile=cfg.compile,
        resolution=cfg.resolution,
    )


# -- sessions -------------------------------------------------------------------------------------


def derive_seed(seed: int, n_frames: int) -> int:
    """The seed of a request that starts at frame n_frames of a session seeded with `seed`.

    A pure function of the stored state, so a continuation (after a worker loss or a restart)
    draws the same random numbers whichever worker runs it.
    """
    digest = hashlib.sha256(f"lumos:{int(seed)}:{int(n_frames)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62
