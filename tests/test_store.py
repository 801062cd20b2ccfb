"""Contract tests of the session store, the same tests over both backends.

SQLite runs on a file in tmp_path; Redis runs for real on 127.0.0.1:6379 under a unique key prefix
per test, deleted afterwards (the Redis cases are skipped when no server answers). The store is
async; each test drives it with asyncio.run, opening and closing its store objects in that loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import struct
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

import lumos.store
from lumos.store import (
    Admission,
    AdmissionRefused,
    FrameConflict,
    FrameRecord,
    RedisStore,
    SessionBusy,
    SessionExists,
    SessionMeta,
    SessionNotFound,
    SessionStore,
    SQLiteStore,
    StoreError,
    open_store,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


REDIS_UP = _redis_up()

Opener = Callable[[], SessionStore]


@pytest.fixture(params=["sqlite", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path):
    """A factory of store objects that all see the same data (same file / same prefix)."""
    if request.param == "sqlite":
        path = tmp_path / "sessions.db"
        yield lambda: SQLiteStore(path)
        return
    if not REDIS_UP:
        pytest.fail(f"no Redis server at {REDIS_URL}: start it (bash scripts/services)")
    prefix = f"lumos-test-{uuid.uuid4().hex}"
    yield lambda: RedisStore(REDIS_URL, prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def run(opener: Opener, body: Callable[..., Awaitable[Any]], n_stores: int = 1) -> Any:
    """Open n_stores store objects, await body(*stores), close them: all in one event loop."""

    async def main() -> Any:
        stores = [opener() for _ in range(n_stores)]
        try:
            return await body(*stores)
        finally:
            for store in stores:
                await store.close()

    return asyncio.run(main())


def session(session_id: str = "s1", owner: str = "owner-a", created_at: float = 1000.5):
    return SessionMeta(
        session_id=session_id,
        token_hash="ab" * 32,
        owner=owner,
        created_at=created_at,
        updated_at=created_at,
        settings={"prompt": "a cat surfing", "resolution": [384, 640], "steps": 50, "cfg": 7.5},
        prompts=[[0, "a cat surfing"]],
        rng_state=b"\x00\x01rng",
    )


def frame(seq: int, session_id: str = "s1", salt: int = 0, pixels: bytes | None = None):
    codes = [seq * 1000 + salt * 7 + i for i in range(6)]
    return FrameRecord(
        session_id=session_id,
        seq=seq,
        tokens=struct.pack("<6i", *codes),
        shape=(2, 3),
        pixels=f"png-{seq}-{salt}".encode() if pixels is None else pixels,
        meta={"prompt": 0, "source": "generated"},
    )


async def fill(store: SessionStore, n: int, session_id: str = "s1") -> None:
    for seq in range(n):
        assert await store.append_frame(frame(seq, session_id)) is True


# -- sessions ----------------------------------------------------------------------------------


def test_create_get_update(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        meta = session()
        await store.create_session(meta)
        assert await store.get_session("s1") == meta
        assert await store.get_session("nope") is None

        updated = await store.update_session(
            "s1",
            status="running",
            settings={"prompt": "a dog", "seed": 3},
            prompts=[(0, "a cat surfing"), (4, "a dog")],
            rng_state=b"\xff" * 8,
            worker="worker-0",
            error="transient",
        )
        assert updated == await store.get_session("s1")
        assert updated.status == "running"
        assert updated.settings == {"prompt": "a dog", "seed": 3}
        assert updated.prompts == [[0, "a cat surfing"], [4, "a dog"]]
        assert updated.rng_state == b"\xff" * 8
        assert (updated.worker, updated.error) == ("worker-0", "transient")
        assert updated.created_at == meta.created_at
        assert updated.updated_at > meta.updated_at
        assert (updated.token_hash, updated.owner, updated.n_frames) == (
            meta.token_hash,
            "owner-a",
            0,
        )

        cleared = await store.update_session("s1", worker=None, error=None, rng_state=None)
        assert (cleared.worker, cleared.error, cleared.rng_state) == (None, None, None)
        assert cleared.status == "running"
        assert await store.get_session("s1") == cleared

        with pytest.raises(TypeError, match="n_frames"):
            await store.update_session("s1", n_frames=7)
        with pytest.raises(TypeError, match="owner"):
            await store.update_session("s1", owner="someone-else")
        with pytest.raises(ValueError, match="status"):
            await store.update_session("s1", status="exploded")
        with pytest.raises(SessionNotFound):
            await store.update_session("nope", status="done")
        assert await store.get_session("nope") is None
        assert await store.get_session("s1") == cleared

    run(opener, body)


def test_duplicate_create(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        await store.create_session(session())
        await fill(store, 2)
        other = session(owner="owner-b", created_at=5.0)
        with pytest.raises(SessionExists):
            await store.create_session(other)
        kept = await store.get_session("s1")
        assert kept is not None and kept.owner == "owner-a" and kept.n_frames == 2
        assert await store.list_sessions("owner-b") == []
        with pytest.raises(ValueError, match="n_frames"):
            await store.create_session(SessionMeta("s2", "h", "owner-a", n_frames=3))

    run(opener, body)


# -- frames ------------------------------------------------------------------------------------


def test_append_in_order_and_idempotent_retry(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        await store.create_session(session())
        for seq in range(3):
            assert await store.append_frame(frame(seq)) is True
            assert (await store.get_session("s1")).n_frames == seq + 1
        # A retry of a committed frame (same tokens; the decoded pixels may differ) is a no-op.
        assert await store.append_frame(frame(1, pixels=b"re-decoded")) is False
        assert await store.append_frame(frame(2)) is False
        assert (await store.get_session("s1")).n_frames == 3
        assert await store.get_frames("s1") == [frame(0), frame(1), frame(2)]
        with pytest.raises(SessionNotFound):
            await store.append_frame(frame(0, session_id="nope"))

    run(opener, body)


def test_append_conflicts_leave_store_unchanged(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        await store.create_session(session())
        await fill(store, 2)
        before = await store.get_frames("s1")
        with pytest.raises(FrameConflict, match="gap"):
            await store.append_frame(frame(3))
        with pytest.raises(FrameConflict, match="different"):
            await store.append_frame(frame(0, salt=1))
        with pytest.raises(FrameConflict):
            await store.append_frame(frame(1, salt=2, pixels=b"png-1-0"))
        assert isinstance(FrameConflict("x"), StoreError)
        assert await store.get_frames("s1") == before == [frame(0), frame(1)]
        assert (await store.get_session("s1")).n_frames == 2
        assert await store.append_frame(frame(2)) is True

    run(opener, body)


def test_get_frames_ranges(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        await store.create_session(session())
        assert await store.get_frames("s1") == []
        await fill(store, 5)
        everything = [frame(seq) for seq in range(5)]
        got = await store.get_frames("s1")
        assert got == everything
        assert all(isinstance(f.shape, tuple) and isinstance(f.tokens, bytes) for f in got)
        assert await store.get_frames("s1", 1, 3) == everything[1:3]
        assert await store.get_frames("s1", 3) == everything[3:]
        assert await store.get_frames("s1", 0, 99) == everything
        assert await store.get_frames("s1", 4, 5) == everything[4:]
        assert await store.get_frames("s1", 5) == []
        assert await store.get_frames("s1", 9, 12) == []
        assert await store.get_frames("s1", 3, 2) == []
        with pytest.raises(ValueError):
            await store.get_frames("s1", -1)
        with pytest.raises(SessionNotFound):
            await store.get_frames("nope")

    run(opener, body)


# -- listing, deletion, persistence --------------------------------------------------------


def test_list_sessions_by_owner_newest_first(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        for sid, created in [("old", 100.0), ("newest", 300.0), ("middle", 200.0)]:
            await store.create_session(session(sid, owner="owner-a", created_at=created))
        await store.create_session(session("theirs", owner="owner-b", created_at=400.0))
        listed = await store.list_sessions("owner-a")
        assert [m.session_id for m in listed] == ["newest", "middle", "old"]
        assert listed[0] == await store.get_session("newest")
        assert [m.session_id for m in await store.list_sessions("owner-b")] == ["theirs"]
        assert await store.list_sessions("nobody") == []
        await store.delete_session("middle")
        assert [m.session_id for m in await store.list_sessions("owner-a")] == ["newest", "old"]

    run(opener, body)


def test_delete(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        await store.create_session(session())
        await store.create_session(session("s2"))
        await fill(store, 3)
        await fill(store, 1, session_id="s2")
        await store.delete_session("s1")
        assert await store.get_session("s1") is None
        with pytest.raises(SessionNotFound):
            await store.get_frames("s1")
        with pytest.raises(SessionNotFound):
            await store.append_frame(frame(3))
        await store.delete_session("s1")  # idempotent
        await store.delete_session("never-existed")
        assert [m.session_id for m in await store.list_sessions("owner-a")] == ["s2"]
        assert await store.get_frames("s2") == [frame(0, "s2")]
        # The id may be reused, and starts empty.
        await store.create_session(session())
        assert (await store.get_session("s1")).n_frames == 0
        assert await store.get_frames("s1") == []
        assert await store.append_frame(frame(0, salt=5)) is True

    run(opener, body)


def test_persistence_across_reopen(opener: Opener) -> None:
    async def write(store: SessionStore) -> None:
        await store.create_session(session())
        await fill(store, 3)
        await store.update_session("s1", status="done", worker="worker-1")

    async def read(store: SessionStore) -> tuple[SessionMeta | None, list[FrameRecord]]:
        return await store.get_session("s1"), await store.get_frames("s1")

    run(opener, write)
    meta, frames = run(opener, read)
    assert meta is not None
    assert (meta.status, meta.worker, meta.n_frames) == ("done", "worker-1", 3)
    assert meta.prompts == [[0, "a cat surfing"]] and meta.rng_state == b"\x00\x01rng"
    assert frames == [frame(seq) for seq in range(3)]


def test_closed_store_refuses_calls(opener: Opener) -> None:
    async def body() -> None:
        store = opener()
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(StoreError):
            await store.get_session("s1")

    asyncio.run(body())


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_append_same_seq_one_wins(opener: Opener) -> None:
    async def body(a: SessionStore, b: SessionStore) -> None:
        await a.create_session(session())
        for seq in range(10):
            # Two writers race for the same seq with different frames: exactly one wins.
            results = await asyncio.gather(
                a.append_frame(frame(seq, salt=1)),
                b.append_frame(frame(seq, salt=2)),
                return_exceptions=True,
            )
            wins = [i for i, r in enumerate(results) if r is True]
            assert len(wins) == 1, results
            loser = results[1 - wins[0]]
            assert isinstance(loser, FrameConflict), results
            stored = (await b.get_frames("s1", seq, seq + 1))[0]
            assert stored == frame(seq, salt=1 + wins[0])
        assert (await a.get_session("s1")).n_frames == 10

        # The same frame raced twice (a retry overlapping the original): one stores, one no-ops.
        results = await asyncio.gather(a.append_frame(frame(10)), b.append_frame(frame(10)))
        assert sorted(results) == [False, True]
        assert (await b.get_session("s1")).n_frames == 11

    run(opener, body, n_stores=2)


def test_many_writers_commit_each_seq_once(opener: Opener) -> None:
    n_frames = 15

    async def writer(store: SessionStore) -> int:
        stored = 0
        for seq in range(n_frames):
            stored += await store.append_frame(frame(seq))
        return stored

    async def body(*stores: SessionStore) -> None:
        await stores[0].create_session(session())
        counts = await asyncio.gather(*(writer(s) for s in stores))
        assert sum(counts) == n_frames
        assert (await stores[0].get_session("s1")).n_frames == n_frames
        assert await stores[-1].get_frames("s1") == [frame(seq) for seq in range(n_frames)]

    run(opener, body, n_stores=3)


# -- admission: one atomic check-and-reserve ---------------------------------------------------


def admission(active: int = 32, per_owner: int = 1000, stored: int = 1000, **kw) -> Admission:
    return Admission(
        max_active=active, max_active_per_owner=per_owner, max_stored_per_owner=stored, **kw
    )


def test_cap_holds_for_50_parallel_creates_over_4_store_objects(opener: Opener) -> None:
    limits = admission(active=32)

    async def create(store: SessionStore, i: int) -> str | None:
        try:
            await store.create_session(session(f"c{i}", owner=f"owner-{i}"), limits)
        except AdmissionRefused as e:
            assert e.reason == "sessions_cap" and e.retry_after_s == 5
            assert "too many sessions" in str(e)
            return None
        return f"c{i}"

    async def body(*stores: SessionStore) -> None:
        await stores[0].create_session(session("kept"))  # no admission: not counted
        results = await asyncio.gather(*(create(stores[i % 4], i) for i in range(50)))
        admitted = [sid for sid in results if sid]
        assert len(admitted) == 32
        assert await stores[1].active_count() == 32
        for i, sid in enumerate(results):  # a refused create stored nothing
            assert (await stores[2].get_session(f"c{i}") is None) == (sid is None)
        assert (await stores[0].get_session("kept")).n_frames == 0
        # finishing one frees one place, and only one
        await stores[0].update_session(admitted[0], status="done")
        assert await stores[0].active_count() == 31
        results = await asyncio.gather(*(create(stores[i % 4], 100 + i) for i in range(5)))
        assert sum(1 for sid in results if sid) == 1

    run(opener, body, n_stores=4)


def test_per_owner_limits_hold_under_concurrency(opener: Opener) -> None:
    async def body(a: SessionStore, b: SessionStore) -> None:
        limits = admission(per_owner=3, stored=5)
        tries = [
            (a, b)[i % 2].create_session(session(f"o{i}", owner="greedy"), limits)
            for i in range(12)
        ]
        results = await asyncio.gather(*tries, return_exceptions=True)
        refused = [r for r in results if isinstance(r, AdmissionRefused)]
        assert len(refused) == 9 and {r.reason for r in refused} == {"owner_cap"}
        assert "3 sessions generating (limit 3)" in str(refused[0])
        assert len(await a.list_sessions("greedy")) == 3
        await a.create_session(session("other", owner="modest"), limits)  # another owner: fine
        for m in await a.list_sessions("greedy"):
            await a.update_session(m.session_id, status="done")
        await a.create_session(session("g4", owner="greedy"), limits)
        await a.create_session(session("g5", owner="greedy"), limits)
        with pytest.raises(AdmissionRefused, match="keeps 5 sessions") as kept:
            await a.create_session(session("g6", owner="greedy"), limits)
        assert kept.value.reason == "owner_cap"
        await a.delete_session("g5")
        await b.create_session(session("g6", owner="greedy"), limits)

    run(opener, body, n_stores=2)


def test_reserve_release_and_what_ends_an_admission(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        limits = admission(active=2)
        await store.create_session(session("a"), limits)
        with pytest.raises(SessionBusy):  # created queued: already active
            await store.reserve("a", limits)
        await store.update_session("a", status="running")  # still active
        assert await store.active_count() == 1
        await store.update_session("a", status="done")  # finished (or cancelled)
        assert await store.active_count() == 0
        await store.reserve("a", limits)  # an extend
        with pytest.raises(SessionBusy):
            await store.reserve("a", limits)
        await store.create_session(session("b"), limits)
        await store.create_session(session("c", created_at=5.0))
        await store.update_session("c", status="done")
        before = await store.get_session("c")
        with pytest.raises(AdmissionRefused) as refused:
            await store.reserve("c", limits)
        assert refused.value.reason == "sessions_cap"
        assert await store.get_session("c") == before  # a refusal changes nothing
        await store.update_session("b", status="failed")  # a failure ends it too
        await store.reserve("c", limits)
        await store.delete_session("c")  # so does a delete
        await store.release("a")  # and an explicit release (idempotent)
        await store.release("a")
        assert await store.active_count() == 0
        with pytest.raises(SessionNotFound):
            await store.reserve("nope", limits)

    run(opener, body)


def test_a_stale_reservation_stops_counting(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        limits = admission(active=1, stale_s=0.3)
        await store.create_session(session("a"))
        await store.update_session("a", status="done")
        await store.reserve("a", limits)  # ... and the caller dies before starting it
        await store.create_session(session("b"))
        await store.update_session("b", status="done")
        with pytest.raises(AdmissionRefused):
            await store.reserve("b", limits)
        await asyncio.sleep(0.4)
        await store.reserve("b", limits)  # a's reservation was stale (status still "done")
        await store.update_session("b", status="running")
        await asyncio.sleep(0.4)
        with pytest.raises(AdmissionRefused):  # b is generating: never stale
            await store.reserve("a", limits)

    run(opener, body)


def test_text_that_is_not_utf8_is_refused_before_anything_is_stored(opener: Opener) -> None:
    async def body(store: SessionStore) -> None:
        with pytest.raises(ValueError, match="surrogate"):
            SessionMeta("x", "h", "owner-a", prompts=[[0, "a \ud800 cat"]])
        await store.create_session(session())
        before = await store.get_session("s1")
        with pytest.raises(ValueError, match="surrogate"):
            await store.update_session("s1", prompts=[[0, "ok"], [2, "bad \udfff"]])
        with pytest.raises(ValueError, match="surrogate"):
            await store.update_session("s1", settings={"note": "\ud83d"})
        assert await store.get_session("s1") == before
        failed = await store.update_session("s1", status="failed", error="boom \ud800")
        assert failed.error == "boom \ufffd"
        assert [m.session_id for m in await store.list_sessions("owner-a")] == ["s1"]
        emoji = await store.update_session("s1", prompts=[[0, "a cat \U0001f431"]])
        assert (await store.get_session("s1")).prompts == emoji.prompts == [[0, "a cat \U0001f431"]]

    run(opener, body)


def test_a_surrogate_a_store_already_holds_reads_as_u_fffd(opener: Opener) -> None:
    """Rows written before the UTF-8 rule: listing, reading and deleting them still work."""

    async def body(store: SessionStore) -> None:
        await store.create_session(session())
        raw = '[[0,"a \\ud800 cat"]]'  # what json.dumps wrote for a lone surrogate
        if isinstance(store, SQLiteStore):
            conn = sqlite3.connect(store.path)
            conn.execute("UPDATE sessions SET prompts = ? WHERE session_id = 's1'", (raw,))
            conn.commit()
            conn.close()
        else:
            client = redis.Redis.from_url(REDIS_URL)
            client.hset(f"{store.prefix}:session:s1", "prompts", raw)
            client.close()
        listed = await store.list_sessions("owner-a")
        assert listed[0].prompts == [[0, "a \ufffd cat"]]
        assert (await store.get_session("s1")).prompts == [[0, "a \ufffd cat"]]
        await store.delete_session("s1")
        assert await store.get_session("s1") is None

    run(opener, body)


_PROCESS_WRITER = """
import asyncio, struct, sys
from lumos.store import FrameRecord, SQLiteStore

