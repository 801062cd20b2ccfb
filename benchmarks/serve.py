"""Serving benchmark: aggregate frames/s of one worker with 1..8 sessions, batching on and off,
time to first frame and stream latency, measured the way a browser sees the service.

    python benchmarks/serve.py --json out.json                        # bundled model (or random)
    python benchmarks/serve.py --model random:tiny --sessions 1,8 --frames 4 --steps 4
    python benchmarks/serve.py --engine-only --json out.json          # GPU hosts without Ray

The real stack: a local Ray (random ports, never 6379), ONE worker actor, SQLite in a temporary
folder, the API (`create_app`) under uvicorn on a free port in a background thread, and clients
that POST /api/sessions over HTTP and read /api/sessions/{id}/stream over a WebSocket (the
`websockets` package). Both engine modes (`ServeConfig(batching=True|False)`, passed to the
worker's `Engine`) run the same rounds; before them one round warms the worker and the API up.
A round with N sessions is N browsers at once: each creates a session of --frames frames, opens
its WebSocket and reads them (the cold phase: it includes activating N session actors, i.e. N
Ray actor processes); when all N are idle, each extends its session by --frames frames over HTTP
and reads them on the same socket (the warm phase: sessions active, caches warm).

Figures (frames are latent frames, i.e. stored frame records and WebSocket frame messages):

  frames_per_s[on|off][N]   N * frames / (first extend sent -> last frame received), warm phase
  frames_per_s_cold         N * frames / (first create sent -> last frame received), cold phase
  speedup_<hi>_vs_<lo>      frames_per_s at the largest N / at the smallest N, per mode (and _cold)
  ttff_p50_ms               session create sent -> its first frame received (batching on)
  create_p50_ms             the POST /api/sessions round trip (actor activation included)
  stream_latency_p50/p99_ms frame committed (`meta.committed_at`, stamped by the worker when the
                            engine's frame reaches its event loop, before PNG encoding) -> received
                            by the WebSocket client, over both phases and every round of the mode;
                            only frames committed after the socket was open (older ones would be
                            the stored backlog: counted in backlog_frames)
  timelines                 per round and session, seconds from the round's start

With --repeats R every N runs R rounds: frames/s is the best round, the percentiles pool them.

--engine-only drives `lumos.engine.Engine` directly (no Ray, no API, no pixel decoding): N requests
added at once, stepped until idle, the two modes interleaved; frames/s and time to first frame
(the session's first event) per mode.

Targets (recorded in docs/LOG.md, not asserted): with batching on, >= 3x aggregate frames/s at
8 sessions vs 1 on the 2-core CPU machine, and >= 6x engine-only on a GPU; p99 stream latency
< 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from idle_sessions import run_idle_sessions  # noqa: E402
from lumos.devices import DTYPE_CHOICES
from report import emit, sync  # noqa: E402
from serving import Server  # noqa: E402  (the one uvicorn-in-a-thread harness)

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "lumos" / "assets" / "fmnist"
PROMPTS = [
    "a red sneaker moves left",
    "a blue bag moves up",
    "a green shirt falls down",
    "a yellow dress moves right",
    "a white boot bounces",
    "a pink trouser moves left",
    "a black coat moves down",
    "an orange pullover moves up",
]
MODES = {"on": True, "off": False}


def _default_model() -> str:
    return "bundled" if (BUNDLED / "pipeline.json").is_file() else "random"


def _default_steps(model: str) -> int:
    """The model's default MaskGIT steps per frame (its pipeline.json), 8 for random weights."""
    folder = BUNDLED if model == "bundled" else Path(model)
    settings = folder / "pipeline.json"
    if not model.startswith("random") and settings.is_file():
        return int(json.loads(settings.read_text()).get("steps", 8))
    return 8


