"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): placement, a node lost.

A head node (the API, the driver) and two worker nodes, each advertising one `lumos_gpu` (the
custom resource standing for its GPU) and holding one supervised worker pinned to it, as
`lumos worker --resources '{"lumos_gpu": 1}'` does. The API is `create_app` served by uvicorn in
this process, with no local workers (`lumos serve --workers 0`); subscribers are WebSockets.
Three losses mid-generation, in this order: node a's worker process, both session hosts, the
whole of node a; each time every session ends with frames 0..n-1 exactly once, in order.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster
from websockets.sync.client import connect as ws_connect

from lumos.cluster import ServeConfig, runtime
from serving import Server

RUN = uuid.uuid4().hex[:10]
NAMESPACE = f"lumos-nodes-{RUN}"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    os.environ.pop("RAY_GCS_SERVER_PORT", None)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    workers = {}
    for key in ("a", "b"):
        node = cluster.add_node(num_cpus=1, resources={"lumos_gpu": 1})
        workers[key] = node
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    names = {}
    for key, node in workers.items():
        (handle,) = runtime.start_workers(
            NAMESPACE,
            1,
            {"num_cpus": 0, "resources": {"lumos_gpu": 1}},
            host=f"node{key}",
            node_id=node.node_id,
            model="random:tiny",
        )
        names[key] = ray.get(handle.info.remote(), timeout=300)["name"]
    cfg = ServeConfig(
        namespace=NAMESPACE,
        store_url=f"sqlite:///{tmp_path_factory.mktemp('nodes') / 'lumos.db'}",
        model="random:tiny",
        workers=0,
        session_hosts=2,
    )
    yield cluster, workers, names, cfg
    ray.shutdown()
    cluster.shutdown()


def watch(port: int, sid: str, token: str, n: int, out: list, errors: list) -> None:
    """A WebSocket subscriber: frame messages into out until n of them and the state message
    saying the session is done (errors into errors)."""
    try:
        with ws_connect(
            f"ws://127.0.0.1:{port}/api/sessions/{sid}/stream?from=0", open_timeout=30
        ) as ws:
            ws.send(json.dumps({"type": "auth", "token": token}))
            deadline, done = time.monotonic() + 300, False
            while len(out) < n or not done:
                msg = json.loads(ws.recv(timeout=max(1.0, deadline - time.monotonic())))
                if msg["type"] == "frame":
                    out.append(msg)
                elif msg["type"] == "state":
                    done = msg["status"] == "done"
                elif msg["type"] == "error":
                    raise AssertionError(msg)
    except Exception as e:
        errors.append(e)


def run_sessions_and_kill(cfg, kill) -> tuple[dict, dict]:
    """4 WebSocket sessions of 8 frames; kill(placed) once each has 2 frames; every session
    must end with frames 0..7 exactly once, in order, done and stored. Returns (placed, got)."""
    server = Server(cfg)
    http = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60)
    try:
        n, sessions = 8, []
        for i in range(4):
            r = http.post(
                "/api/sessions",
                json={"prompt": f"a shirt {i}", "frames": n, "steps": 20, "seed": i},
            )
            assert r.status_code == 201, r.text
            sessions.append((r.json()["id"], r.json()["token"]))
        got = {sid: [] for sid, _ in sessions}
        errors: list = []
        threads = [
            threading.Thread(target=watch, args=(server.port, sid, tok, n, got[sid], errors))
            for sid, tok in sessions
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 240
        while min(len(v) for v in got.values()) < 2:
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.1)

        def state(sid, tok):
            return http.get(f"/api/sessions/{sid}", headers={"Authorization": f"Bearer {tok}"})

        placed = {sid: state(sid, tok).json()["worker"] for sid, tok in sessions}
        kill(placed)
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        for sid, tok in sessions:
            assert [m["seq"] for m in got[sid]] == list(range(n)), sid  # once each, in order
            final = state(sid, tok).json()
            assert final["status"] == "done" and final["n_frames"] == n, final
            for seq in (0, n - 1):
                r = http.get(
                    f"/api/sessions/{sid}/frames/{seq}.png",
                    headers={"Authorization": f"Bearer {tok}"},
                )
                assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
        return placed, got
    finally:
        http.close()
        server.stop()


def test_a_worker_process_killed_on_one_node(nodes):
    cluster, workers, names, cfg = nodes
    handle = ray.get_actor(names["a"], namespace=NAMESPACE)
    pid = ray.get(handle.info.remote())["pid"]
    placed, _ = run_sessions_and_kill(cfg, lambda placed: os.kill(pid, signal.SIGKILL))
    assert set(placed.values()) == set(names.values()), placed  # spread over both nodes
    assert restarted_info(handle)["pid"] != pid  # restarted on its node (pinned there)


def restarted_info(handle, timeout_s: float = 120.0) -> dict:
    """The info of a worker actor that may still be restarting (Ray answers "unavailable"
    until its new process is up: under load that takes longer than the other node's work)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(handle.info.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            assert time.monotonic() < deadline, "the killed worker did not come back"
            time.sleep(0.5)


def test_a_session_host_killed(nodes):
    cluster, workers, names, cfg = nodes
    hosts = [
        ray.get_actor(runtime.host_name(cfg.store_url, i), namespace=NAMESPACE) for i in range(2)
    ]
    pids = [s["pid"] for s in ray.get([h.stats.remote() for h in hosts])]

    def kill(placed):
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # both silos: every session re-activates

    run_sessions_and_kill(cfg, kill)
    after = [s["pid"] for s in ray.get([h.stats.remote() for h in hosts])]
    assert not set(after) & set(pids)


def test_a_node_killed_mid_session_its_sessions_finish_on_the_other(nodes):
    cluster, workers, names, cfg = nodes

    def kill(placed):
        cluster.remove_node(workers["a"], allow_graceful=False)  # its raylet and workers

    placed, got = run_sessions_and_kill(cfg, kill)
    assert set(placed.values()) == set(names.values()), placed  # spread over both nodes
    lost = [sid for sid, w in placed.items() if w == names["a"]]
    for sid in lost:
        assert got[sid][-1]["meta"]["worker"] == names["b"]  # finished on the other node
    server = Server(cfg)
    try:
        health = httpx.get(f"http://127.0.0.1:{server.port}/api/health", timeout=60)
        assert health.status_code == 200 and health.json()["workers"] == 1
    finally:
        server.stop()
