"""Session hosts, grains, supervision and placement on a real local Ray (one node).

One Ray instance for the module (address="local": random ports, never 6379) with one supervised
worker serving the random tiny model. Each test opens its own SQLite file, so it gets its own
session hosts (their names carry the store) with the idle timeout it needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import httpx
import pytest
import ray
import torch

from clustering import assert_complete, collect, wait_for
from lumos.cluster import LumosClient, NoWorkersError, ServeConfig, runtime
from lumos.cluster.host import shard_of
from lumos.cluster.placement import LOAD_TIMEOUT_S, WorkerView, choose, rank
from serving import Server

torch.set_num_threads(1)

RUN = uuid.uuid4().hex[:10]
NAMESPACE = f"lumos-hosts-{RUN}"


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.pop("RAY_GCS_SERVER_PORT", None)
    ray.init(
        address="local",
        num_cpus=3,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def cfg(ray_cluster, tmp_path):
    def make(**kw) -> ServeConfig:
        base = dict(
            namespace=NAMESPACE,
            store_url=f"sqlite:///{tmp_path / 'lumos.db'}",
            model="random:tiny",
            workers=1,
            worker_resources={"num_cpus": 1},
            session_idle_s=60.0,
            session_hosts=2,
        )
        base.update(kw)
        return ServeConfig(**base)

    return make


def run(coro):
    return asyncio.run(coro)


async def worker_load(client: LumosClient) -> dict:
    (name,) = runtime.list_workers(NAMESPACE)
    return await ray.get_actor(name, namespace=NAMESPACE).load.remote()


# -- placement (pure) -----------------------------------------------------------------------------


def test_placement_ranks_by_fill_then_kv_and_keeps_affinity():
    def load(sessions, waiting=0, kv=0, capacity=4):
        # `sessions` already includes `waiting` (Worker.load): ranking must not add it again
        return {"sessions": sessions, "waiting": waiting, "kv_bytes": kv, "capacity": capacity}

    loads = {"a": load(2, waiting=2), "b": load(3), "c": load(2, kv=10)}
    assert rank(loads, "s") == ["a", "c", "b"]  # a: 2/4 (waiting not counted twice), kv 0
    assert choose(loads, "s") == "a"
    # capacity: a full worker ranks after every worker with room, whatever its numbers
    loads = {"big": load(7, capacity=8), "full": load(1, capacity=1)}
    assert rank(loads, "s") == ["big", "full"]
    # affinity: the preferred worker keeps the session while it has room ...
    loads = {"a": load(3), "b": load(0)}
    assert choose(loads, "s", preferred="a") == "a"
    # ... and loses it when it is full and another one has room, or when it is gone
    loads = {"a": load(4), "b": load(0)}
    assert choose(loads, "s", preferred="a") == "b"
    assert choose({"b": load(1)}, "s", preferred="a") == "b"
    full = {"a": load(4), "b": load(4)}
    assert choose(full, "s", preferred="b") == "b"  # everyone full: stay where the cache is
    assert choose({}, "s") is None
    # ties spread over the workers by a hash of (session, worker)
    even = {f"w{i}": load(0) for i in range(4)}
    picks = {choose(even, f"session-{i}") for i in range(64)}
    assert picks == set(even)
    # among equals a host takes a worker on its own node: two hosts placing at once on idle
    # workers (neither sees the other's placement yet) do not pile onto one hashed worker
    nodes = {"w0": {**load(0), "node": "n0"}, "w1": {**load(0), "node": "n1"}}
    for i in range(16):
        assert choose(nodes, f"session-{i}", node="n0") == "w0"
        assert choose(nodes, f"session-{i}", node="n1") == "w1"
    busier = {"w0": {**load(1), "node": "n0"}, "w1": {**load(0), "node": "n1"}}
    assert choose(busier, "s", node="n0") == "w1"  # locality never beats load


def test_a_placement_reads_loads_taken_after_it_and_a_busy_worker_is_not_dropped(cfg):
    """Two hosts place one after the other: the second sees the first's session in the worker's
    load at once (no cached view); a worker too busy to answer load() keeps its last load."""

    async def body():
        client = await LumosClient.start(cfg())
        try:
            (name,) = runtime.list_workers(NAMESPACE)
            other_host = WorkerView(NAMESPACE)
            assert (await other_host.refresh())[name]["sessions"] == 0
            st, _ = await client.create_session("a coat", 64, steps=20, seed=1)  # on its host
            picked = await other_host.pick("another session", None)  # at once, from elsewhere
            assert picked is not None and picked[0] == name
            # the worker's own count (the first session) plus this placement
            assert other_host.loads[name]["sessions"] == 2, other_host.loads[name]

            pid = (await ray.get_actor(name, namespace=NAMESPACE).info.remote())["pid"]
            os.kill(pid, signal.SIGSTOP)  # the worker is busy: load() does not answer
            try:
                t0 = time.monotonic()
                loads = await other_host.refresh()
                assert time.monotonic() - t0 >= LOAD_TIMEOUT_S  # it did not answer ...
                assert loads[name]["sessions"] == 2  # ... and still counts, with its last load
            finally:
                os.kill(pid, signal.SIGCONT)
            await client.cancel(st["id"])
        finally:
            await client.close()

    run(body())


# -- KV release, idle deactivation with an open subscriber ---------------------------------------


def test_delete_and_deactivation_free_the_kv_cache_and_subscribers_do_not_pin(cfg):
    async def body():
        client = await LumosClient.start(cfg(session_idle_s=1.0))
        try:
            st, _ = await client.create_session("a coat", 2, steps=2, cfg_scale=2.0, seed=1)
            sid = st["id"]
            await collect(client.subscribe(sid))
            cached = await worker_load(client)
            assert cached["kv_bytes"] > 0 and cached["cached_sessions"] >= 1

            # an open, following subscriber (a WebSocket) must not keep the grain active
            live: list[dict] = []

            async def follow():
                async for frame in client.subscribe(sid, from_seq=2, follow=True):
                    live.append(frame)

            follower = asyncio.get_running_loop().create_task(follow())

            async def deactivated():
                return sid not in await client.host(sid).active.remote()

            await wait_for(deactivated, timeout_s=20)
            assert not follower.done()
            freed = await worker_load(client)
            assert freed["kv_bytes"] < cached["kv_bytes"]
            assert freed["cached_sessions"] == cached["cached_sessions"] - 1

            # the next call re-activates it from the store; the open subscriber gets the frames
            await client.extend(sid, 2, "a coat turns")
            assert not await deactivated()

            async def two():
                return len(live) >= 2

            await wait_for(two, timeout_s=60)
            assert [f["seq"] for f in live] == [2, 3]
            assert (await client.state(sid))["status"] == "done"
            before = await worker_load(client)
            assert before["kv_bytes"] > 0
            await client.delete_session(sid)  # frees the cache at once
            after = await worker_load(client)
            assert after["kv_bytes"] < before["kv_bytes"]
            assert after["cached_sessions"] == before["cached_sessions"] - 1
            await asyncio.wait_for(follower, 30)  # the subscriber ends: the session is gone
            assert [f["seq"] for f in live] == [2, 3]
            stats = await client.host(sid).stats.remote()
            assert stats["subscribed"] == 0 and stats["events"] == 0  # nothing left behind
        finally:
            await client.close()

    run(body())


# -- one activation for two API processes ---------------------------------------------------------

OTHER_API = textwrap.dedent(
    """
    import asyncio, json, sys
    from lumos.cluster import LumosClient, ServeConfig

    address, namespace, store, sid = sys.argv[1:5]

    async def main():
        cfg = ServeConfig(ray_address=address, namespace=namespace, store_url=store, workers=0)
        client = await LumosClient.start(cfg)
        print("ready", flush=True)
        sys.stdin.readline()
        await client.cancel(sid)  # a call that activates the grain (it is inactive now)
        print("called", flush=True)
        sys.stdin.readline()
        try:
            await client.extend(sid, 3)
            outcome = "extended"
        except ValueError as e:
            outcome = "refused: " + str(e)
        while True:  # a refusal may come before the other extend has queued the session
            state = await client.state(sid)
            if state["n_frames"] == 4 and state["status"] == "done":
                break
            await asyncio.sleep(0.1)
        frames = []
        async for f in client.subscribe(sid):
            frames.append([f["seq"], f["pixels"].hex()])
        print(json.dumps({"outcome": outcome, "frames": frames}), flush=True)
        await client.close()

    asyncio.run(main())
    """
)


def test_two_api_processes_on_one_session_share_one_activation(cfg, ray_cluster):
    config = cfg(session_idle_s=3.0)

    async def body():
        client = await LumosClient.start(config)
        try:
            st, _ = await client.create_session("a bag", 1, steps=2, cfg_scale=2.0, seed=2)
            sid = st["id"]
            await collect(client.subscribe(sid))

            async def inactive():
                return sid not in await client.host(sid).active.remote()

            other = subprocess.Popen(
                [sys.executable, "-c", OTHER_API, ray_cluster, NAMESPACE, config.store_url, sid],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert other.stdout.readline().strip() == "ready"
                host = client.host(sid)
                await wait_for(inactive, timeout_s=30)
                before = sum(h["activations"] for h in await client.hosts())
                other.stdin.write("go\n")  # both processes call the inactive session at once
                other.stdin.flush()
                await client.cancel(sid)
                line = await asyncio.to_thread(other.stdout.readline)
                assert line.strip() == "called"
                after = sum(h["activations"] for h in await client.hosts())
                assert after == before + 1  # one activation for the two calls, cluster-wide
                other.stdin.write("go\n")  # and both extend it at once
                other.stdin.flush()
                try:
                    await client.extend(sid, 3)
                    mine = "extended"
                except ValueError as e:
                    mine = f"refused: {e}"

                async def done():
                    state = await client.state(sid)
                    return state["n_frames"] == 4 and state["status"] == "done"

                await wait_for(done, timeout_s=120)
                got = await collect(client.subscribe(sid))
                out, _ = await asyncio.to_thread(other.communicate, timeout=120)
            finally:
                if other.poll() is None:
                    other.kill()
            theirs = json.loads(out.strip().splitlines()[-1])
            outcomes = sorted([mine, theirs["outcome"]])
            # one grain: exactly one extend starts the frames, the other sees it generating
            assert outcomes[0] == "extended" and outcomes[1].startswith("refused"), outcomes
            assert "already generating" in outcomes[1]
            await assert_complete(client, sid, 4, got)
            assert theirs["frames"] == [[f["seq"], f["pixels"].hex()] for f in got]
            assert shard_of(sid, 2) == (await host.stats.remote())["index"]
        finally:
            await client.close()

    run(body())


# -- supervision ----------------------------------------------------------------------------------


def test_worker_process_killed_is_restarted_and_the_generation_resumes(cfg):
    config = cfg()

    async def body():
        client = await LumosClient.start(config)
        try:
            (name,) = runtime.list_workers(NAMESPACE)
            info = await ray.get_actor(name, namespace=NAMESPACE).info.remote()
            n = 10
            st, _ = await client.create_session("a dress", n, steps=30, cfg_scale=2.0, seed=7)
            sid = st["id"]
            killed_at: list[float] = []
            arrived: list[float] = []

            async def kill_second(frame, got):
                arrived.append(time.monotonic())
                if len(got) == 2:
                    os.kill(info["pid"], signal.SIGKILL)
                    killed_at.append(time.monotonic())

            got = await collect(client.subscribe(sid), kill_second)
            assert killed_at
            await assert_complete(client, sid, n, got)
            resumed = arrived[2] - killed_at[0]  # kill -> the next frame, from the new process
            assert got[2]["meta"]["worker"] == name

            async def back():
                return (await client.health())["status"] == "ok"

            await wait_for(back, timeout_s=30)
            new = await ray.get_actor(name, namespace=NAMESPACE).info.remote()
            assert new["pid"] != info["pid"] and new["name"] == name  # restarted in place
            await client.refresh_workers()  # the client's view follows the restart (review 9)
            assert [w["pid"] for w in client.workers()] == [new["pid"]]
            print(f"worker killed: the next frame came {resumed:.1f} s later (restart + prefill)")
        finally:
            await client.close()

    run(body())


def test_session_host_killed_mid_session_loses_nothing(cfg):
    config = cfg()

    async def body():
        client = await LumosClient.start(config)
        try:
            n = 8
            st, _ = await client.create_session("a scarf", n, steps=30, cfg_scale=2.0, seed=9)
            sid = st["id"]
            before = await client.host(sid).stats.remote()
            killed: list[int] = []

            async def kill_host(frame, got):
                if len(got) == 2:
                    os.kill(before["pid"], signal.SIGKILL)
                    killed.append(before["pid"])

            got = await collect(client.subscribe(sid), kill_host)
            assert killed
            await assert_complete(client, sid, n, got)
            after = await client.host(sid).stats.remote()
            assert after["pid"] != before["pid"]  # a new host process re-activated the session
            assert after["activations"] >= 1
        finally:
            await client.close()

    run(body())


# -- no live worker -------------------------------------------------------------------------------


def test_no_live_worker_health_503_and_create_503(cfg):
    lonely = cfg(namespace=f"{NAMESPACE}-empty", workers=0)

    async def body():
        client = await LumosClient.start(lonely)
        try:
            health = await client.health()
            assert health["status"] == "unavailable" and "no live worker" in health["reason"]
            with pytest.raises(NoWorkersError, match="no live worker"):
                await client.create_session("a hat", 1)
        finally:
            await client.close()

    run(body())
    server = Server(lonely)
    try:
        url = f"http://127.0.0.1:{server.port}"
        r = httpx.get(f"{url}/api/health", timeout=30)
        assert r.status_code == 503 and "no live worker" in r.json()["reason"], r.text
        r = httpx.post(
            f"{url}/api/sessions", json={"prompt": "a hat", "frames": 1, "steps": 1}, timeout=30
        )
        assert r.status_code == 503 and "no live worker" in r.json()["error"], r.text
    finally:
        server.stop()


# -- many idle sessions: 1,000 (the count; LUMOS_TEST_SESSIONS=N for another), and in the
# benchmark (benchmarks/serve.py --idle-sessions 1000: RSS and create latency)


def test_many_one_frame_sessions_live_as_grains_in_two_hosts_all_reachable(cfg):
    from lumos.cluster.limits import Limits

    n = int(os.environ.get("LUMOS_TEST_SESSIONS", "1000"))
    limits = Limits(max_sessions=n, max_sessions_per_owner=n, max_stored_sessions_per_owner=n)

    async def body():
        # idle sessions deactivate after session_idle_s: keep every grain active for longer than
        # making them all takes (over 60 s on a slow 2-core host: 983 of 1,000 were still active)
        client = await LumosClient.start(cfg(limits=limits, session_idle_s=3600.0))
        try:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> tuple[str, list[dict]]:
                async with sem:
                    st, _ = await client.create_session("a bag", 1, steps=1, seed=i, owner="o")
                    return st["id"], await collect(client.subscribe(st["id"]))

            made = await asyncio.gather(*(one(i) for i in range(n)))
            assert len({sid for sid, _ in made}) == n
            for sid, got in made:
                await assert_complete(client, sid, 1, got)
            stats = await client.hosts()
            assert len(stats) == 2 and sum(s["active"] for s in stats) == n  # grains, 2 processes
            placed = {shard_of(sid, 2) for sid, _ in made}
            assert placed == {0, 1}
        finally:
            await client.close()

    run(body())


def test_an_open_websocket_does_not_keep_its_session_active(cfg):
    from websockets.sync.client import connect as ws_connect

    config = cfg(session_idle_s=1.0)
    server = Server(config, ws_ping_interval=None)
    http = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60)
    try:
        r = http.post("/api/sessions", json={"prompt": "a coat", "frames": 2, "steps": 2})
        assert r.status_code == 201, r.text
        sid, token = r.json()["id"], r.json()["token"]
        hosts = [
            ray.get_actor(runtime.host_name(config.store_url, i), namespace=NAMESPACE)
            for i in range(2)
        ]
        host = hosts[shard_of(sid, 2)]
        url = f"ws://127.0.0.1:{server.port}/api/sessions/{sid}/stream?from=0"
        with ws_connect(url, open_timeout=30) as ws:
            ws.send(json.dumps({"type": "auth", "token": token}))

            def frames(n: int) -> list[int]:
                seqs = []
                while len(seqs) < n:
                    msg = json.loads(ws.recv(timeout=120))
                    assert msg["type"] != "error", msg
                    if msg["type"] == "frame":
                        seqs.append(msg["seq"])
                return seqs

            assert frames(2) == [0, 1]
            deadline = time.monotonic() + 30
            while sid in ray.get(host.active.remote()):  # deactivates, the socket still open
                assert time.monotonic() < deadline, "an open WebSocket kept the session active"
                time.sleep(0.2)
            r = http.post(
                f"/api/sessions/{sid}/extend",
                json={"frames": 2},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 202, r.text
            assert frames(2) == [2, 3]  # re-activated on the next call; the same socket follows
    finally:
        http.close()
        server.stop()


def test_cli_refuses_bad_cluster_flags(capsys):
    from lumos.cluster.serve import build_config, worker_main

    assert build_config(["--session-hosts", "3"]).session_hosts == 3
    for argv, words in (
        (["--session-hosts", "0"], "session_hosts must be >= 1"),
        (["--workers", "-1"], "workers must be >= 0"),
    ):
        with pytest.raises(SystemExit):
            build_config(argv)
        assert words in capsys.readouterr().err
    for bad in ("[1]", '{"lumos_gpu": 0}', "not json"):
        with pytest.raises(SystemExit):
            worker_main(["--resources", bad])
        assert "--resources must be a JSON object of positive numbers" in capsys.readouterr().err
