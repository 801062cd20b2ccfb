"""Long-video benchmark: the cost of a latent frame as one session grows to 1,024 latent frames.

    python benchmarks/long.py --json out.json                    # bundled model, engine + stack
    python benchmarks/long.py --engine-only --points 16,64,256   # quicker, no Ray / API
    python benchmarks/long.py --engine-only --stride 4 --json s4.json   # window stride A/B
    python benchmarks/long.py --model random:tiny --points 16,64 --chunk 16   # smoke run

One session, extended the way the service extends it: requests of --chunk latent frames, each
continuing from every frame so far (the engine's warm-cache path). Frames are latent frames
(the bundled tokenizer has temporal compression 1, so latent = RGB frames there).

- engine: `lumos.engine.Engine` alone (no pixel decoding), timed in this process;
- stack: the real service (local Ray with one worker, SQLite, the API under uvicorn), one
  client that creates the session, reads its WebSocket and extends it over HTTP when a request
  is done; frames timed when the client receives them.

At each point p: ms_per_frame = the mean gap between consecutive frames p-16 .. p-1 (one
request, so no extend round trip is inside; for the engine also in process CPU time, which a
busy shared box inflates less than wall time), the process's resident memory (the worker's for
the stack) and the KV bytes the engine holds. Targets (docs/LOG.md): ms/frame at 1,024 <= 1.2x
at 16; RSS and KV bytes flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import emit  # noqa: E402

SPAN = 16  # frames per measurement


def _rss(pid: int | str = "self") -> int:
    """Resident bytes of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _at_points(times: dict[int, float], points: list[int]) -> dict[str, float]:
    out = {}
    for p in points:
        seqs = [s for s in range(max(0, p - SPAN), p) if s in times]
        gaps = [times[b] - times[a] for a, b in zip(seqs, seqs[1:])]
        out[str(p)] = 1e3 * sum(gaps) / len(gaps) if gaps else float("nan")
    return out


def run_engine(args, pipe) -> dict:
    """One session through the engine alone, `chunk` frames a request, up to max(points)."""
    from lumos.engine import Engine, EngineRequest

    sc = pipe.sampler_config(args.steps, args.cfg)
    cond = pipe.conditioning(pipe.settings.frames)
    text = pipe.text_ids(args.prompt, cond.text_frames, cond.fps)
    eng = Engine(pipe.model, pipe.layout, max_batch=1)
    gen = torch.Generator(device=pipe.device).manual_seed(0)
    frames: list[torch.Tensor] = []
    times: dict[int, float] = {}
    cpu: dict[int, float] = {}  # process CPU time: robust on a shared box (with --threads 1)
    rss: dict[str, int] = {}
    kv: dict[str, int] = {}
    total = max(args.points)
    with torch.inference_mode():
        while len(frames) < total:
            n = min(args.chunk, total - len(frames))
            given = torch.stack(frames) if frames else None
            req = EngineRequest(
                "long", text, given, n, sc, duration=cond.duration, fps=cond.fps, generator=gen
            )
            eng.add(req)
            while eng.has_work:
                for ev in eng.step():
                    times[ev.index] = time.perf_counter()
                    cpu[ev.index] = time.process_time()
                    frames.append(ev.codes)
                    if ev.index + 1 in args.points:
                        st = eng.stats()
                        rss[str(ev.index + 1)] = _rss()
                        kv[str(ev.index + 1)] = st["kv_bytes"] + st["batch_kv_bytes"]
            print(f"  engine: {len(frames)} frames", flush=True)
    return {
        "ms_per_frame": _at_points(times, args.points),
        "cpu_ms_per_frame": _at_points(cpu, args.points),
        "rss_bytes": rss,
        "kv_bytes": kv,
        "slides": eng.stats()["slides"],
    }


async def _stack_session(server, args, points: list[int]) -> dict:
    import httpx
    from websockets.asyncio.client import connect

    from lumos.cluster import runtime

    total = max(points)
    times: dict[int, float] = {}
    rss: dict[str, int] = {}
    kv: dict[str, int] = {}
    worker = runtime.get_actor(runtime.list_workers(server.namespace)[0], server.namespace)
    t0 = time.perf_counter()
    while (info := await worker.info.remote())["compile"] == "compiling":
        await asyncio.sleep(1.0)  # measure the steady state, not the eager warm-up
    pid, compiled, waited = info["pid"], info["compile"], time.perf_counter() - t0
    owner = "long-" + uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=server.url.rstrip("/"), timeout=120) as http:
        body = {"prompt": args.prompt, "frames": min(args.chunk, total), "seed": 0}
        if args.steps:
            body["steps"] = args.steps
        if args.cfg is not None:
            body["cfg"] = args.cfg
        r = await http.post("/api/sessions", json=body, headers={"X-Lumos-Owner": owner})
        if r.status_code != 201:
            raise RuntimeError(f"create failed: {r.status_code} {r.text}")
        sid, token = r.json()["id"], r.json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        asked = body["frames"]
        url = f"ws://127.0.0.1:{server.port}/api/sessions/{sid}/stream?from=0"
        async with connect(url, max_size=None, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token}))  # no token in any URL
            while len(times) < total:
                msg = json.loads(await asyncio.wait_for(ws.recv(), args.timeout))
                if msg["type"] == "error":
                    raise RuntimeError(f"stream failed: {msg}")
                if msg["type"] != "frame":
                    continue
                seq = int(msg["seq"])
                times[seq] = time.perf_counter()
                if seq + 1 in points:
                    load = await worker.load.remote()
                    rss[str(seq + 1)] = _rss(pid)
                    kv[str(seq + 1)] = int(load["kv_bytes"])
                if seq + 1 == asked and asked < total:
                    while True:  # the request is done once the session is no longer running
                        state = (await http.get(f"/api/sessions/{sid}", headers=auth)).json()
                        if state["status"] != "running":
                            break
                        await asyncio.sleep(0.01)
                    n = min(args.chunk, total - asked)
                    r = await http.post(
                        f"/api/sessions/{sid}/extend", json={"frames": n}, headers=auth
                    )
                    if r.status_code != 202:
                        raise RuntimeError(f"extend failed: {r.status_code} {r.text}")
                    asked += n
                if seq % 64 == 63:
                    print(f"  stack: {seq + 1} frames", flush=True)
        mp4 = await http.get(f"/api/sessions/{sid}/video.mp4", headers=auth)
        mp4.raise_for_status()
    return {
        "ms_per_frame": _at_points(times, points),
        "rss_bytes": rss,
        "kv_bytes": kv,
        "mp4_bytes": len(mp4.content),
        "frames_received": len(times),
        "compile": compiled,
        "compile_wait_seconds": waited,
    }


