"""The session store contract: records, errors and the async `SessionStore` interface.

The store is the persistence layer of a generation session (system.md, "grain persistence"): it
owns the truth of a session (settings, prompt segments, RNG state) and the tokens of every committed
frame. Frames are appended with strictly increasing sequence numbers; an append is atomic, ordered
and idempotent, so a session actor may retry after a crash or a lost reply without ever storing a
frame twice or overwriting one. Backends: `lumos.store.sqlite` (single machine) and
`lumos.store.redis` (cluster). The session actor and the API call every method with `await`.

Admission. The store also holds the set of *active* sessions, which the capacity limits count
(`Admission`). A session becomes active by an admitted `create_session(meta, admission)` or
`reserve(id, admission)`: one atomic check-and-reserve in the backend (SQLite: one BEGIN IMMEDIATE
transaction; Redis: one Lua script), so concurrent requests can never exceed a limit, and a
refused request (`AdmissionRefused`) changes nothing. It stays active while it is queued or
generating and is released when its status is written as one outside ACTIVE_STATUSES ("done":
finished or cancelled; "failed"), when it is deleted, or by `release(id)`. A reservation whose
session's status is still not active `Admission.stale_s` seconds after it was made (its caller
died between `reserve` and starting the generation) is dropped by the next admission.

Text. Every string the store keeps must be encodable as UTF-8: a lone surrogate ("\\ud800") is
refused with ValueError before anything is written.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("queued", "running", "done", "failed")
# queued: frames were asked for and no worker streams them yet; running: a worker is generating;
# done: every asked-for frame is stored (or the generation was cancelled); failed: see error.
ACTIVE_STATUSES = ("queued", "running")  # a generation is asked for and not over
LEGACY_STATUSES = {"idle": "done"}  # what stores written before the four statuses hold
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


class SessionBusy(StoreError):
    """reserve() on a session that is already active (queued or generating)."""


class AdmissionRefused(StoreError, ValueError):
    """A capacity limit is reached; nothing was stored. Retry after `retry_after_s` seconds.

    reason: "sessions_cap" (too many active sessions in all) or "owner_cap" (this owner has too
    many active or stored sessions).
    """

    def __init__(self, message: str, reason: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = int(retry_after_s)


@dataclass(frozen=True)
class Admission:
    """The capacity limits one check-and-reserve enforces (see the module docstring).

    max_active: active sessions in all; max_active_per_owner: active sessions of one owner;
    max_stored_per_owner: sessions one owner may keep at all (checked on create only);
    retry_after_s: what a refusal tells the caller to wait; stale_s: see the module docstring.
    """

    max_active: int
    max_active_per_owner: int
    max_stored_per_owner: int
    retry_after_s: int = 5
    stale_s: float = 600.0  # longer than any create takes between reserving and queueing

    def __post_init__(self) -> None:
        for name in ("max_active", "max_active_per_owner", "max_stored_per_owner"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Admission.{name} must be >= 1, got {getattr(self, name)}")
        if self.retry_after_s < 1 or self.stale_s <= 0:
            raise ValueError("Admission.retry_after_s must be >= 1 and stale_s > 0")

    def refusal(self, reason: str, count: int) -> AdmissionRefused:
        """The error for a refusal by `reason` when `count` sessions already hold the limit."""
        if reason == "sessions_cap":
            text = (
                f"too many sessions are generating right now ({count}, limit {self.max_active}); "
                "try again later"
            )
        elif reason == "owner_cap":
            text = (
                f"this owner already has {count} sessions generating (limit "
                f"{self.max_active_per_owner}); try again when one is done"
            )
        elif reason == "owner_stored":
            reason = "owner_cap"
            text = (
                f"this owner already keeps {count} sessions (limit {self.max_stored_per_owner}); "
                "delete one first"
            )
        else:
            raise ValueError(f"unknown refusal reason {reason!r}")
        return AdmissionRefused(text, reason, self.retry_after_s)


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
    status: str = "queued"
    n_frames: int = 0
    prompts: list[list[Any]] = field(default_factory=list)
    rng_state: bytes | None = None
    worker: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        for name in ("session_id", "token_hash", "owner", "worker"):
            check_text(getattr(self, name), name)
        self.error = clean_text(self.error)
        self.created_at = float(self.created_at)
        self.updated_at = float(self.updated_at or self.created_at)
        self.n_frames = int(self.n_frames)
        self.prompts = normalize_prompts(self.prompts)
        if self.rng_state is not None:
            self.rng_state = bytes(self.rng_state)
        self.status = LEGACY_STATUSES.get(self.status, self.status)
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


def check_text(value: str | None, what: str) -> None:
    """Raise ValueError unless value (a str, or None) can be encoded as UTF-8."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} is not valid Unicode text (it holds a lone surrogate code point)"
        ) from None


