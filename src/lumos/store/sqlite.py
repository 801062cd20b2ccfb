"""SQLite session store: the single-machine default (system.md, "grain persistence").

One file, WAL journal, stdlib sqlite3. Each call runs in a worker thread (`asyncio.to_thread`) under
a lock that serialises use of this object's connection. Writes run in `BEGIN IMMEDIATE`
transactions, which take SQLite's write lock up front, so several processes (or several store
objects) on the same file see each append as one atomic check-and-insert, and each admission
(`create_session(meta, admission)`, `reserve`) as one atomic check-and-reserve on the `active`
table (a row per active session: id, owner, since).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from lumos.store.base import (
    ACTIVE_STATUSES,
    Admission,
    FrameConflict,
    FrameRecord,
    SessionBusy,
    SessionExists,
    SessionMeta,
    SessionNotFound,
    SessionStore,
    StoreError,
    check_range,
    check_update,
    dump_json,
    load_json,
    releases,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    owner      TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    settings   TEXT NOT NULL,
    status     TEXT NOT NULL,
    n_frames   INTEGER NOT NULL,
    prompts    TEXT NOT NULL,
    rng_state  BLOB,
    worker     TEXT,
    error      TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, created_at);
CREATE TABLE IF NOT EXISTS frames (
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    tokens     BLOB NOT NULL,
    h          INTEGER NOT NULL,
    w          INTEGER NOT NULL,
    pixels     BLOB NOT NULL,
    meta       TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS active (
    session_id TEXT PRIMARY KEY REFERENCES sessions (session_id) ON DELETE CASCADE,
    owner      TEXT NOT NULL,
    since      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS active_by_owner ON active (owner);
"""

_SESSION_COLS = (
    "session_id, token_hash, owner, created_at, updated_at, settings, status, n_frames, prompts, "
    "rng_state, worker, error"
)

_N_COLS = len(_SESSION_COLS.split(","))
_INSERT_SESSION = f"INSERT INTO sessions ({_SESSION_COLS}) VALUES ({', '.join('?' * _N_COLS)})"


def _meta_from_row(row: tuple) -> SessionMeta:
    sid, token_hash, owner, created, updated, settings, status, n, prompts, *rest = row
    rng_state, worker, error = rest
    return SessionMeta(
        session_id=sid,
        token_hash=token_hash,
        owner=owner,
        created_at=created,
        updated_at=updated,
        settings=load_json(settings),
        status=status,
        n_frames=n,
        prompts=load_json(prompts),
        rng_state=rng_state,
        worker=worker,
        error=error,
    )


