"""Session store: one async contract (`SessionStore`), two backends, chosen by URL.

    sqlite:///relative/path.db     SQLite file, relative to the working directory
    sqlite:////abs/path.db         SQLite file, absolute path
    redis://host:port/db           Redis (rediss:// for TLS); "?prefix=name" sets the key prefix

See `lumos.store.base` for the contract (atomic, ordered, idempotent frame appends; atomic
admission against the capacity limits).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from lumos.store.base import (
    ACTIVE_STATUSES,
    MUTABLE_FIELDS,
    STATUSES,
    Admission,
    AdmissionRefused,
    FrameConflict,
    FrameRecord,
    SessionBusy,
    SessionExists,
    SessionMeta,
    SessionNotFound,
    SessionStore,
    StoreError,
)
from lumos.store.redis import RedisStore
from lumos.store.sqlite import SQLiteStore

__all__ = [
    "ACTIVE_STATUSES",
    "MUTABLE_FIELDS",
    "STATUSES",
    "Admission",
    "AdmissionRefused",
    "FrameConflict",
    "FrameRecord",
    "RedisStore",
    "SQLiteStore",
    "SessionBusy",
    "SessionExists",
    "SessionMeta",
    "SessionNotFound",
    "SessionStore",
    "StoreError",
    "open_store",
]

_FORMS = "sqlite:///path/to/file.db (sqlite:////abs/path.db) or redis://host:port/db"


def open_store(url: str) -> SessionStore:
    """Open the session store named by url (see the module docstring for the accepted forms)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"store URL must be a non-empty string; expected {_FORMS}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ValueError(
                f"store URL {url!r}: a sqlite URL needs three slashes before the path, "
                "e.g. sqlite:///data/lumos.db (relative) or sqlite:////var/lumos.db (absolute)"
            )
        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError(f"store URL {url!r}: no database file path after sqlite:///")
        return SQLiteStore(path)
    if scheme in ("redis", "rediss"):
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"store URL {url!r}: no host, expected redis://host:port/db")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [value for key, value in query if key == "prefix"]
        rest = urlencode([(key, value) for key, value in query if key != "prefix"])
        if prefixes and not prefixes[-1]:
            raise ValueError(f"store URL {url!r}: empty prefix")
        redis_url = urlunsplit(parts._replace(query=rest))
        return RedisStore(redis_url, prefix=prefixes[-1] if prefixes else "lumos")
    raise ValueError(f"unsupported store URL {url!r}: expected {_FORMS}")