async def main(path, n):
    store = SQLiteStore(path)
    stored = 0
    for seq in range(n):
        tokens = struct.pack("<6i", *[seq * 1000 + i for i in range(6)])
        stored += await store.append_frame(FrameRecord("s1", seq, tokens, (2, 3)))
    await store.close()
    print(stored)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_sqlite_several_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    n_frames, n_procs = 20, 3

    async def create(store: SessionStore) -> None:
        await store.create_session(session())

    run(lambda: SQLiteStore(path), create)
    src = str(Path(lumos.store.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_WRITER, str(path), str(n_frames)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(n_procs)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert sum(int(out) for out, _ in outputs) == n_frames

    async def read(store: SessionStore) -> tuple[SessionMeta | None, list[FrameRecord]]:
        return await store.get_session("s1"), await store.get_frames("s1")

    meta, frames = run(lambda: SQLiteStore(path), read)
    assert meta is not None and meta.n_frames == n_frames
    assert [f.seq for f in frames] == list(range(n_frames))


# -- records and URLs ----------------------------------------------------------------------


def test_records_validate() -> None:
    meta = SessionMeta("s", "h", "o", created_at=12.0, prompts=[(0, "x")])
    assert meta.updated_at == 12.0 and meta.prompts == [[0, "x"]] and meta.status == "queued"
    assert SessionMeta("s", "h", "o", status="idle").status == "done"  # written before "done"
    with pytest.raises(ValueError, match="status"):
        SessionMeta("s", "h", "o", status="paused")
    with pytest.raises(ValueError, match="seq"):
        FrameRecord("s", -1, b"", (1, 1))
    assert FrameRecord("s", 0, bytearray(b"ab"), [4, 5]).shape == (4, 5)


def test_open_store_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    async def roundtrip(url: str) -> None:
        store = open_store(url)
        try:
            assert isinstance(store, SQLiteStore)
            await store.create_session(session())
            assert await store.get_session("s1") == session()
        finally:
            await store.close()

    asyncio.run(roundtrip("sqlite:///data/rel.db"))
    assert (tmp_path / "data" / "rel.db").exists()
    absolute = tmp_path / "abs" / "store.db"
    asyncio.run(roundtrip(f"sqlite:///{absolute}"))
    assert absolute.exists()


def test_open_store_redis_url() -> None:
    prefix = f"lumos-test-{uuid.uuid4().hex}"

    async def body() -> None:
        store = open_store(f"{REDIS_URL}?prefix={prefix}")
        try:
            assert isinstance(store, RedisStore) and store.prefix == prefix
            await store.create_session(session())
            assert await store.get_session("s1") == session()
            await store.delete_session("s1")
        finally:
            await store.close()

    asyncio.run(body())


@pytest.mark.parametrize(
    "url, problem",
    [
        ("", "non-empty"),
        ("http://localhost/x.db", "unsupported store URL"),
        ("postgres://db/lumos", "unsupported store URL"),
        ("/var/lumos.db", "unsupported store URL"),
        ("sqlite://rel.db", "three slashes"),
        ("sqlite:///", "no database file path"),
        ("redis:///0", "no host"),
        ("redis://localhost:6379/0?prefix=", "empty prefix"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        open_store(url)
