"""Redis session store: the cluster backend (system.md, "grain persistence").

Keys, under a prefix (default "lumos"):

    {prefix}:session:{id}   hash: the SessionMeta fields (None fields are absent)
    {prefix}:frames:{id}    hash: t:{seq} tokens, x:{seq} JSON header (shape, meta), p:{seq} pixels
    {prefix}:owner:{owner}  sorted set: session ids scored by created_at
    {prefix}:active         sorted set: active session ids scored by the time they were admitted
    {prefix}:active_owner   hash: active session id -> its owner

Every multi-step change (create, reserve, update, append, delete) is one Lua script, so it is
atomic: two writers can never both append the same seq, a frame once stored is never
overwritten, and concurrent admissions never exceed a limit. The admission scripts read the
status of the sessions in the active set by key names they build from the prefix (fine on one
Redis server or a replicated one; not on Redis Cluster). Uses `redis.asyncio`; one connection
pool per store object.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from lumos.store.base import (
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

# The admission check, shared by _CREATE and _RESERVE. KEYS[3], KEYS[4]: active, active_owner.
# ARGV[1..6] = session_id, owner, now, the three limits (0: no admission), ARGV[7] stale_s,
# ARGV[8] the session-key prefix. Drops stale reservations, then returns {reason, count} when a
# limit is reached, or nil.
_ADMIT = """
local function admit(keys, argv, owner, new, stored)
  local now, stale = tonumber(argv[3]), tonumber(argv[7])
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', keys[3], '-inf', now - stale)) do
    local status = redis.call('HGET', argv[8] .. sid, 'status')
    if status ~= 'queued' and status ~= 'running' then
      redis.call('ZREM', keys[3], sid)
      redis.call('HDEL', keys[4], sid)
    end
  end
  local total = redis.call('ZCARD', keys[3])
  if total >= tonumber(argv[4]) then return {'sessions_cap', total} end
  local mine = 0
  for _, o in ipairs(redis.call('HVALS', keys[4])) do
    if o == owner then mine = mine + 1 end
  end
  if mine >= tonumber(argv[5]) then return {'owner_cap', mine} end
  if new and stored >= tonumber(argv[6]) then return {'owner_stored', stored} end
  return nil
end
"""

# KEYS: session, owner index, active, active_owner. ARGV: see _ADMIT (limits 0: no admission),
# then field/value pairs from ARGV[9]. Returns {1} stored, {0} the id is taken, or a refusal.
_CREATE = (
    _ADMIT
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
if tonumber(ARGV[4]) > 0 then
  local refused = admit(KEYS, ARGV, ARGV[2], true, redis.call('ZCARD', KEYS[2]))
  if refused then return refused end
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return {1}
"""
)

# KEYS: session, (unused), active, active_owner. ARGV: see _ADMIT (owner is read here).
# Returns {1} reserved, {-1} unknown session, {-2} busy, or a refusal.
_RESERVE = (
    _ADMIT
    + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {-1} end
local since = redis.call('ZSCORE', KEYS[3], ARGV[1])
local held = since and tonumber(since) >= tonumber(ARGV[3]) - tonumber(ARGV[7])
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' or held then return {-2} end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
local refused = admit(KEYS, ARGV, owner, false, 0)
if refused then return refused end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], owner)
return {1}
"""
)

# KEYS: active, active_owner. ARGV: session_id.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# KEYS: session, active, active_owner. ARGV: updated_at, n_set, n_set field/value pairs, then
# fields to delete; ARGV[3 + 2 n_set] is "1" to release the session's admission, else "0".
# Returns the updated hash as a flat list, or nil for an unknown session.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local n_set = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
for i = 0, n_set - 1 do
  redis.call('HSET', KEYS[1], ARGV[3 + 2 * i], ARGV[4 + 2 * i])
end
if ARGV[3 + 2 * n_set] == '1' then
  local sid = redis.call('HGET', KEYS[1], 'session_id')
  redis.call('ZREM', KEYS[2], sid)
  redis.call('HDEL', KEYS[3], sid)
end
for i = 4 + 2 * n_set, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: session, frames. ARGV: seq, tokens, header, pixels, now.
# Returns 1 stored, 0 identical retry, -1 unknown session, -2 different frame, -3 gap.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = tonumber(redis.call('HGET', KEYS[1], 'n_frames'))
local seq = tonumber(ARGV[1])
if seq == n then
  redis.call('HSET', KEYS[2], 't:' .. ARGV[1], ARGV[2], 'x:' .. ARGV[1], ARGV[3],
             'p:' .. ARGV[1], ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'n_frames', 1)
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[5])
  return 1
end
if seq > n then return -3 end
if redis.call('HGET', KEYS[2], 't:' .. ARGV[1]) == ARGV[2] then return 0 end
return -2
"""

