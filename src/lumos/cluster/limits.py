"""The service's limits: one validated dataclass (`ServeConfig.limits`) and the checks that use it.

Three kinds, all from the running config and all published at `GET /api/config`:

- inputs, checked by `LumosClient` on every create/extend (one set of checks, one message each;
  the API maps `InvalidRequest` to 422 and `TooLarge` to 413): prompt length, frames per request
  and per session ("frames" are latent frames = stored frame records), steps, CFG, seed, image
  bytes and pixel size;
- capacity, enforced atomically by the session store (`lumos.store.Admission`): `max_sessions`
  sessions active at once over the whole cluster, `max_sessions_per_owner` active sessions of one
  owner and `max_stored_sessions_per_owner` sessions one owner may keep. "Active" means queued or
  generating: a session holds its place from an admitted create/extend until its generation is
  done, failed or cancelled, or it is deleted. Refusals are HTTP 429 with Retry-After
  `retry_after_s`;
- request rate, enforced by the API process (`lumos.api.ratelimit`): a token bucket per client
  address (`rate_per_s`, `rate_burst`) and one per owner key (`owner_rate_per_s`,
  `owner_rate_burst`) on session create and extend; 0 turns a bucket off.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from lumos.store import Admission
from lumos.store.base import check_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
SEED_LIMIT = 2**63


class InvalidRequest(ValueError):
    """A request field is out of range or of the wrong kind (HTTP 422); nothing was stored."""


class TooLarge(InvalidRequest):
    """A request part is larger than its limit (HTTP 413); nothing was stored."""


@dataclass
class Limits:
    """Every limit of the service (see the module docstring); validated on construction."""

    max_prompt_chars: int = 500
    max_frames_per_request: int = 64  # latent frames (= stored frame records) per call
    max_frames_per_session: int | None = None  # a per-session quota (None: unbounded)
    max_image_bytes: int = 4 << 20
    max_image_side: int = 4096
    steps: tuple[int, int] = (1, 100)
    cfg: tuple[float, float] = (0.0, 30.0)
    max_sessions: int = 32  # active (queued or generating) sessions over the whole cluster
    max_sessions_per_owner: int = 8  # active sessions of one owner key
    max_stored_sessions_per_owner: int = 500  # sessions one owner key may keep
    retry_after_s: int = 5  # the Retry-After of a capacity refusal
    rate_per_s: float = 2.0  # creates + extends per second per client address (0: no limit)
    rate_burst: int = 32
    owner_rate_per_s: float = 1.0  # creates + extends per second per owner key (0: no limit)
    owner_rate_burst: int = 16

    def __post_init__(self) -> None:
        self.steps = (int(self.steps[0]), int(self.steps[1]))
        self.cfg = (float(self.cfg[0]), float(self.cfg[1]))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("steps", "cfg"):
                if not (math.isfinite(value[0]) and math.isfinite(value[1])):
                    raise ValueError(f"limits.{f.name} must be finite, got {value}")
                if not 0 <= value[0] <= value[1] or (f.name == "steps" and value[0] < 1):
                    raise ValueError(f"limits.{f.name} must be a range low <= high, got {value}")
            elif f.name in ("rate_per_s", "owner_rate_per_s"):
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"limits.{f.name} must be >= 0, got {value}")
            elif f.name == "max_frames_per_session" and value is None:
                continue
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{f.name} must be an integer >= 1, got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        """The limits as JSON (what `GET /api/config` publishes)."""
        out = asdict(self)
        out["min_steps"], out["max_steps"] = self.steps
        out["min_cfg"], out["max_cfg"] = self.cfg
        del out["steps"], out["cfg"]
        return out

    def admission(self) -> Admission:
        """The capacity limits in the form the store's atomic check-and-reserve takes."""
        return Admission(
            max_active=self.max_sessions,
            max_active_per_owner=self.max_sessions_per_owner,
            max_stored_per_owner=self.max_stored_sessions_per_owner,
            retry_after_s=self.retry_after_s,
        )

    # -- the checks (each raises InvalidRequest with a message naming the field) -------------------

    def check_prompt(self, prompt: Any, required: bool = True) -> str | None:
        """The prompt, stripped; None when not required and absent or blank."""
        if prompt is None and not required:
            return None
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string")
        if len(prompt) > self.max_prompt_chars:
            raise InvalidRequest(
                f"prompt is {len(prompt)} characters long; the limit is {self.max_prompt_chars}"
            )
        try:
            check_text(prompt, "prompt")
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        if "\x00" in prompt:
            raise InvalidRequest("prompt must not contain NUL characters")
        text = prompt.strip()
        if not text:
            if required:
                raise InvalidRequest("prompt must not be empty")
            return None
        return text

    def check_frames(self, frames: Any, have: int = 0) -> int:
        """frames (a count of latent frames) for a session that already holds `have`."""
        if isinstance(frames, bool) or not isinstance(frames, int):
            raise InvalidRequest(f"frames must be an integer, got {frames!r}")
        if not 1 <= frames <= self.max_frames_per_request:
            raise InvalidRequest(
                f"frames must be between 1 and {self.max_frames_per_request} per request, "
                f"got {frames}"
            )
        if self.max_frames_per_session is not None and have + frames > self.max_frames_per_session:
            raise InvalidRequest(
                f"a session holds at most {self.max_frames_per_session} frames; it has {have} "
                f"and {frames} more were requested (at most "
                f"{max(0, self.max_frames_per_session - have)} more)"
            )
        return frames

    def check_sampler(self, steps: Any, cfg_scale: Any, seed: Any) -> None:
        if steps is not None:
            lo, hi = self.steps
            if isinstance(steps, bool) or not isinstance(steps, int) or not lo <= steps <= hi:
                raise InvalidRequest(
                    f"steps must be an integer between {lo} and {hi}, got {steps!r}"
                )
        if cfg_scale is not None:
            lo, hi = self.cfg
            ok = isinstance(cfg_scale, int | float) and not isinstance(cfg_scale, bool)
            if not ok or not math.isfinite(cfg_scale) or not lo <= cfg_scale <= hi:
                raise InvalidRequest(
                    f"cfg_scale must be a number between {lo} and {hi}, got {cfg_scale!r}"
                )
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
                raise InvalidRequest(f"seed must be an integer in [0, 2**63), got {seed!r}")

    def check_image(self, data: Any) -> tuple[int, int]:
        """A PNG or JPEG file's (width, height); TooLarge / InvalidRequest if it is not one."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidRequest("image must be bytes (a PNG or JPEG file)")
        data = bytes(data)
        if len(data) > self.max_image_bytes:
            raise TooLarge(f"image is {len(data)} bytes; the limit is {self.max_image_bytes} bytes")
        if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
            raise InvalidRequest("image is not a decodable PNG or JPEG file (wrong first bytes)")
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if max(width, height) > self.max_image_side or min(width, height) < 1:
                    raise InvalidRequest(
                        f"image is {width}x{height} pixels; each side must be 1.."
                        f"{self.max_image_side}"
                    )
                probe.verify()
        except InvalidRequest:
            raise
        except Exception:  # PIL raises many kinds for a broken file, bombs included
            raise InvalidRequest("image is not a decodable PNG or JPEG file") from None
        return width, height
