"""`benchmarks/serve.py --idle-sessions N`: many sessions, each one frame then idle.

The real stack on one machine: a local Ray (random ports), one worker with the random tiny model
(or --model), the session hosts (--session-hosts, default 2), SQLite in a temporary folder, the
API under uvicorn in a thread. --concurrency clients POST /api/sessions (1 frame each, --steps)
until N sessions exist; then every session is read back over HTTP (state done with 1 frame,
frame 0 a PNG). Capacity refusals (429) are retried after a short wait and counted.

Figures: create_p50_ms / create_p99_ms (the POST round trip), seconds (all created and their
frame stored), reachable (sessions whose state and frame 0 read back intact), the session
layer's RSS (every session host's VmRSS: `rss_session_hosts_bytes`, target < 2 GB for 1,000
sessions) and, beside it, the worker's and the API process' RSS, and the active grains.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import Server  # noqa: E402  (the one uvicorn-in-a-thread harness)

PNG = b"\x89PNG\r\n\x1a\n"


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


async def _create_all(base: str, n: int, concurrency: int, steps: int) -> tuple[list, list, int]:
    import httpx

    made: list[tuple[str, str]] = []
    latencies: list[float] = []
    refused = 0
    counter = iter(range(n))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal refused
        for i in counter:
            body = {"prompt": "a red sneaker moves left", "frames": 1, "steps": steps, "seed": i}
            while True:
                t = time.perf_counter()
                r = await http.post("/api/sessions", json=body)
                if r.status_code == 429:  # the active-session cap: wait for some to finish
                    refused += 1
                    await asyncio.sleep(0.2)
                    continue
                if r.status_code != 201:
                    raise RuntimeError(f"create failed: {r.status_code} {r.text}")
                latencies.append((time.perf_counter() - t) * 1000)
                made.append((r.json()["id"], r.json()["token"]))
                break

    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return made, latencies, refused


async def _check_all(base: str, made: list, concurrency: int, timeout_s: float) -> int:
    """How many sessions read back done, with 1 frame whose PNG is intact (waits for each)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + timeout_s

    async def one(http: httpx.AsyncClient, sid: str, token: str) -> bool:
        auth = {"Authorization": f"Bearer {token}"}
        async with sem:
            while True:
                state = (await http.get(f"/api/sessions/{sid}", headers=auth)).json()
                if state["status"] not in ("queued", "running") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            if state["status"] != "done" or state["n_frames"] != 1:
                return False
            r = await http.get(f"/api/sessions/{sid}/frames/0.png", headers=auth)
            return r.status_code == 200 and r.content.startswith(PNG)

    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        ok = await asyncio.gather(*(one(http, sid, tok) for sid, tok in made))
    return sum(ok)


def run_idle_sessions(args) -> dict:
    import ray

    from lumos.cluster import runtime
    from lumos.cluster.host import rss_bytes
    from lumos.cluster.limits import Limits
    from lumos.cluster.runtime import ServeConfig

    n = args.idle_sessions
    os.environ.pop("RAY_GCS_SERVER_PORT", None)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="lumos-bench-idle",
        log_to_driver=False,
        configure_logging=False,
    )
    tmp = tempfile.TemporaryDirectory(prefix="lumos-bench-")
    try:
        ns = f"lumos-bench-idle-{uuid.uuid4().hex[:8]}"
        model = "random:tiny" if args.model in ("bundled", "random") else args.model
        cfg = ServeConfig(
            namespace=ns,
            store_url=f"sqlite:///{tmp.name}/lumos.db",
            model=model,
            workers=1,
            worker_resources={"num_cpus": 1},
            max_batch=8,
            session_idle_s=args.idle_s,
            session_hosts=args.session_hosts,
            limits=Limits(
                max_sessions=max(32, 2 * args.concurrency),
                max_sessions_per_owner=max(8, 2 * args.concurrency),
                max_stored_sessions_per_owner=n + 10,
                rate_per_s=0,
                owner_rate_per_s=0,
            ),
        )
        server = Server(cfg, ws_ping_interval=None)
        base = server.url.rstrip("/")
        try:
            hosts = [
                ray.get_actor(runtime.host_name(cfg.store_url, i), namespace=ns)
                for i in range(args.session_hosts)
            ]
            idle_rss = sum(s["rss_bytes"] for s in ray.get([h.stats.remote() for h in hosts]))
            t0 = time.perf_counter()
            made, lat, refused = asyncio.run(
                _create_all(base, n, args.concurrency, args.idle_steps)
            )
            created_s = time.perf_counter() - t0
            reachable = asyncio.run(_check_all(base, made, args.concurrency, args.timeout))
            seconds = time.perf_counter() - t0
            stats = ray.get([h.stats.remote() for h in hosts])
            (wname,) = runtime.list_workers(ns)
            winfo = ray.get(ray.get_actor(wname, namespace=ns).info.remote())
            worker_rss, api_rss = rss_bytes(winfo["pid"]), rss_bytes()
        finally:
            server.stop()
            for name in runtime.list_workers(ns):
                ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
            for h in hosts:
                ray.kill(h, no_restart=True)
    finally:
        ray.shutdown()
        tmp.cleanup()
    host_rss = sum(s["rss_bytes"] for s in stats)
    return {
        "benchmark": "serve --idle-sessions",
        "path": "HTTP create (1 frame each) via uvicorn, local Ray, 1 worker, SQLite",
        "model": model,
        "sessions": n,
        "concurrency": args.concurrency,
        "steps": args.idle_steps,
        "session_hosts": args.session_hosts,
        "create_p50_ms": _pct(lat, 50),
        "create_p99_ms": _pct(lat, 99),
        "create_seconds": created_s,
        "seconds": seconds,
        "refused_429": refused,
        "reachable": reachable,
        "active_grains": sum(s["active"] for s in stats),
        "rss_session_hosts_bytes": host_rss,
        "rss_session_hosts_empty_bytes": idle_rss,
        "rss_per_session_bytes": (host_rss - idle_rss) / max(1, n),
        "rss_worker_bytes": worker_rss,
        "rss_api_process_bytes": api_rss,
    }