def _rates(fps: dict[str, dict[str, float]], sessions: list[int]) -> dict:
    """frames_per_s per mode and N, the largest-vs-smallest N speedup per mode, and the
    batching on/off gain per N (when both modes ran)."""
    lo, hi = str(min(sessions)), str(max(sessions))
    gain = None
    if {"on", "off"} <= set(fps):
        gain = {n: fps["on"][n] / fps["off"][n] for n in fps["on"]}
    return {
        "frames_per_s": fps,
        _speedup_key(sessions): {m: fps[m][hi] / fps[m][lo] for m in fps},
        "batching_gain": gain,
    }


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def _speedup_key(sessions: list[int]) -> str:
    return f"speedup_{max(sessions)}_vs_{min(sessions)}"


# -- engine only ---------------------------------------------------------------------------------


def run_engine_only(args) -> dict:
    from lumos.config import SamplerConfig
    from lumos.engine import Engine, EngineRequest
    from lumos.pipeline import Pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_folder(
        None if args.model == "bundled" else args.model, device=device, dtype=args.dtype
    )
    s = pipe.settings
    cfg = s.cfg_video if args.cfg is None else args.cfg
    rgb = 1 + pipe.visual.temporal * (args.frames - 1)
    duration = max(1, round(rgb / s.fps))
    max_batch = max(args.sessions)

    def requests(n: int, frames: int) -> list:
        out = []
        for i in range(n):
            text = pipe.text_ids(PROMPTS[i % len(PROMPTS)], duration * s.fps, s.fps)
            gen = torch.Generator(device=device).manual_seed(i)
            sampler = SamplerConfig(steps=args.steps, cfg=cfg)
            out.append(EngineRequest(f"s{i}", text, None, frames, sampler, duration, s.fps, gen))
        return out

    def one_round(batching: bool, n: int, frames: int) -> tuple[float, list[float], int]:
        eng = Engine(pipe.model, pipe.layout, max_batch=max_batch, batching=batching)
        reqs = requests(n, frames)
        sync(device)
        t0 = time.perf_counter()
        for r in reqs:
            eng.add(r)
        first: dict[str, float] = {}
        got = 0
        while eng.has_work:
            events = eng.step()
            if events:
                now = time.perf_counter()
                for ev in events:
                    first.setdefault(ev.session_id, now - t0)
                got += len(events)
        sync(device)
        dt = time.perf_counter() - t0
        if got != n * frames:
            raise RuntimeError(f"engine emitted {got} frames, expected {n * frames}")
        return dt, list(first.values()), eng.stats()["forwards"]

    fps: dict[str, dict[str, float]] = {m: {} for m in args.modes}
    ttff: dict[str, dict[str, list[float]]] = {m: {} for m in args.modes}
    forwards: dict[str, dict[str, int]] = {m: {} for m in args.modes}
    with torch.inference_mode():
        for mode in args.modes:
            one_round(MODES[mode], min(2, max_batch), 1)  # warm-up
        # the modes interleaved, best of --repeats: the figures drift with the machine's load
        for _ in range(args.repeats):
            for n in args.sessions:
                for mode in args.modes:
                    dt, first, fw = one_round(MODES[mode], n, args.frames)
                    k, rate = str(n), n * args.frames / dt
                    fps[mode][k] = max(fps[mode].get(k, 0.0), rate)
                    ttff[mode].setdefault(k, []).extend(x * 1e3 for x in first)
                    forwards[mode][k] = fw
                    print(
                        f"  engine batching={mode:<3} sessions={n}: {rate:8.2f} "
                        f"frames/s ({dt:.2f} s, {fw} forwards)",
                        flush=True,
                    )
    head = "on" if "on" in fps else args.modes[0]
    return {
        "benchmark": "serve",
        "path": "engine-only (lumos.engine.Engine, no Ray/API/decode)",
        "device": _device_name(device),
        "model": args.model,
        "grid": f"{pipe.layout.h}x{pipe.layout.w}",
        "steps": args.steps,
        "cfg": cfg,
        "frames_per_session": args.frames,
        "sessions": args.sessions,
        "repeats": args.repeats,
        "max_batch": max_batch,
        **_rates(fps, args.sessions),
        "headline_mode": head,
        "ttff_p50_ms": _pct([x for v in ttff[head].values() for x in v], 50),
        "ttff_p50_ms_by": {m: {k: _pct(v, 50) for k, v in d.items()} for m, d in ttff.items()},
        "forwards": forwards,
    }


