"""`lumos serve` configuration and `lumos worker` (join a host's GPUs to a running cluster).

    lumos serve [--host 127.0.0.1] [--port 8000] [--ray-address ADDR]
                [--redis-url URL | --store URL] [--model DIR|random] [--workers N]
    lumos worker --ray-address ADDR [--model DIR|random] [--gpus N] [--resources JSON]

`serve` without --ray-address starts a local Ray (random ports) with SQLite at
.lumos/lumos.db and one local worker per GPU (one CPU worker without a GPU). `worker` starts one
detached WorkerActor per local GPU ("worker-<host>-<i>", pinned to this node) in a running
cluster, then blocks; Ctrl-C removes them. The `serve` entry point itself lives in
lumos.api.serve (imports go cluster -> api, never back).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from lumos.cluster import runtime
from lumos.cluster.runtime import ServeConfig
from lumos.devices import COMPILE_CHOICES, DTYPE_CHOICES


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


MODEL_HELP = (
    "model folder (default: the bundled model; docs/MODEL_CARD.md builds a real-time distilled "
    "one), 'random' or 'random:<preset>'"
)
COMPILE_HELP = (
    "compile the workers' frame steps in the background, serving meanwhile (auto: on for AMX "
    "CPUs in bfloat16, where a frame is ~1.5x faster; ~1 min on 2 cores)"
)
RESOLUTION_HELP = "WIDTHxHEIGHT of the model (default: the folder's; official: 448x256 or 672x384)"


def build_config(argv: list[str] | None = None) -> ServeConfig:
    p = argparse.ArgumentParser(prog="lumos serve", description="run the Lumos service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local)")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--redis-url", default=None, help="redis://host:port/db session store")
    store.add_argument("--store", default=None, help="store URL (sqlite:///path.db or redis://)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local workers to start when none is registered (default: one per GPU, or 1; "
        "0 with --ray-address to only use `lumos worker` hosts)",
    )
    p.add_argument("--namespace", default="lumos")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--kv-budget-bytes", type=int, default=None)
    p.add_argument("--session-idle-s", type=float, default=300.0)
    p.add_argument(
        "--session-hosts",
        type=int,
        default=None,
        help="session hosts (silos) when this is the cluster's first API process "
        "(default: one per alive Ray node); later API processes use the cluster's number",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="inference dtype (auto: bfloat16 on GPUs and bf16 CPUs: AVX512-BF16, AMX)",
    )
    p.add_argument("--compile", default="auto", choices=COMPILE_CHOICES, help=COMPILE_HELP)
    p.add_argument("--resolution", default=None, help=RESOLUTION_HELP)
    a = p.parse_args(argv)
    workers = a.workers if a.workers is not None else max(1, _gpu_count())
    kwargs = {}
    if a.redis_url or a.store:
        kwargs["store_url"] = a.redis_url or a.store
    try:
        return ServeConfig(
            ray_address=a.ray_address,
            namespace=a.namespace,
            model=a.model,
            workers=workers,
            max_batch=a.max_batch,
            kv_budget_bytes=a.kv_budget_bytes,
            session_idle_s=a.session_idle_s,
            session_hosts=a.session_hosts,
            dtype=a.dtype,
            compile=a.compile,
            resolution=a.resolution,
            host=a.host,
            port=a.port,
            **kwargs,
        )
    except ValueError as e:
        p.error(str(e))


def worker_main(argv: list[str] | None = None) -> int:
    """`lumos worker`: start this host's worker actors in a running cluster, then block."""
    import ray

    p = argparse.ArgumentParser(prog="lumos worker", description="join this host's GPUs")
    p.add_argument("--ray-address", default="auto", help="the cluster to join (default: auto)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--gpus", type=int, default=None, help="workers to start (default: all GPUs)")
    p.add_argument("--namespace", default="lumos")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--kv-budget-bytes", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--compile", default="auto", choices=COMPILE_CHOICES, help=COMPILE_HELP)
    p.add_argument("--resolution", default=None, help=RESOLUTION_HELP)
    p.add_argument(
        "--resources",
        default=None,
        help="custom Ray resources each worker needs, as JSON (e.g. '{\"lumos_gpu\": 1}' where a "
        "node advertises its GPUs under that name); default: 1 GPU, or 1 CPU without a GPU",
    )
    a = p.parse_args(argv)
    custom = None
    if a.resources is not None:
        try:
            custom = json.loads(a.resources)
            if not isinstance(custom, dict) or not all(
                isinstance(v, int | float) and v > 0 for v in custom.values()
            ):
                raise ValueError
        except ValueError:
            p.error(f"--resources must be a JSON object of positive numbers, got {a.resources!r}")
    gpus = _gpu_count() if a.gpus is None else a.gpus
    count, resources = (gpus, {"num_gpus": 1}) if gpus > 0 else (1, {"num_cpus": 1})
    if custom is not None:  # the custom resource stands for the device
        resources = {**resources, "resources": custom}
        if gpus == 0:
            resources["num_cpus"] = 0
    ray.init(address=a.ray_address, namespace=a.namespace)
    node = ray.get_runtime_context().get_node_id()
    if custom is None:  # this host's GPUs: pinned to the node this command runs on
        host, pin = f"{runtime.hostname()}-{node[:8]}", node
    else:  # placed by Ray on a node that advertises the resource (several nodes per machine)
        host, pin = f"{runtime.hostname()}-{os.getpid()}", None
    handles = runtime.start_workers(
        a.namespace,
        count,
        resources,
        host=host,
        node_id=pin,
        model=a.model,
        max_batch=a.max_batch,
        kv_budget_bytes=a.kv_budget_bytes,
        dtype=a.dtype,
        compile=a.compile,
        resolution=a.resolution,
    )
    for info in ray.get([h.info.remote() for h in handles]):
        print(f"lumos worker: {info['name']} ready on {info['device']} ({info['model']})")
    sys.stdout.flush()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for h in handles:
        try:
            ray.get(h.stop.remote(), timeout=10)
        except Exception:
            pass
        ray.kill(h, no_restart=True)
    print("lumos worker: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