def clean_text(value: str | None) -> str | None:
    """value with anything UTF-8 cannot encode replaced by U+FFFD (for error messages)."""
    if value is None:
        return None
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)


def normalize_prompts(prompts: Any) -> list[list[Any]]:
    """Return prompt segments as [[from_frame: int, prompt: str], ...] (JSON round-trip safe)."""
    out = []
    for segment in prompts:
        from_frame, prompt = segment
        check_text(str(prompt), "prompt")
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
    if "worker" in out:
        check_text(out["worker"], "worker")
    if "error" in out:
        out["error"] = clean_text(out["error"])
    return out


def releases(fields: dict[str, Any]) -> bool:
    """Whether an update with these (checked) fields ends the session's admission."""
    return "status" in fields and fields["status"] not in ACTIVE_STATUSES


def check_range(start: int, end: int | None) -> None:
    """Raise ValueError for a negative get_frames range."""
    if start < 0 or (end is not None and end < 0):
        raise ValueError(f"frame range must be non-negative, got [{start}, {end})")


def load_json(text: str | bytes) -> Any:
    """Parse stored JSON; text a store written before the UTF-8 rule may hold (a JSON-escaped
    lone surrogate) comes back with U+FFFD in its place, so such a session can still be listed,
    read and deleted."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return clean_text(value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        return value

    return clean(json.loads(text))


def dump_json(value: Any) -> str:
    """Compact JSON used for settings, prompts and frame meta in every backend.

    Raises ValueError for text that cannot be encoded as UTF-8 (a lone surrogate): stored JSON
    must be readable by every client, and json.dumps would otherwise escape it silently.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    check_text(text, "a stored JSON value")
    return text


class SessionStore(abc.ABC):
    """Async persistence of sessions and their frames. All methods are coroutines."""

    @abc.abstractmethod
    async def create_session(self, meta: SessionMeta, admission: Admission | None = None) -> None:
        """Store a new session (meta.n_frames must be 0); raise SessionExists if the id is taken.

        With admission, atomically: refuse (AdmissionRefused, nothing stored) when the limits
        are reached, else store the session AND make it active (see the module docstring).
        """

    @abc.abstractmethod
    async def reserve(self, session_id: str, admission: Admission) -> None:
        """Make an existing session active if the limits allow, atomically.

        Raises SessionNotFound for an unknown id, SessionBusy if it is already active or its
        status is "running", AdmissionRefused when a limit is reached (nothing changed).
        """

    @abc.abstractmethod
    async def release(self, session_id: str) -> None:
        """End the session's admission (a no-op when it is not active)."""

    @abc.abstractmethod
    async def active_count(self) -> int:
        """How many sessions hold an admission now (a stale one counts until the next admission
        drops it)."""

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
    async def list_sessions(self, owner: str) -> list[SessionMeta]:
        """The owner's sessions, newest (largest created_at) first."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Remove a session and all its frames (and release it); a no-op for an unknown id."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store must not be used afterwards. Idempotent."""
