"""Request and response bodies of the HTTP API (system.md, "api/").

Types are strict (no "5" for 5, no true for 1) and unknown fields are rejected. The numeric limits
(frames per request, steps, cfg, prompt length, image size) come from the running `ServeConfig`, so
the app checks them per request (`Limits.check_*`) and publishes them at `GET /api/config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr

StrictFloat = Annotated[float, Strict()]  # accepts 7 and 7.5, rejects "7.5", true, NaN (below)

SEED_MAX = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionRequest(_Body):
    """Start a session: text-to-video, or image-to-video when `image` is given."""

    prompt: StrictStr = Field(description="what to generate (length limit: /api/config)")
    frames: StrictInt = Field(ge=1, description="frames to generate now (limit: /api/config)")
    steps: StrictInt | None = Field(None, ge=1, description="diffusion steps per frame")
    cfg: StrictFloat | None = Field(None, ge=0, allow_inf_nan=False, description="CFG scale")
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX, description="random seed")
    image: StrictStr | None = Field(
        None,
        description="optional first frame: base64 PNG or JPEG, optionally a data: URL",
    )


class ExtendRequest(_Body):
    """Generate more frames; a non-empty prompt applies from the first new frame on."""

    frames: StrictInt = Field(ge=1, description="frames to add (limit: /api/config)")
    prompt: StrictStr | None = Field(None, description="new prompt; empty or absent: keep")


class SessionState(BaseModel):
    """Public view of a session (never its token, owner or RNG state)."""

    id: str
    status: str = Field(description="queued | running | done | failed")
    n_frames: int
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


class Health(BaseModel):
    status: str
    workers: list[dict[str, Any]]


class ErrorBody(BaseModel):
    error: str = Field(description="a human-readable message")
    details: list[dict[str, Any]] | None = Field(None, description="per-field validation errors")


@dataclass(frozen=True)
class Limits:
    """Input limits of the API, read from a ServeConfig (see `from_config`)."""

    max_prompt_chars: int = 500
    max_frames_per_request: int = 64
    max_frames_per_session: int = 256
    max_image_bytes: int = 4 * 1024 * 1024
    min_steps: int = 1
    max_steps: int = 100
    min_cfg: float = 0.0
    max_cfg: float = 30.0
    max_image_side: int = 4096

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        """Take every limit the config names (directly or in a nested `limits` object)."""
        sources = [s for s in (getattr(cfg, "limits", None), cfg) if s is not None]

        def find(*names: str) -> Any:
            for source in sources:
                for name in names:
                    value = (
                        source.get(name)
                        if isinstance(source, dict)
                        else getattr(source, name, None)
                    )
                    if value is not None:
                        return value
            return None

        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            value = find(name)
            if value is not None:
                values[name] = value
        for kind in ("steps", "cfg"):  # a (low, high) pair: limits.steps or cfg.steps_range
            pair = find(f"{kind}_range", kind)
            if isinstance(pair, list | tuple) and len(pair) == 2:
                values[f"min_{kind}"], values[f"max_{kind}"] = pair
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def prompt_error(self, prompt: str, required: bool) -> str | None:
        if required and not prompt:
            return "prompt must not be empty"
        if len(prompt) > self.max_prompt_chars:
            return f"prompt is {len(prompt)} characters long; the limit is {self.max_prompt_chars}"
        if "\x00" in prompt:
            return "prompt must not contain NUL characters"
        return None

    def frames_error(self, frames: int, n_frames: int = 0) -> str | None:
        if not 1 <= frames <= self.max_frames_per_request:
            return f"frames must be between 1 and {self.max_frames_per_request}, got {frames}"
        if n_frames + frames > self.max_frames_per_session:
            return (
                f"a session holds at most {self.max_frames_per_session} frames; it has "
                f"{n_frames}, so at most {max(0, self.max_frames_per_session - n_frames)} more"
            )
        return None

    def settings_error(self, steps: int | None, cfg: float | None) -> str | None:
        if steps is not None and not self.min_steps <= steps <= self.max_steps:
            return f"steps must be between {self.min_steps} and {self.max_steps}, got {steps}"
        if cfg is not None and not self.min_cfg <= cfg <= self.max_cfg:
            return f"cfg must be between {self.min_cfg:g} and {self.max_cfg:g}, got {cfg:g}"
        return None
