"""Cluster layer on a real local Ray: session hosts and grains, workers, the store, the client.

One Ray instance per module (random ports; never 6379, which is the Redis below), SQLite in a
temporary file and Redis at 127.0.0.1:6379/15 under a per-run key prefix, the random tiny model
and 2-step sampling unless a test needs frames slow enough to act in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import numpy as np
import pytest
import ray
import redis
import torch
from PIL import Image

from clustering import assert_complete, collect, wait_for
from lumos.cluster import (
    LimitExceeded,
    Limits,
    LumosClient,
    ServeConfig,
    SessionNotFoundError,
    runtime,
)

torch.set_num_threads(1)

RUN = uuid.uuid4().hex[:10]
NAMESPACE = f"lumos-test-{RUN}"
REDIS_BASE = "redis://127.0.0.1:6379/15"
REDIS_PREFIX = f"lumos-test-{RUN}"
REDIS_URL = f"{REDIS_BASE}?prefix={REDIS_PREFIX}"
TIMINGS: dict[str, list[float]] = {}


def _ray_init() -> None:
    ray.init(
        address="local",  # a new instance even where other Ray clusters run on this machine
        num_cpus=4,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
        configure_logging=False,
    )


class Cluster:
    def __init__(self, sqlite_url: str) -> None:
        self.sqlite_url = sqlite_url
        self.redis_url = REDIS_URL

    def cfg(self, store: str = "sqlite", **kw) -> ServeConfig:
        url = self.sqlite_url if store == "sqlite" else self.redis_url
        base = dict(
            namespace=NAMESPACE,
            store_url=url,
            model="random:tiny",
            workers=2,
            worker_resources={"num_cpus": 1},
            session_idle_s=60.0,
        )
        base.update(kw)
        return ServeConfig(**base)

    def restart(self) -> None:
        """Stop everything (every actor dies with the cluster) and start a fresh Ray."""
        ray.shutdown()
        _ray_init()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.fail("needs the Redis server at 127.0.0.1:6379: start it (bash scripts/services)")
    _ray_init()
    db = tmp_path_factory.mktemp("cluster") / "lumos.db"
    yield Cluster(f"sqlite:///{db}")
    ray.shutdown()
    r = redis.Redis.from_url(REDIS_BASE)
    keys = list(r.scan_iter(match=f"{REDIS_PREFIX}:*", count=1000))
    if keys:
        r.delete(*keys)
    for name, values in TIMINGS.items():
        print(f"{name}: median {np.median(values) * 1000:.0f} ms over {len(values)}")


def run(coro):
    return asyncio.run(coro)


def png(h: int = 80, w: int = 100, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


async def ensure_workers(cfg: ServeConfig) -> None:
    """Recreate missing local workers (after a test killed one) and wait until they answer."""
    handles = runtime.start_local_workers(cfg)
    await asyncio.gather(*(h.info.remote() for h in handles))


# -- 1. many sessions at once ---------------------------------------------------------------------


def test_eight_sessions_at_once_get_exactly_their_frames(cluster):
    owner = f"owner-{uuid.uuid4().hex}"

    async def body():
        client = await LumosClient.start(cluster.cfg("redis"))
        try:
            frames = [3, 4, 5, 3, 4, 5, 3, 4]
            t0 = time.monotonic()
            created = await asyncio.gather(
                *(
                    client.create_session(
                        f"a shirt moves left {i}",
                        n,
                        steps=2,
                        cfg_scale=3.0,
                        seed=i,
                        image_png=png() if i == 0 else None,
                        owner=owner,
                    )
                    for i, n in enumerate(frames)
                )
            )
            first: dict[str, float] = {}

            async def stamp(frame, got, sid):
                first.setdefault(sid, time.monotonic() - t0)

            streams = await asyncio.gather(
                *(
                    collect(
                        client.subscribe(st["id"]),
                        lambda f, g, sid=st["id"]: stamp(f, g, sid),
                    )
                    for st, _ in created
                )
            )
            TIMINGS.setdefault("8 sessions: create -> first frame", []).extend(first.values())
            for i, ((st, token), got) in enumerate(zip(created, streams)):
                n = frames[i] + (1 if i == 0 else 0)
                assert st["target"] == n and token and len(token) >= 32
                await assert_complete(client, st["id"], n, got)
                sources = [f["meta"]["source"] for f in got]
                assert sources == (["image"] if i == 0 else []) + ["generated"] * frames[i]
                assert all(tuple(f["shape"]) == (8, 8) for f in got)
            # a second subscriber after the fact reads the same frames from the store
            again = await collect(client.subscribe(created[3][0]["id"]))
            assert [f["pixels"] for f in again] == [f["pixels"] for f in streams[3]]
            listed = await client.list_sessions(owner)
            assert sorted(s["id"] for s in listed) == sorted(st["id"] for st, _ in created)
            chunks = [c async for c in client.video_mp4(created[0][0]["id"], page=2)]
            assert b"".join(chunks)[4:8] == b"ftyp"  # (a short clip leaves the encoder at once)
            assert len(client.workers()) == 2
            placed = [(await client.state(st["id"]))["worker"] for st, _ in created]
            print("placement of 8 sessions:", {w: placed.count(w) for w in set(placed)})
        finally:
            await client.close()

    run(body())


# -- 4. subscribe from k mid-generation -----------------------------------------------------------


def test_subscribe_from_k_mid_generation_gets_k_on_exactly_once(cluster):
    async def body():
        client = await LumosClient.start(cluster.cfg("redis"))
        try:
            n, k = 12, 2
            st, _ = await client.create_session("a bag", n, steps=30, cfg_scale=3.0, seed=3)
            sid = st["id"]

            async def enough():
                s = await client.state(sid)
                return s if s["n_frames"] >= k + 2 else None

            at = (await wait_for(enough))["n_frames"]
            late, full = await asyncio.gather(
                collect(client.subscribe(sid, from_seq=k)), collect(client.subscribe(sid))
            )
            assert at < n, "the subscription must start while frames are still coming"
            assert [f["seq"] for f in late] == list(range(k, n))
            await assert_complete(client, sid, n, full)
            assert [f["pixels"] for f in late] == [f["pixels"] for f in full[k:]]
            # from_seq at or past the end of an idle session: nothing, and it ends
            assert await collect(client.subscribe(sid, from_seq=n)) == []
        finally:
            await client.close()

    run(body())


# -- 5. tokens and limits -------------------------------------------------------------------------


def test_verify_tokens_and_limits(cluster):
    limits = Limits(max_frames_per_session=10, max_sessions=1, max_image_bytes=20_000)

    async def body():
        client = await LumosClient.start(cluster.cfg("sqlite", limits=limits))
        try:
            st, token = await client.create_session("a shoe", 2, steps=20, cfg_scale=2.0, seed=0)
            sid = st["id"]
            assert await client.verify(sid, token)
            assert not await client.verify(sid, token + "x")
            assert not await client.verify(sid, "")
            assert not await client.verify("no-such-session", token)
            meta = await client.store.get_session(sid)
            assert token not in repr(meta) and meta.token_hash != token
            await collect(client.subscribe(sid))

            bad = [
                (dict(prompt="x" * 501), "501 characters"),
                (dict(prompt="  "), "must not be empty"),
                (dict(frames=0), "between 1 and 64"),
                (dict(frames=65), "between 1 and 64"),
                (dict(frames=11), "at most 10 frames"),
                (dict(frames=10, image_png=png()), "at most 10 frames"),
                (dict(steps=0), "steps must be an integer between 1 and 100"),
                (dict(steps=101), "between 1 and 100"),
                (dict(cfg_scale=-0.5), "cfg_scale must be a number between 0.0 and 30.0"),
                (dict(cfg_scale=31.0), "between 0.0 and 30.0"),
                (dict(seed=-1), "seed must be"),
                (dict(image_png=png(200, 200, 1)), "the limit is 20000 bytes"),
                (dict(image_png=b"not an image"), "not a decodable"),
            ]
            for kw, message in bad:
                args = dict(prompt="ok", frames=2, steps=2, cfg_scale=1.0, seed=None)
                args.update(kw)
                with pytest.raises(ValueError, match=message):
                    await client.create_session(**args)

            with pytest.raises(ValueError, match="it has 2 and 9 more"):
                await client.extend(sid, 9)
            with pytest.raises(ValueError, match="501 characters"):
                await client.extend(sid, 1, "y" * 501)
            with pytest.raises(SessionNotFoundError):
                await client.extend("no-such-session", 1)
            with pytest.raises(KeyError):
                await client.state("no-such-session")

            await client.extend(sid, 8, "a slow shoe")
            with pytest.raises(ValueError, match="already generating"):
                await client.extend(sid, 1)
            got = await collect(client.subscribe(sid))
            await assert_complete(client, sid, 10, got)
            assert (await client.state(sid))["prompts"] == [[0, "a shoe"], [2, "a slow shoe"]]
            assert {f["meta"]["prompt"] for f in got[2:]} == {1}

            # max_sessions = 1 and a session is generating slowly: a new one is refused
            slow, _ = await client.create_session("slow", 8, steps=40, cfg_scale=1.0, seed=1)

            async def started():
                return (await client.state(slow["id"]))["n_frames"] >= 1

            await wait_for(started)
            with pytest.raises(LimitExceeded, match="too many sessions"):
                await client.create_session("one more", 1, steps=2)
            cancelled = await client.cancel(slow["id"])
            assert cancelled["status"] == "done" and cancelled["n_frames"] < 8
            stored = await client.frames(slow["id"])
            assert [r.seq for r in stored] == list(range(cancelled["n_frames"]))
            await client.delete_session(slow["id"])
            with pytest.raises(SessionNotFoundError):
                await client.state(slow["id"])
            assert slow["id"] not in await client.host(slow["id"]).active.remote()
            assert await client.frames(sid, 8) and not await client.verify(slow["id"], "x")
        finally:
            await client.close()

    run(body())


# -- 6. idle deactivation and reactivation --------------------------------------------------------


def test_idle_session_deactivates_and_reactivates_from_the_store(cluster):
    async def body():
        # its own store: session hosts (named by store) keep the idle timeout they started with
        idle = cluster.cfg("sqlite", session_idle_s=1.0, store_url=cluster.sqlite_url + ".idle")
        client = await LumosClient.start(idle)
        try:
            st, _ = await client.create_session("a coat", 3, steps=2, cfg_scale=2.0, seed=5)
            sid = st["id"]
            before = await collect(client.subscribe(sid))

            async def gone():  # the grain is deactivated (its host stays)
                return sid not in await client.host(sid).active.remote()

            await wait_for(gone, timeout_s=20)
            state = await client.state(sid)  # from the store: does not reactivate
            assert state["status"] == "done" and state["n_frames"] == 3
            assert await gone()
            await client.extend(sid, 2, "a coat turns")
            assert not await gone()
            after = await collect(client.subscribe(sid))
            await assert_complete(client, sid, 5, after)
            assert [f["pixels"] for f in after[:3]] == [f["pixels"] for f in before]
            assert (await client.state(sid))["prompts"] == [[0, "a coat"], [3, "a coat turns"]]
            await wait_for(gone, timeout_s=20)  # and it goes idle again
        finally:
            await client.close()

    run(body())


# -- 2. a worker dies mid-stream ------------------------------------------------------------------


def test_worker_killed_mid_session_continues_on_the_other(cluster):
    cfg = cluster.cfg("sqlite")

    async def body():
        client = await LumosClient.start(cfg)
        try:
            await ensure_workers(cfg)
            n = 16
            st, _ = await client.create_session("a dress", n, steps=40, cfg_scale=2.0, seed=7)
            sid = st["id"]
            killed: list[str] = []

            async def kill_third(frame, got):
                if len(got) == 3:
                    name = (await client.state(sid))["worker"]
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
                    killed.append(name)

            got = await collect(client.subscribe(sid), kill_third)
            assert killed
            await assert_complete(client, sid, n, got)
            workers = [f["meta"]["worker"] for f in got]
            assert workers[0] == killed[0]
            assert workers[-1] != killed[0]
            assert (await client.state(sid))["worker"] != killed[0]
        finally:
            await ensure_workers(cfg)
            await client.close()

    run(body())


# -- 3. restart everything against the same store -------------------------------------------------


def test_restart_cluster_and_continue_sessions(cluster):
    async def phase1():
        sq = await LumosClient.start(cluster.cfg("sqlite"))
        rd = await LumosClient.start(cluster.cfg("redis"))
        try:
            a, _ = await sq.create_session("a hat", 4, steps=2, cfg_scale=2.0, seed=11)
            b, _ = await rd.create_session("a sock", 3, steps=2, cfg_scale=2.0, seed=12)
            fa = await collect(sq.subscribe(a["id"]))
            fb = await collect(rd.subscribe(b["id"]))
            for f, rec in zip(fa, await sq.frames(a["id"])):
                f["tokens"] = rec.tokens
            # c is cut off mid-generation by the shutdown
            c, _ = await sq.create_session("a scarf", 8, steps=20, cfg_scale=2.0, seed=13)

            async def some():
                return (await sq.state(c["id"]))["n_frames"] >= 2

            await wait_for(some)
            return a["id"], b["id"], c["id"], fa, fb
        finally:
            await sq.close()
            await rd.close()

    a, b, c, fa, fb = run(phase1())
    cluster.restart()
    assert runtime.list_workers(NAMESPACE) == []

    async def phase2():
        sq = await LumosClient.start(cluster.cfg("sqlite"))
        rd = await LumosClient.start(cluster.cfg("redis"))
        try:
            assert len(sq.workers()) == 2
            t0 = time.monotonic()
            await sq.extend(a, 3, "a hat spins")
            ga = await collect(sq.subscribe(a))
            TIMINGS.setdefault("cold continuation: extend -> all 3 frames", []).append(
                time.monotonic() - t0
            )
            await assert_complete(sq, a, 7, ga)
            assert [f["pixels"] for f in ga[:4]] == [f["pixels"] for f in fa]
            stored = await sq.frames(a)
            assert [r.tokens for r in stored[:4]] == [f["tokens"] for f in fa]
            assert [r.meta.get("prompt") for r in stored] == [0, 0, 0, 0, 1, 1, 1]

            await rd.extend(b, 2)
            gb = await collect(rd.subscribe(b))
            await assert_complete(rd, b, 5, gb)
            assert [f["pixels"] for f in gb[:3]] == [f["pixels"] for f in fb]

            # the interrupted session resumes up to its target when it is next touched
            gc = await collect(sq.subscribe(c))
            await assert_complete(sq, c, 8, gc)
        finally:
            await sq.close()
            await rd.close()

    run(phase2())


# -- without Ray: a temporal tokenizer's latent frame is a strip of RGB frames --------------------


def test_worker_decodes_temporal_latents_to_png_strips_and_mp4():
    from dataclasses import replace

    from lumos.cluster.client import encode_records
    from lumos.cluster.worker import Worker
    from lumos.engine import FrameEvent
    from lumos.store import FrameRecord
    from lumos.tokenizers import FSQVideoTokenizer
    from lumos.tokenizers.video_fsq import FSQTokenizerConfig
    from lumos.video import Mp4Writer, decode_png, encode_png, split_grid

    worker = Worker(model="random:tiny", threads=1)
    try:
        cfg = replace(FSQTokenizerConfig.preset("fmnist64"), temporal=4, temporal_kernel=3)
        worker.pipe.visual = FSQVideoTokenizer(cfg).eval()
        rng = np.random.default_rng(0)
        given = rng.integers(0, 1000, (2, 8, 8)).astype(np.int32)  # [t0, h, w]
        worker._decoders["s"] = worker._decoder(torch.from_numpy(given).long())
        records = []
        for seq in range(2):
            codes = torch.from_numpy(rng.integers(0, 1000, (8, 8))).long()
            (rgb,) = worker._pixels([FrameEvent("s", seq, codes, False)])
            n = int(rgb.shape[0])
            assert n == 4 and rgb.dtype == torch.uint8
            pixels = encode_png(rgb.numpy())
            strip = decode_png(pixels)
            assert strip.shape == (64, 256, 3)
            frames = split_grid(strip, n)
            assert len(frames) == 4 and all(f.shape == (64, 64, 3) for f in frames)
            assert np.array_equal(frames[2], strip[:, 128:192])
            meta = {"rgb_frames": n}
            records.append(FrameRecord("s", seq, codes.numpy().tobytes(), (8, 8), pixels, meta))
        writer = Mp4Writer(8)
        mp4 = encode_records(writer, records) + writer.close()
        assert mp4[4:8] == b"ftyp" and writer.frames == 8  # 2 latents x 4 RGB frames
        enc = worker._encode_image(png(80, 100))
        assert enc["codes"].shape == (8, 8) and decode_png(enc["pixels"]).shape == (64, 64, 3)
    finally:
        asyncio.run(worker.stop())