def run_stack(args) -> dict:
    import ray

    from lumos.cluster.limits import Limits
    from lumos.cluster.runtime import ServeConfig
    from serve import _kill_workers
    from serving import Server

    os.environ.pop("RAY_GCS_SERVER_PORT", None)  # random ports; never Redis' 6379
    ray.init(
        num_cpus=args.threads + 1,
        include_dashboard=False,
        namespace="lumos-long",
        log_to_driver=False,
        configure_logging=False,
    )
    ns = f"lumos-long-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.TemporaryDirectory(prefix="lumos-long-")
    try:
        cfg = ServeConfig(
            namespace=ns,
            store_url=f"sqlite:///{tmp.name}/lumos.db",
            model=None if args.model == "bundled" else args.model,
            workers=1,
            worker_resources={"num_cpus": args.threads},
            max_batch=1,
            session_idle_s=600.0,
            limits=Limits(max_frames_per_request=args.chunk),
            compile=args.compile,
        )
        server = Server(cfg, ws_ping_interval=None)
        server.namespace = ns
        try:
            return asyncio.run(_stack_session(server, args, args.points))
        finally:
            server.stop()
            _kill_workers(ns)
    finally:
        ray.shutdown()
        tmp.cleanup()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled", help="bundled, a folder, or random[:preset]")
    p.add_argument("--prompt", default="a red bag moves left")
    p.add_argument("--points", default="16,64,256,1024", help="latent frame counts")
    p.add_argument("--chunk", type=int, default=64, help="latent frames per request")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's")
    p.add_argument("--window", type=int, default=None, help="default: the model folder's")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: folder's)")
    p.add_argument("--guidance-steps", type=int, default=None, help="CFG steps (folder's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", default="auto", help="compile the frame steps: auto, on, off")
    p.add_argument("--engine-only", action="store_true")
    p.add_argument("--stack-only", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a frame may take")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.points = sorted(int(x) for x in args.points.split(","))
    torch.set_num_threads(args.threads)

    from lumos.pipeline import Pipeline

    pipe = Pipeline.from_folder(None if args.model == "bundled" else args.model)
    if not args.stack_only:
        t0 = time.perf_counter()
        pipe.compiled(args.compile)
        compile_s = time.perf_counter() - t0
    pipe.set_sampling(
        window=args.window, window_stride=args.stride, guidance_steps=args.guidance_steps
    )
    sc = pipe.sampler_config(args.steps, args.cfg)
    res: dict = {
        "device": f"cpu ({platform.machine()}, {args.threads} threads)",
        "model": args.model,
        "steps": sc.steps,
        "cfg": sc.cfg,
        "window": sc.window,
        "window_stride": sc.window_stride,
        "guidance_steps": sc.guidance_steps,
        "chunk": args.chunk,
        "dtype": str(next(pipe.model.parameters()).dtype).removeprefix("torch."),
        "compile": args.compile,
    }
    if not args.stack_only:
        eng = run_engine(args, pipe)
        eng["compiled"] = pipe.model.compiled is not None
        eng["compile_seconds"] = compile_s
        res["engine"] = eng
    if not args.engine_only:
        if args.window is not None or args.stride is not None or args.guidance_steps:
            print("  note: the stack runs with the model folder's window settings")
        res["stack"] = run_stack(args)
    flat = {k: v for k, v in res.items() if not isinstance(v, dict)}
    for part in ("engine", "stack"):
        if part not in res:
            continue
        r = res[part]
        first, last = str(args.points[0]), str(args.points[-1])
        for q in args.points:
            flat[f"{part}_ms_per_frame@{q}"] = r["ms_per_frame"][str(q)]
        for q in args.points if "cpu_ms_per_frame" in r else []:
            flat[f"{part}_cpu_ms_per_frame@{q}"] = r["cpu_ms_per_frame"][str(q)]
        for q in args.points:
            flat[f"{part}_rss_mib@{q}"] = r["rss_bytes"][str(q)] / 2**20
        for q in args.points:
            flat[f"{part}_kv_mib@{q}"] = r["kv_bytes"][str(q)] / 2**20
        flat[f"{part}_ratio_{last}_vs_{first}"] = r["ms_per_frame"][last] / r["ms_per_frame"][first]
    print()
    emit(flat, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res | {"table": flat}, f, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
