"""The session store contract: records, errors and the async `SessionStore` interface.

The store is the persistence layer of a generation session (system.md, "grain persistence"): it
owns the truth of a session (settings, prompt segments, RNG state) and the tokens of every committed
frame. Frames are appended with strictly increasing sequence numbers; an append is atomic, ordered
and idempotent, so a session actor may retry after a crash or a lost reply without ever storing a
frame twice or overwriting one. Backends: `lumos.store.sqlite` (single machine) and
`lumos.store.redis` (cluster). The session actor and the API call every method with `await`.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("idle", "running", "done", "failed")
# Fields of SessionMeta that update_session may set; everything else is fixed at creation
# (session_id, token_hash, owner, created_at) or owned by the store (updated_at, n_frames).
MUTABLE_FIELDS = frozenset({"settings", "status", "prompts", "rng_state", "worker", "error"})


class StoreError(Exception):
    """Base class of every error raised by a session store."""


class SessionExists(StoreError):
    """create_session was called with an id that is already taken."""


class SessionNotFound(StoreError):
    """The session id is unknown (never created, or deleted)."""


class FrameConflict(StoreError):
    """An append would leave a gap or replace a different frame at an existing sequence number."""


@dataclass
class SessionMeta:
    """Everything about a session except its frames.

    token_hash is the sha256 hex digest of the session's bearer token (the store never sees the
    token itself); owner is an opaque key used to list one token holder's sessions. updated_at
    defaults to created_at. prompts holds [from_frame, prompt] segments: a prompt applies from
    that frame on.
    """

    session_id: str
    token_hash: str
    owner: str
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    status: str = "idle"
    n_frames: int = 0
    prompts: list[list[Any]] = field(default_factory=list)
    rng_state: bytes | None = None
    worker: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        self.created_at = float(self.created_at)
        self.updated_at = float(self.updated_at or self.created_at)
        self.n_frames = int(self.n_frames)
        self.prompts = normalize_prompts(self.prompts)
        if self.rng_state is not None:
            self.rng_state = bytes(self.rng_state)
        check_status(self.status)


@dataclass
class FrameRecord:
    """One committed latent frame of a session.

    tokens: a little-endian int32 array of the frame's codes (opaque to the store);
    shape: (h, w) of the latent grid; pixels: opaque decoded frame bytes (e.g. PNG), may be b"";
    meta: JSON-serialisable extras (prompt index, source "generated" / "image", ...).
    """

    session_id: str
    seq: int
    tokens: bytes
    shape: tuple[int, int]
    pixels: bytes = b""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seq = int(self.seq)
        if self.seq < 0:
            raise ValueError(f"frame seq must be >= 0, got {self.seq}")
        self.tokens = bytes(self.tokens)
        self.pixels = bytes(self.pixels)
        h, w = self.shape
        self.shape = (int(h), int(w))


def check_status(status: str) -> None:
    """Raise ValueError unless status is one of STATUSES."""
    if status not in STATUSES:
        raise ValueError(f"invalid session status {status!r}; expected one of {STATUSES}")


def normalize_prompts(prompts: Any) -> list[list[Any]]:
    """Return prompt segments as [[from_frame: int, prompt: str], ...] (JSON round-trip safe)."""
    out = []
    for segment in prompts:
        from_frame, prompt = segment
        out.append([int(from_frame), str(prompt)])
    return out


def check_update(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate the keyword arguments of update_session; return them normalised."""
    bad = sorted(set(fields) - MUTABLE_FIELDS)
    if bad:
        raise TypeError(
            f"update_session cannot set {', '.join(bad)}; mutable fields: {sorted(MUTABLE_FIELDS)}"
        )
    out = dict(fields)
    if "status" in out:
        check_status(out["status"])
    if "prompts" in out:
        out["prompts"] = normalize_prompts(out["prompts"])
    if "settings" in out and not isinstance(out["settings"], dict):
        raise TypeError("settings must be a dict")
    if out.get("rng_state") is not None:
        out["rng_state"] = bytes(out["rng_state"])
    return out


def check_range(start: int, end: int | None) -> None:
    """Raise ValueError for a negative get_frames range."""
    if start < 0 or (end is not None and end < 0):
        raise ValueError(f"frame range must be non-negative, got [{start}, {end})")


def dump_json(value: Any) -> str:
    """Compact JSON used for settings, prompts and frame meta in every backend."""
    return json.dumps(value, separators=(",", ":"))


class SessionStore(abc.ABC):
    """Async persistence of sessions and their frames. All methods are coroutines."""

    @abc.abstractmethod
    async def create_session(self, meta: SessionMeta) -> None:
        """Store a new session (meta.n_frames must be 0); raise SessionExists if the id is taken."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionMeta | None:
        """Return the session's meta, or None if it does not exist."""

    @abc.abstractmethod
    async def update_session(self, session_id: str, **fields: Any) -> SessionMeta:
        """Set mutable fields (MUTABLE_FIELDS), bump updated_at, return the new meta.

        Raises TypeError for any other field and SessionNotFound for an unknown id.
        """

    @abc.abstractmethod
    async def append_frame(self, frame: FrameRecord) -> bool:
        """Commit one frame atomically; return True if stored, False for an identical retry.

        frame.seq == n_frames: store it and increment n_frames (True). A frame already stored at
        frame.seq with identical tokens: no-op (False). Anything else (a gap, or different tokens
        at an existing seq) raises FrameConflict; stored frames are never overwritten.
        Raises SessionNotFound for an unknown session.
        """

    @abc.abstractmethod
    async def get_frames(
        self, session_id: str, start: int = 0, end: int | None = None
    ) -> list[FrameRecord]:
        """Committed frames with start <= seq < end (end None: all), in order.

        Raises SessionNotFound for an unknown session.
        """

    @abc.abstractmethod
    async def truncate_frames(self, session_id: str, n: int) -> None:
        """Drop frames with seq >= n, so n_frames becomes min(n, n_frames).

        Raises SessionNotFound for an unknown session, ValueError for n < 0.
        """

    @abc.abstractmethod
    async def list_sessions(self, owner: str) -> list[SessionMeta]:
        """The owner's sessions, newest (largest created_at) first."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Remove a session and all its frames; a no-op for an unknown id."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store must not be used afterwards. Idempotent."""