# KEYS: session, frames, owner index, active, active_owner. ARGV: session_id, owner.
# Returns 1 deleted, 0 nothing to delete, -1 the owner changed (re-created): read it again.
_DELETE = """
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  redis.call('DEL', KEYS[2])
  return 0
end
if owner ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

_OPTIONAL = ("rng_state", "worker", "error")


def _encode(name: str, value: Any) -> bytes | str:
    if name in ("settings", "prompts"):
        return dump_json(value)
    if name in ("created_at", "updated_at"):
        return repr(float(value))
    if isinstance(value, bytes):
        return value
    return str(value)


def _meta_from_hash(h: dict[bytes, bytes]) -> SessionMeta:
    def text(key: str) -> str | None:
        value = h.get(key.encode())
        return None if value is None else value.decode()

    return SessionMeta(
        session_id=text("session_id") or "",
        token_hash=text("token_hash") or "",
        owner=text("owner") or "",
        created_at=float(h[b"created_at"]),
        updated_at=float(h[b"updated_at"]),
        settings=load_json(h[b"settings"]),
        status=text("status") or "queued",
        n_frames=int(h[b"n_frames"]),
        prompts=load_json(h[b"prompts"]),
        rng_state=h.get(b"rng_state"),
        worker=text("worker"),
        error=text("error"),
    )


class RedisStore(SessionStore):
    """Session store in Redis; any number of store objects and processes may share a prefix."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "lumos") -> None:
        self.url = url
        self.prefix = prefix
        self._redis: aioredis.Redis | None = aioredis.Redis.from_url(url)
        self._create = self._redis.register_script(_CREATE)
        self._update = self._redis.register_script(_UPDATE)
        self._append = self._redis.register_script(_APPEND)
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)
        self._delete = self._redis.register_script(_DELETE)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    @property
    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreError(f"{self!r} is closed")
        return self._redis

    async def _eval(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a registered Lua script (EVALSHA, loading it on first use) on this store's client."""
        return await script(keys=keys, args=args, client=self._r)

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def _frames_key(self, session_id: str) -> str:
        return f"{self.prefix}:frames:{session_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}"

    def _active_keys(self) -> list[str]:
        return [f"{self.prefix}:active", f"{self.prefix}:active_owner"]

    def _admission_args(
        self, session_id: str, owner: str, admission: Admission | None
    ) -> list[Any]:
        a = admission
        limits = (
            [0, 0, 0, 1]
            if a is None
            else [a.max_active, a.max_active_per_owner, a.max_stored_per_owner, a.stale_s]
        )
        return [session_id, owner, repr(time.time()), *limits, self._session_key("")]

    @staticmethod
    def _refused(result: list[Any], admission: Admission) -> None:
        reason = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        raise admission.refusal(reason, int(result[1]))

    # -- sessions --------------------------------------------------------------------------

    async def create_session(self, meta: SessionMeta, admission: Admission | None = None) -> None:
        if meta.n_frames != 0:
            raise ValueError(f"a new session has no frames, got n_frames={meta.n_frames}")
        pairs: list[bytes | str] = []
        for name in (
            "session_id",
            "token_hash",
            "owner",
            "created_at",
            "updated_at",
            "settings",
            "status",
            "n_frames",
            "prompts",
            *_OPTIONAL,
        ):
            value = getattr(meta, name)
            if value is not None:
                pairs += [name, _encode(name, value)]
        result = await self._eval(
            self._create,
            keys=[
                self._session_key(meta.session_id),
                self._owner_key(meta.owner),
                *self._active_keys(),
            ],
            args=[*self._admission_args(meta.session_id, meta.owner, admission), *pairs],
        )
        if result[0] == 0:
            raise SessionExists(meta.session_id)
        if result[0] != 1:
            assert admission is not None
            self._refused(result, admission)

    async def reserve(self, session_id: str, admission: Admission) -> None:
        result = await self._eval(
            self._reserve,
            keys=[self._session_key(session_id), "", *self._active_keys()],
            args=self._admission_args(session_id, "", admission),
        )
        if result[0] == -1:
            raise SessionNotFound(session_id)
        if result[0] == -2:
            raise SessionBusy(f"session {session_id!r} is already generating")
        if result[0] != 1:
            self._refused(result, admission)

    async def release(self, session_id: str) -> None:
        await self._eval(self._release, keys=self._active_keys(), args=[session_id])

    async def active_count(self) -> int:
        return int(await self._r.zcard(self._active_keys()[0]))

    async def get_session(self, session_id: str) -> SessionMeta | None:
        h = await self._r.hgetall(self._session_key(session_id))
        return _meta_from_hash(h) if h else None

    async def update_session(self, session_id: str, **fields: Any) -> SessionMeta:
        fields = check_update(fields)
        release = "1" if releases(fields) else "0"
        to_set: list[bytes | str] = []
        to_delete: list[str] = []
        for name, value in fields.items():
            if value is None and name in _OPTIONAL:
                to_delete.append(name)
            else:
                to_set += [name, _encode(name, value)]
        flat = await self._eval(
            self._update,
            keys=[self._session_key(session_id), *self._active_keys()],
            args=[repr(time.time()), len(to_set) // 2, *to_set, release, *to_delete],
        )
        if flat is None:
            raise SessionNotFound(session_id)
        return _meta_from_hash(dict(zip(flat[::2], flat[1::2])))

    async def list_sessions(self, owner: str) -> list[SessionMeta]:
        ids = await self._r.zrevrange(self._owner_key(owner), 0, -1)
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.hgetall(self._session_key(sid.decode()))
            hashes = await pipe.execute()
        # An id may outlive its session for a moment only if deleted concurrently: skip it.
        metas = [_meta_from_hash(h) for h in hashes if h]
        return [m for m in metas if m.owner == owner]

    async def delete_session(self, session_id: str) -> None:
        while True:
            owner = await self._r.hget(self._session_key(session_id), "owner")
            owner_text = "" if owner is None else owner.decode()
            done = await self._eval(
                self._delete,
                keys=[
                    self._session_key(session_id),
                    self._frames_key(session_id),
                    self._owner_key(owner_text),
                    *self._active_keys(),
                ],
                args=[session_id, owner_text],
            )
            if done != -1:
                return

    # -- frames ----------------------------------------------------------------------------

    async def append_frame(self, frame: FrameRecord) -> bool:
        header = dump_json({"shape": list(frame.shape), "meta": frame.meta})
        result = await self._eval(
            self._append,
            keys=[self._session_key(frame.session_id), self._frames_key(frame.session_id)],
            args=[str(frame.seq), frame.tokens, header, frame.pixels, repr(time.time())],
        )
        if result == 1:
            return True
        if result == 0:
            return False
        if result == -1:
            raise SessionNotFound(frame.session_id)
        if result == -2:
            raise FrameConflict(
                f"session {frame.session_id!r}: a different frame is stored at seq {frame.seq}"
            )
        raise FrameConflict(
            f"session {frame.session_id!r}: append of seq {frame.seq} would leave a gap"
        )

    async def get_frames(
        self, session_id: str, start: int = 0, end: int | None = None
    ) -> list[FrameRecord]:
        check_range(start, end)
        n = await self._r.hget(self._session_key(session_id), "n_frames")
        if n is None:
            raise SessionNotFound(session_id)
        stop = int(n) if end is None else min(end, int(n))
        if start >= stop:
            return []
        fields = [f"{kind}:{seq}" for seq in range(start, stop) for kind in "txp"]
        values = await self._r.hmget(self._frames_key(session_id), fields)
        frames = []
        for i, seq in enumerate(range(start, stop)):
            tokens, header, pixels = values[3 * i : 3 * i + 3]
            if tokens is None:  # truncated between the two reads: the prefix is what exists
                break
            head = load_json(header)
            frames.append(
                FrameRecord(session_id, seq, tokens, tuple(head["shape"]), pixels, head["meta"])
            )
        return frames

    # -- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.aclose()