class SQLiteStore(SessionStore):
    """Session store in one SQLite file; safe to open from several processes at once."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions, every write says BEGIN IMMEDIATE itself.
        # timeout is SQLite's busy timeout: how long to wait for another writer's lock.
        conn = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -- plumbing --------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"{self!r} is closed")
            return fn(self._conn, *args)

    @staticmethod
    @contextmanager
    def _tx(conn: sqlite3.Connection, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction: BEGIN IMMEDIATE for writes, a consistent snapshot for reads."""
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _n_frames(conn: sqlite3.Connection, session_id: str) -> int:
        row = conn.execute(
            "SELECT n_frames FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise SessionNotFound(session_id)
        return row[0]

    # -- sessions --------------------------------------------------------------------------

    async def create_session(self, meta: SessionMeta, admission: Admission | None = None) -> None:
        if meta.n_frames != 0:
            raise ValueError(f"a new session has no frames, got n_frames={meta.n_frames}")
        row = (
            meta.session_id,
            meta.token_hash,
            meta.owner,
            meta.created_at,
            meta.updated_at,
            dump_json(meta.settings),
            meta.status,
            0,
            dump_json(meta.prompts),
            meta.rng_state,
            meta.worker,
            meta.error,
        )
        await self._run(self._create, row, admission, time.time())

    def _create(
        self, conn: sqlite3.Connection, row: tuple, admission: Admission | None, now: float
    ) -> None:
        session_id, owner = row[0], row[2]
        with self._tx(conn, write=True):
            if admission is not None:
                exists = conn.execute(
                    "SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)
                ).fetchone()
                if exists:
                    raise SessionExists(session_id)
                self._admit(conn, owner, admission, now, new=True)
            try:
                conn.execute(_INSERT_SESSION, row)
            except sqlite3.IntegrityError:
                raise SessionExists(session_id) from None
            if admission is not None:
                conn.execute(
                    "INSERT INTO active (session_id, owner, since) VALUES (?, ?, ?)",
                    (session_id, owner, now),
                )

    @staticmethod
    def _admit(
        conn: sqlite3.Connection, owner: str, admission: Admission, now: float, new: bool
    ) -> None:
        """Inside a write transaction: drop stale reservations, raise if a limit is reached."""
        conn.execute(
            "DELETE FROM active WHERE since < ? AND session_id IN "
            "(SELECT session_id FROM sessions WHERE status NOT IN ('queued', 'running'))",
            (now - admission.stale_s,),
        )
        (total,) = conn.execute("SELECT COUNT(*) FROM active").fetchone()
        if total >= admission.max_active:
            raise admission.refusal("sessions_cap", total)
        (mine,) = conn.execute("SELECT COUNT(*) FROM active WHERE owner = ?", (owner,)).fetchone()
        if mine >= admission.max_active_per_owner:
            raise admission.refusal("owner_cap", mine)
        if new:
            (kept,) = conn.execute(
                "SELECT COUNT(*) FROM sessions WHERE owner = ?", (owner,)
            ).fetchone()
            if kept >= admission.max_stored_per_owner:
                raise admission.refusal("owner_stored", kept)

    async def reserve(self, session_id: str, admission: Admission) -> None:
        await self._run(self._reserve, session_id, admission, time.time())

    def _reserve(
        self, conn: sqlite3.Connection, session_id: str, admission: Admission, now: float
    ) -> None:
        with self._tx(conn, write=True):
            row = conn.execute(
                "SELECT owner, status FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None:
                raise SessionNotFound(session_id)
            owner, status = row
            held = conn.execute(
                "SELECT since FROM active WHERE session_id = ?", (session_id,)
            ).fetchone()
            fresh = held is not None and held[0] >= now - admission.stale_s
            if status in ACTIVE_STATUSES or fresh:
                raise SessionBusy(f"session {session_id!r} is already generating")
            conn.execute("DELETE FROM active WHERE session_id = ?", (session_id,))
            self._admit(conn, owner, admission, now, new=False)
            conn.execute(
                "INSERT INTO active (session_id, owner, since) VALUES (?, ?, ?)",
                (session_id, owner, now),
            )

    async def release(self, session_id: str) -> None:
        await self._run(self._release, session_id)

    def _release(self, conn: sqlite3.Connection, session_id: str) -> None:
        with self._tx(conn, write=True):
            conn.execute("DELETE FROM active WHERE session_id = ?", (session_id,))

    async def active_count(self) -> int:
        return await self._run(self._active_count)

    @staticmethod
    def _active_count(conn: sqlite3.Connection) -> int:
        (n,) = conn.execute("SELECT COUNT(*) FROM active").fetchone()
        return int(n)

    async def get_session(self, session_id: str) -> SessionMeta | None:
        return await self._run(self._get, session_id)

    @staticmethod
    def _get(conn: sqlite3.Connection, session_id: str) -> SessionMeta | None:
        row = conn.execute(
            f"SELECT {_SESSION_COLS} FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return None if row is None else _meta_from_row(row)

    async def update_session(self, session_id: str, **fields: Any) -> SessionMeta:
        fields = check_update(fields)
        release = releases(fields)
        for key in ("settings", "prompts"):
            if key in fields:
                fields[key] = dump_json(fields[key])
        fields["updated_at"] = time.time()
        return await self._run(self._update, session_id, fields, release)

    def _update(
        self, conn: sqlite3.Connection, session_id: str, fields: dict, release: bool
    ) -> SessionMeta:
        assignments = ", ".join(f"{key} = ?" for key in fields)  # keys checked by check_update
        with self._tx(conn, write=True):
            cur = conn.execute(
                f"UPDATE sessions SET {assignments} WHERE session_id = ?",
                (*fields.values(), session_id),
            )
            if cur.rowcount == 0:
                raise SessionNotFound(session_id)
            if release:
                conn.execute("DELETE FROM active WHERE session_id = ?", (session_id,))
            meta = self._get(conn, session_id)
        assert meta is not None
        return meta

    async def list_sessions(self, owner: str) -> list[SessionMeta]:
        return await self._run(self._list, owner)

    @staticmethod
    def _list(conn: sqlite3.Connection, owner: str) -> list[SessionMeta]:
        rows = conn.execute(
            f"SELECT {_SESSION_COLS} FROM sessions WHERE owner = ? "
            "ORDER BY created_at DESC, session_id DESC",
            (owner,),
        ).fetchall()
        return [_meta_from_row(row) for row in rows]

    async def delete_session(self, session_id: str) -> None:
        await self._run(self._delete, session_id)

    def _delete(self, conn: sqlite3.Connection, session_id: str) -> None:
        with self._tx(conn, write=True):
            conn.execute("DELETE FROM active WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM frames WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

    # -- frames ----------------------------------------------------------------------------

    async def append_frame(self, frame: FrameRecord) -> bool:
        row = (
            frame.session_id,
            frame.seq,
            frame.tokens,
            frame.shape[0],
            frame.shape[1],
            frame.pixels,
            dump_json(frame.meta),
        )
        return await self._run(self._append, row, time.time())

    def _append(self, conn: sqlite3.Connection, row: tuple, now: float) -> bool:
        session_id, seq, tokens = row[0], row[1], row[2]
        with self._tx(conn, write=True):
            n = self._n_frames(conn, session_id)
            if seq == n:
                conn.execute(
                    "INSERT INTO frames (session_id, seq, tokens, h, w, pixels, meta) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                conn.execute(
                    "UPDATE sessions SET n_frames = n_frames + 1, updated_at = ? "
                    "WHERE session_id = ?",
                    (now, session_id),
                )
                return True
            if seq < n:
                stored = conn.execute(
                    "SELECT tokens FROM frames WHERE session_id = ? AND seq = ?", (session_id, seq)
                ).fetchone()
                if stored is not None and stored[0] == tokens:
                    return False
                raise FrameConflict(
                    f"session {session_id!r}: a different frame is stored at seq {seq}"
                )
            raise FrameConflict(
                f"session {session_id!r}: append of seq {seq} would leave a gap (n_frames={n})"
            )

    async def get_frames(
        self, session_id: str, start: int = 0, end: int | None = None
    ) -> list[FrameRecord]:
        check_range(start, end)
        return await self._run(self._frames, session_id, start, end)

    def _frames(
        self, conn: sqlite3.Connection, session_id: str, start: int, end: int | None
    ) -> list[FrameRecord]:
        with self._tx(conn, write=False):
            n = self._n_frames(conn, session_id)
            stop = n if end is None else min(end, n)
            rows = conn.execute(
                "SELECT seq, tokens, h, w, pixels, meta FROM frames "
                "WHERE session_id = ? AND seq >= ? AND seq < ? ORDER BY seq",
                (session_id, start, stop),
            ).fetchall()
        return [
            FrameRecord(session_id, seq, tokens, (h, w), pixels, load_json(meta))
            for seq, tokens, h, w, pixels, meta in rows
        ]

    # -- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
