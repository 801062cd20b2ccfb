"""Admission benchmark: N parallel session creates against a cap, on the real stack.

    python benchmarks/admission.py --json out.json              # 50 creates, cap 32, both stores
    python benchmarks/admission.py --creates 80 --cap 16 --stores sqlite

A local Ray (random ports), one worker with the random tiny model, the API (`create_app`) under
uvicorn in a thread (tests/serving.py), the store in SQLite (a temporary file) and/or the real
Redis at 127.0.0.1:6379 (a unique key prefix, removed afterwards). Each round sends --creates
POST /api/sessions at once, each with its own owner key (so only the global cap applies), slow
enough (--frames x --steps) that no admitted session finishes during the round. Reported per
store: how many got 201 and 429 (with their reasons and Retry-After), the active count /api/health
reports right after, and the create round-trip latency (p50 / max) of each kind. Every session is
deleted afterwards. Capacity figures, not speed: the counts must be exactly cap and creates - cap.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the uvicorn + Ray harness of the tests

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _round(url: str, creates: int, body: dict) -> list[tuple[int, dict, dict, float]]:
    async def one(http: httpx.AsyncClient) -> tuple[int, dict, dict, float]:
        t = time.perf_counter()
        r = await http.post("/api/sessions", json=body, headers={"X-Lumos-Owner": _owner()})
        return r.status_code, r.json(), dict(r.headers), time.perf_counter() - t

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        return await asyncio.gather(*(one(http) for _ in range(creates)))


def _owner() -> str:
    return "bench-" + uuid.uuid4().hex


def measure(server, creates: int, body: dict) -> dict:
    results = asyncio.run(_round(server.url.rstrip("/"), creates, body))
    http = httpx.Client(base_url=server.url, timeout=60)
    try:
        health = http.get("/api/health").json()
        codes = Counter(code for code, *_ in results)
        refused = [(b, h) for code, b, h, _ in results if code == 429]
        out = {
            "creates": creates,
            "status_201": codes.get(201, 0),
            "status_429": codes.get(429, 0),
            "other_statuses": {str(c): n for c, n in codes.items() if c not in (201, 429)},
            "reasons_429": dict(Counter(b.get("reason") for b, _ in refused)),
            "retry_after_429": sorted({h.get("retry-after") for _, h in refused}),
            "active_after": health.get("sessions", {}).get("active"),
            "create_201_p50_ms": _ms(results, 201, statistics.median),
            "create_201_max_ms": _ms(results, 201, max),
            "create_429_p50_ms": _ms(results, 429, statistics.median),
            "create_429_max_ms": _ms(results, 429, max),
        }
        for code, b, _, _ in results:
            if code == 201:
                http.delete(
                    f"/api/sessions/{b['id']}", headers={"Authorization": "Bearer " + b["token"]}
                )
        return out
    finally:
        http.close()


def _ms(results, code: int, fn) -> float | None:
    values = [t for c, _, _, t in results if c == code]
    return round(1000 * fn(values), 1) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--creates", type=int, default=50)
    p.add_argument("--cap", type=int, default=32)
    p.add_argument("--stores", default="sqlite,redis")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import ray
    import redis

    import serving
    from lumos.cluster.limits import Limits

    limits = Limits(
        max_sessions=a.cap,
        max_sessions_per_owner=a.cap,
        rate_per_s=1000,
        rate_burst=100_000,
        owner_rate_per_s=1000,
        owner_rate_burst=100_000,
    )
    body = {"prompt": "a red sneaker moves left", "frames": a.frames, "steps": a.steps}
    prefix = f"lumos-bench-admission-{uuid.uuid4().hex[:8]}"
    report: dict = {"cap": a.cap, "creates": a.creates, "stores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = serving.local_ray_config(
            f"lumos-bench-admission-{uuid.uuid4().hex[:8]}", f"{tmp}/lumos.db", limits=limits
        )
        try:
            for store in a.stores.split(","):
                cfg = base
                if store == "redis":
                    cfg = dataclasses.replace(base, store_url=f"{REDIS_URL}?prefix={prefix}")
                server = serving.Server(cfg)
                try:
                    report["stores"][store] = measure(server, a.creates, body)
                finally:
                    server.stop()
        finally:
            ray.shutdown()
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()

    print(f"{a.creates} parallel creates against a cap of {a.cap} (measured on a shared box)")
    print(
        f"{'store':8} {'201':>5} {'429':>5} {'reasons':24} {'active':>6} "
        f"{'201 p50/max ms':>16} {'429 p50/max ms':>16}"
    )
    for store, r in report["stores"].items():
        print(
            f"{store:8} {r['status_201']:>5} {r['status_429']:>5} "
            f"{json.dumps(r['reasons_429']):24} "
            f"{r['active_after']!s:>6} {r['create_201_p50_ms']!s:>7}/{r['create_201_max_ms']!s:<8} "
            f"{r['create_429_p50_ms']!s:>7}/{r['create_429_max_ms']!s:<8}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    ok = all(
        r["status_201"] == min(a.cap, a.creates) and r["status_201"] + r["status_429"] == a.creates
        for r in report["stores"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