# -- the real stack ------------------------------------------------------------------------------


def _ws_url(server: Server, sid: str, start: int = 0) -> str:
    return f"ws://127.0.0.1:{server.port}/api/sessions/{sid}/stream?from={start}"


async def _read_frames(ws, sid: str, first: int, n: int, deadline: float) -> list[dict]:
    """The next n frame messages (seq first..first+n-1), stamped when received."""
    frames = []
    while len(frames) < n:
        raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        now = time.time()
        msg = json.loads(raw)
        if msg["type"] == "error":
            raise RuntimeError(f"stream of {sid} failed: {msg}")
        if msg["type"] != "frame":
            continue
        if not base64.b64decode(msg["png"]).startswith(b"\x89PNG"):
            raise RuntimeError(f"frame {msg['seq']} of {sid} is not a PNG")
        committed = float((msg.get("meta") or {}).get("committed_at") or 0.0)
        frames.append({"seq": msg["seq"], "received": now, "committed": committed})
    seqs = [f["seq"] for f in frames]
    if seqs != list(range(first, first + n)):
        raise RuntimeError(f"session {sid}: expected frames {first}..{first + n - 1}, got {seqs}")
    return frames


async def _wait_idle(http, sid: str, headers: dict, deadline: float) -> None:
    while True:
        r = await http.get(f"/api/sessions/{sid}", headers=headers)
        r.raise_for_status()
        if r.json()["status"] != "running":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"session {sid} is still running")
        await asyncio.sleep(0.02)


async def _session(http, server: Server, i: int, args, owner: str, barrier, timeout_s: float):
    """One browser: create a session, watch it over a WebSocket; when every session of the
    round is idle, extend it on the same socket and watch the new frames."""
    from websockets.asyncio.client import connect

    deadline = time.monotonic() + timeout_s
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "frames": args.frames, "steps": args.steps}
    body["seed"] = i
    if args.cfg is not None:
        body["cfg"] = args.cfg
    created_at = time.time()
    r = await http.post("/api/sessions", json=body, headers={"X-Lumos-Owner": owner})
    if r.status_code != 201:
        raise RuntimeError(f"create failed: {r.status_code} {r.text}")
    created_ok = time.time()
    out = r.json()
    sid, token = out["id"], out["token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with connect(_ws_url(server, sid), max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))  # no token in any URL
        connected_at = time.time()
        cold = await _read_frames(ws, sid, 0, args.frames, deadline)
        await _wait_idle(http, sid, auth, deadline)
        await barrier.wait()  # every session of the round is idle: extend them all at once
        extend_at = time.time()
        r = await http.post(
            f"/api/sessions/{sid}/extend", json={"frames": args.frames}, headers=auth
        )
        if r.status_code != 202:
            raise RuntimeError(f"extend failed: {r.status_code} {r.text}")
        warm = await _read_frames(ws, sid, args.frames, args.frames, deadline)
    return {
        "id": sid,
        "auth": auth,
        "created": created_at,
        "created_ok": created_ok,
        "connected": connected_at,
        "extended": extend_at,
        "cold": cold,
        "warm": warm,
    }


async def _round(server: Server, n: int, args, timeout_s: float) -> dict:
    import httpx

    owner = "bench-" + uuid.uuid4().hex
    barrier = asyncio.Barrier(n)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout_s) as http:
        t0 = time.time()
        runs = await asyncio.gather(
            *(_session(http, server, i, args, owner, barrier, timeout_s) for i in range(n))
        )
        for r in runs:  # free the session actors before the next round
            await http.delete(f"/api/sessions/{r['id']}", headers=r["auth"])
    t_cold = max(f["received"] for r in runs for f in r["cold"])
    t_ext = min(r["extended"] for r in runs)
    t_warm = max(f["received"] for r in runs for f in r["warm"])
    live, backlog = [], 0
    for r in runs:
        for f in r["cold"] + r["warm"]:
            if f["committed"] >= r["connected"]:
                live.append((f["received"] - f["committed"]) * 1e3)
            else:
                backlog += 1

    def rel(x: float) -> float:
        return round(x - t0, 4)

    return {
        "seconds": t_warm - t_ext,
        "seconds_cold": t_cold - t0,
        "frames_per_s": n * args.frames / (t_warm - t_ext),
        "frames_per_s_cold": n * args.frames / (t_cold - t0),
        "ttff_ms": [(r["cold"][0]["received"] - r["created"]) * 1e3 for r in runs],
        "create_ms": [(r["created_ok"] - r["created"]) * 1e3 for r in runs],
        "latency_ms": live,
        "backlog_frames": backlog,
        "timeline": [
            {
                "create_sent": rel(r["created"]),
                "create_done": rel(r["created_ok"]),
                "ws_open": rel(r["connected"]),
                "extend_sent": rel(r["extended"]),
                "committed": [rel(f["committed"]) for f in r["cold"] + r["warm"]],
                "received": [rel(f["received"]) for f in r["cold"] + r["warm"]],
            }
            for r in runs
        ],
    }


