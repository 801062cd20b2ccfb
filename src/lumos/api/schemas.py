"""Request and response bodies of the HTTP API (system.md, "api/").

Types are strict (no "5" for 5, no true for 1) and unknown fields are rejected. The numeric limits
(frames per request, steps, cfg, prompt length, image size) come from the running `ServeConfig`
(`lumos.cluster.limits.Limits`, checked once per request by the client); the app writes their
values into its OpenAPI schema and publishes them at `GET /api/config`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr

StrictFloat = Annotated[float, Strict()]  # accepts 7 and 7.5, rejects "7.5", true, NaN (below)

SEED_MAX = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionRequest(_Body):
    """Start a session: text-to-video, or image-to-video when `image` is given."""

    prompt: StrictStr = Field(description="what to generate (length limit: /api/config)")
    frames: StrictInt = Field(
        ge=1,
        description="latent frames to generate now (each is 1 RGB frame for the first latent, "
        "then the tokenizer's temporal factor; the bundled model: 1); limit: /api/config",
    )
    steps: StrictInt | None = Field(None, ge=1, description="diffusion steps per frame")
    cfg: StrictFloat | None = Field(None, ge=0, allow_inf_nan=False, description="CFG scale")
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX, description="random seed")
    image: StrictStr | None = Field(
        None,
        description="optional first frame: base64 PNG or JPEG, optionally a data: URL",
    )


class ExtendRequest(_Body):
    """Generate more frames; a non-empty prompt applies from the first new frame on."""

    frames: StrictInt = Field(ge=1, description="latent frames to add (limit: /api/config)")
    prompt: StrictStr | None = Field(None, description="new prompt; empty or absent: keep")


class SessionState(BaseModel):
    """Public view of a session (never its token, owner or RNG state)."""

    id: str
    status: str = Field(description="queued | running | done | failed")
    n_frames: int = Field(description="stored latent frames (frame records, seq 0..n-1)")
    target: int | None = Field(None, description="n_frames when the current request is done")
    prompts: list[list[Any]] = Field(description="[from_frame, prompt] segments")
    settings: dict[str, Any]
    worker: str | None = None
    error: str | None = None
    created_at: float | None = None
    updated_at: float | None = None


class CreateSessionResponse(BaseModel):
    id: str
    token: str = Field(description="bearer token of this session; returned only once")
    state: SessionState


class SessionSummary(BaseModel):
    id: str
    prompt: str
    n_frames: int
    status: str
    created: float | None = None
    updated: float | None = None


class SessionList(BaseModel):
    sessions: list[SessionSummary]


class SessionCounts(BaseModel):
    active: int = Field(description="sessions queued or generating now")
    limit: int = Field(description="at most this many at once (429 beyond)")


class Health(BaseModel):
    """Public liveness: no names, pids or hosts."""

    status: Literal["ok", "degraded"]
    workers: int = Field(description="live workers")
    sessions: SessionCounts | None = None
    reason: str | None = Field(None, description="why the service is degraded (with 503)")


class AdminHealth(BaseModel):
    """Operator view: every worker's details, the refusal counters, the limits."""

    status: Literal["ok", "degraded"]
    workers: list[dict[str, Any]]
    sessions: SessionCounts | None = None
    refusals: dict[str, int] = Field(description="429s by reason since the process started")
    limits: dict[str, Any]
    reason: str | None = None


class ErrorBody(BaseModel):
    error: str = Field(description="a human-readable message")
    details: list[dict[str, Any]] | None = Field(None, description="per-field validation errors")


REFUSAL_REASONS = ("sessions_cap", "owner_cap", "rate_limit")


class RefusalBody(BaseModel):
    """A 429: retry after the Retry-After header's seconds."""

    error: str
    reason: Literal["sessions_cap", "owner_cap", "rate_limit"]


STATE_KEYS = tuple(SessionState.model_fields)


def public_state(state: dict[str, Any]) -> dict[str, Any]:
    """The fields of a client state dict a token holder may see (drops anything internal)."""
    out = {key: state.get(key) for key in STATE_KEYS}
    out["id"] = state.get("id") or state.get("session_id")
    out["n_frames"] = int(out["n_frames"] or 0)
    out["target"] = None if out["target"] is None else int(out["target"])
    out["prompts"] = [list(p) for p in (out["prompts"] or [])]
    out["settings"] = dict(out["settings"] or {})
    return jsonable_encoder(out)
