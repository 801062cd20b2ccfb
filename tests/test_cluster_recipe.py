"""The README's one-machine cluster recipe, run as printed: a Ray head, two worker nodes advertising
`lumos_gpu`, one `lumos worker` each, and `lumos serve --workers 0` against Redis.

The commands are read from the README block after `<!-- recipe: one machine -->` and run by bash
with these substitutions only, for a shared machine: another Ray port (6400-6999), another Redis
database and key prefix, another API port, `--model random:tiny` for speed, and a private
`--temp-dir` on the head (so that this test stops exactly the Ray processes it started).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- recipe: one machine -->"


def recipe() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index(MARK) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def free_port(lo: int, hi: int) -> int:
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def kill_tree_of(tmp: Path) -> None:
    """Stop every process whose command line names our private Ray temp dir (our nodes)."""
    for attempt in (signal.SIGTERM, signal.SIGKILL):
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(tmp) in cmd:
                try:
                    os.kill(int(proc.name), attempt)
                except OSError:
                    pass
        time.sleep(2)


def test_readme_cluster_recipe_runs_as_printed(tmp_path):
    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/15", socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.fail("needs the Redis server at 127.0.0.1:6379: start it (bash scripts/services)")
    ray_port, api_port = free_port(6400, 6999), free_port(20000, 40000)
    prefix = f"lumos-recipe-{uuid.uuid4().hex[:8]}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="lumos-ray-", dir="/tmp"))  # socket paths: < 108 bytes
    lines = []
    for line in recipe():
        line = line.replace("6380", str(ray_port)).replace(
            "--model random ", "--model random:tiny "
        )
        line = line.replace(
            "redis://127.0.0.1:6379/0", f"'redis://127.0.0.1:6379/15?prefix={prefix}'"
        )
        if "ray start --head" in line:
            line += f" --temp-dir {ray_tmp}"
        if "lumos serve" in line:
            line += f" --port {api_port} &"
        lines.append(line)
    assert (
        sum("ray start" in x for x in lines) == 3 and sum("lumos worker" in x for x in lines) == 2
    )
    script = tmp_path / "recipe.sh"
    script.write_text("set -e\n" + "\n".join(lines) + "\nwait\n")
    log = open(tmp_path / "recipe.log", "w")
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 400
        health = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "recipe.log").read_text()[-3000:]
            try:
                health = httpx.get(f"{base}/api/health", timeout=5)
                if health.status_code == 200 and health.json()["workers"] == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert health is not None and health.json()["workers"] == 2, (
            tmp_path / "recipe.log"
        ).read_text()[-3000:]
        http = httpx.Client(base_url=base, timeout=60)
        made = []
        for i in range(2):
            r = http.post(
                "/api/sessions", json={"prompt": "a bag", "frames": 2, "steps": 2, "seed": i}
            )
            assert r.status_code == 201, r.text
            made.append((r.json()["id"], r.json()["token"]))
        workers = set()
        for sid, token in made:
            with ws_connect(f"ws://127.0.0.1:{api_port}/api/sessions/{sid}/stream?from=0") as ws:
                ws.send(json.dumps({"type": "auth", "token": token}))
                seqs = []
                while len(seqs) < 2:
                    msg = json.loads(ws.recv(timeout=120))
                    assert msg["type"] != "error", msg
                    if msg["type"] == "frame":
                        seqs.append(msg["seq"])
                        workers.add(msg["meta"]["worker"])
                assert seqs == [0, 1]
        assert len(workers) == 2  # one session on each node's worker
        http.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the script, its `lumos worker`s and `lumos serve`
                proc.wait(timeout=30)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        kill_tree_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        log.close()
        r = redis.Redis.from_url("redis://127.0.0.1:6379/15")
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