def _kill_workers(namespace: str) -> None:
    import ray

    from lumos.cluster import runtime

    for name in runtime.list_workers(namespace):
        handle = runtime.get_actor(name, namespace)
        if handle is None:
            continue
        try:
            ray.get(handle.stop.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(handle, no_restart=True)


def _bench_limits(limits_cls, sessions: int):
    """Limits a benchmark does not run into: every round's sessions come from one address and
    one owner key, many times a minute (rate limits off, caps above the largest round)."""
    cap = max(32, 2 * sessions)
    return limits_cls(
        max_sessions=cap, max_sessions_per_owner=cap, rate_per_s=0.0, owner_rate_per_s=0.0
    )


def run_stack(args) -> dict:
    import httpx
    import ray

    from lumos.cluster import runtime
    from lumos.cluster.limits import Limits
    from lumos.cluster.runtime import ServeConfig

    cuda = torch.cuda.is_available()
    os.environ.pop("RAY_GCS_SERVER_PORT", None)  # random ports; never Redis' 6379
    ray.init(
        address="local",  # a new instance, even where other Ray clusters run on this machine
        num_cpus=max(1, args.threads) + 1,
        include_dashboard=False,
        namespace="lumos-bench",
        log_to_driver=False,
        configure_logging=False,
    )
    timeout_s = args.timeout
    fps: dict[str, dict[str, float]] = {}
    fps_cold: dict[str, dict[str, float]] = {}
    ttff: dict[str, dict[str, list[float]]] = {}
    lat: dict[str, dict[str, list[float]]] = {}
    backlog: dict[str, dict[str, int]] = {}
    create: dict[str, dict[str, list[float]]] = {}
    timelines: dict[str, dict[str, list[dict]]] = {}
    info: dict = {}
    tmp = tempfile.TemporaryDirectory(prefix="lumos-bench-")
    try:
        for mode in args.modes:
            ns = f"lumos-bench-{uuid.uuid4().hex[:8]}-{mode}"
            cfg = ServeConfig(
                namespace=ns,
                store_url=f"sqlite:///{tmp.name}/lumos-{mode}.db",
                model=None if args.model == "bundled" else args.model,
                workers=1,
                worker_resources=None if cuda else {"num_cpus": max(1, args.threads)},
                max_batch=max(args.sessions),
                batching=MODES[mode],
                dtype=args.dtype,
                session_idle_s=600.0,
                limits=_bench_limits(Limits, max(args.sessions)),
            )
            t = time.perf_counter()
            server = Server(cfg, ws_ping_interval=None)
            try:
                print(
                    f"  stack batching={mode}: API and worker up in "
                    f"{time.perf_counter() - t:.1f} s",
                    flush=True,
                )
                workers = httpx.get(server.url + "api/health", timeout=60).json()["workers"]
                if not workers:
                    raise RuntimeError("the API reports no live worker")
                info = ray.get(
                    ray.get_actor(runtime.list_workers(ns)[0], namespace=ns).info.remote()
                )
                if workers and bool(info.get("batching", MODES[mode])) != MODES[mode]:
                    raise RuntimeError(f"the worker does not run batching={mode}")
                asyncio.run(_round(server, 1, args, timeout_s))  # warm-up
                fps[mode], ttff[mode], lat[mode], backlog[mode] = {}, {}, {}, {}
                create[mode], timelines[mode], fps_cold[mode] = {}, {}, {}
                for n in [n for _ in range(args.repeats) for n in args.sessions]:
                    res = asyncio.run(_round(server, n, args, timeout_s))
                    k = str(n)
                    fps[mode][k] = max(fps[mode].get(k, 0.0), res["frames_per_s"])
                    fps_cold[mode][k] = max(fps_cold[mode].get(k, 0.0), res["frames_per_s_cold"])
                    ttff[mode].setdefault(k, []).extend(res["ttff_ms"])
                    lat[mode].setdefault(k, []).extend(res["latency_ms"])
                    backlog[mode][k] = backlog[mode].get(k, 0) + res["backlog_frames"]
                    create[mode].setdefault(k, []).extend(res["create_ms"])
                    timelines[mode].setdefault(k, []).append(res["timeline"])
                    print(
                        f"  stack batching={mode:<3} sessions={n}: {res['frames_per_s']:8.2f} "
                        f"frames/s ({res['seconds']:.2f} s; with activation "
                        f"{res['frames_per_s_cold']:.2f} in {res['seconds_cold']:.2f} s), ttff p50 "
                        f"{_pct(res['ttff_ms'], 50):.0f} ms, latency p50 "
                        f"{_pct(res['latency_ms'], 50) or float('nan'):.1f} ms p99 "
                        f"{_pct(res['latency_ms'], 99) or float('nan'):.1f} ms",
                        flush=True,
                    )
            finally:
                server.stop()
                _kill_workers(ns)
    finally:
        ray.shutdown()
        tmp.cleanup()

    lo, hi = str(min(args.sessions)), str(max(args.sessions))
    head = "on" if "on" in fps else args.modes[0]
    all_lat = [x for v in lat[head].values() for x in v]
    device = str(info.get("device", "cpu"))
    if device.startswith("cuda") and cuda:
        device = torch.cuda.get_device_name()
    elif not device.startswith("cuda"):
        device = (
            f"cpu ({platform.machine()}, {args.threads} worker threads, {os.cpu_count()} cores)"
        )
    return {
        "benchmark": "serve",
        "path": "HTTP create + WebSocket stream via uvicorn, local Ray, 1 worker, SQLite",
        "device": device,
        "model": args.model,
        "grid": "x".join(str(x) for x in info.get("grid", [])) or None,
        "steps": args.steps,
        "cfg": args.cfg if args.cfg is not None else info.get("cfg"),
        "frames_per_session": args.frames,
        "sessions": args.sessions,
        "repeats": args.repeats,
        "max_batch": max(args.sessions),
        **_rates(fps, args.sessions),
        "frames_per_s_cold": fps_cold,
        _speedup_key(args.sessions) + "_cold": {
            m: fps_cold[m][hi] / fps_cold[m][lo] for m in fps_cold
        },
        "headline_mode": head,
        "ttff_p50_ms": _pct([x for v in ttff[head].values() for x in v], 50),
        "create_p50_ms": _pct([x for v in create[head].values() for x in v], 50),
        "stream_latency_p50_ms": _pct(all_lat, 50),
        "stream_latency_p99_ms": _pct(all_lat, 99),
        "stream_latency_samples": len(all_lat),
        "backlog_frames": sum(backlog[head].values()),
        "ttff_p50_ms_by": {m: {k: _pct(v, 50) for k, v in d.items()} for m, d in ttff.items()},
        "stream_latency_by": {
            m: {k: {"p50": _pct(v, 50), "p99": _pct(v, 99), "n": len(v)} for k, v in d.items()}
            for m, d in lat.items()
        },
        "backlog_frames_by": backlog,
        "create_p50_ms_by": {m: {k: _pct(v, 50) for k, v in d.items()} for m, d in create.items()},
        "timelines": timelines,  # [mode][N][repeat][session], seconds from the round's start
    }


# -- output --------------------------------------------------------------------------------------


def print_table(res: dict) -> None:
    sessions = [str(n) for n in res["sessions"]]
    key = _speedup_key(res["sessions"])
    tables = [("frames_per_s", key)]
    if "frames_per_s_cold" in res:
        tables.append(("frames_per_s_cold", key + "_cold"))
    for name, skey in tables:
        print()
        head = "".join(f"{'N=' + n:>10}" for n in sessions)
        print(f"{name:<20}{head}{'speedup':>10}")
        for mode, row in res[name].items():
            cells = "".join(f"{row[n]:>10.2f}" for n in sessions)
            print(f"{'batching ' + mode:<20}{cells}{res[skey][mode]:>9.2f}x")
    print(f"(aggregate frames/s of all sessions; speedup = {key.split('_', 1)[1]})")
    print()
    width = 24
    for k in ("path", "device", "model", "grid", "steps", "cfg", "frames_per_session"):
        print(f"{k:<{width}}  {res.get(k)}")
    for k in (
        "ttff_p50_ms",
        "create_p50_ms",
        "stream_latency_p50_ms",
        "stream_latency_p99_ms",
        "stream_latency_samples",
        "backlog_frames",
    ):
        if k in res:
            v = res[k]
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if res.get("batching_gain"):
        gain = ", ".join(f"N={n}: {g:.2f}x" for n, g in res["batching_gain"].items())
        print(f"{'batching on/off':<{width}}  {gain}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=_default_model(),
        help="'bundled', a model folder, 'random' or 'random:<preset>' "
        "(default: bundled if present, else random)",
    )
    p.add_argument("--sessions", default="1,2,4,8", help="concurrent sessions per round")
    p.add_argument("--frames", type=int, default=8, help="latent frames per session")
    p.add_argument("--steps", type=int, default=None, help="default: the model's (random: 8)")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (of the worker)"
    )
    p.add_argument("--batching", default="on,off", help="modes to run: on, off or on,off")
    p.add_argument("--engine-only", action="store_true", help="drive Engine directly, no Ray/API")
    p.add_argument("--device", default=None, help="engine-only: cpu or cuda (default: cuda if any)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--repeats", type=int, default=1, help="rounds per N; frames/s is the best")
    p.add_argument("--timeout", type=float, default=600.0, help="per round, seconds")
    p.add_argument(
        "--idle-sessions",
        type=int,
        default=0,
        help="N sessions of one frame each, then idle: create latency, RSS (see idle_sessions.py)",
    )
    p.add_argument("--concurrency", type=int, default=16, help="--idle-sessions: clients at once")
    p.add_argument("--idle-steps", type=int, default=1, help="--idle-sessions: steps per frame")
    p.add_argument("--session-hosts", type=int, default=2, help="--idle-sessions: session hosts")
    p.add_argument(
        "--idle-s", type=float, default=600.0, help="--idle-sessions: grain idle timeout"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.idle_sessions:
        if min(args.idle_sessions, args.concurrency, args.idle_steps, args.session_hosts) < 1:
            p.error("--idle-sessions, --concurrency, --idle-steps, --session-hosts must be >= 1")
        res = run_idle_sessions(args)
        emit(res, args.json)
        return res
    try:
        args.sessions = sorted({int(x) for x in args.sessions.split(",") if x.strip()})
        args.modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    except ValueError:
        p.error("--sessions takes integers, e.g. 1,2,4,8")
    if not args.sessions or min(args.sessions) < 1:
        p.error("--sessions needs positive integers")
    if not args.modes or not set(args.modes) <= set(MODES):
        p.error("--batching takes on, off or on,off")
    if args.steps is None:
        args.steps = _default_steps(args.model)
    if min(args.frames, args.steps, args.threads, args.repeats) < 1:
        p.error("--frames, --steps, --threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)

    res = run_engine_only(args) if args.engine_only else run_stack(args)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
