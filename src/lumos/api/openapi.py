"""The app's OpenAPI schema with the running limits written in (`install`).

The request models are static (`lumos.api.schemas`), the limits come from the `ServeConfig`, and
the client enforces them (`lumos.cluster.limits`). So the schema a server publishes at
/openapi.json is FastAPI's, patched once with this server's values: maxLength / maximum / minimum
on each limited field, the header and path formats, and a table of every limit (inputs, capacity
and rate) in the description.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lumos.api.inputs import max_image_chars
from lumos.cluster.limits import SEED_LIMIT, Limits

PROMPT_PATTERN = r"^[^\x00]*\S[^\x00]*$"  # not blank, no NUL
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
OWNER_KEY_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"


def limits_table(limits: Limits) -> str:
    """Markdown: every limit of this server, with its value and what exceeding it answers."""
    per_session = limits.max_frames_per_session
    rows = [
        (
            "prompt",
            f"at most {limits.max_prompt_chars} characters, not blank, no NUL, valid Unicode",
            "422",
        ),
        ("frames per request", f"1..{limits.max_frames_per_request} (latent frames)", "422"),
        (
            "frames per session",
            "unbounded" if per_session is None else f"at most {per_session}",
            "422",
        ),
        ("steps", f"{limits.steps[0]}..{limits.steps[1]}", "422"),
        ("cfg", f"{limits.cfg[0]:g}..{limits.cfg[1]:g}", "422"),
        ("seed", "0..2^63-1", "422"),
        (
            "image",
            f"PNG or JPEG, at most {limits.max_image_bytes} bytes, each side at most "
            f"{limits.max_image_side} px",
            "413 / 422",
        ),
        (
            "active sessions",
            f"at most {limits.max_sessions} queued or generating at once (all owners; atomic)",
            "429 sessions_cap",
        ),
        (
            "active sessions per owner key",
            f"at most {limits.max_sessions_per_owner} (atomic)",
            "429 owner_cap",
        ),
        (
            "stored sessions per owner key",
            f"at most {limits.max_stored_sessions_per_owner} (atomic)",
            "429 owner_cap",
        ),
        (
            "creates + extends per client address",
            _rate(limits.rate_per_s, limits.rate_burst),
            "429 rate_limit",
        ),
        (
            "creates + extends per owner key",
            _rate(limits.owner_rate_per_s, limits.owner_rate_burst),
            "429 rate_limit",
        ),
    ]
    lines = ["| limit | value | beyond it |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {answer} |" for name, value, answer in rows]
    return (
        "\n\n### Limits of this server\n\n" + "\n".join(lines) + "\n\nEvery 429 carries "
        f"`Retry-After` (seconds; {limits.retry_after_s} for a capacity refusal) and "
        '`{"error", "reason"}`. A refused request changes nothing already stored.'
    )


def _rate(per_s: float, burst: int) -> str:
    return "no limit" if per_s == 0 else f"{per_s:g} per second, bursts of {burst}"


def _constrain(prop: dict[str, Any], **constraints: Any) -> None:
    """Add constraints to a property, or to the non-null branch of an optional one."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(constraints)


def document(schema: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Write the limits into a FastAPI OpenAPI schema (in place; also returned)."""
    models = schema.get("components", {}).get("schemas", {})
    create = models.get("CreateSessionRequest", {}).get("properties", {})
    extend = models.get("ExtendRequest", {}).get("properties", {})
    per_session = limits.max_frames_per_session
    frames_note = (
        f" At most {limits.max_frames_per_request} per request"
        + ("" if per_session is None else f"; a session holds at most {per_session} in all")
        + "."
    )
    if create:
        _constrain(
            create["prompt"], minLength=1, maxLength=limits.max_prompt_chars, pattern=PROMPT_PATTERN
        )
        _constrain(create["frames"], minimum=1, maximum=limits.max_frames_per_request)
        create["frames"]["description"] = create["frames"].get("description", "") + frames_note
        _constrain(create["steps"], minimum=limits.steps[0], maximum=limits.steps[1])
        _constrain(create["cfg"], minimum=limits.cfg[0], maximum=limits.cfg[1])
        _constrain(create["seed"], minimum=0, maximum=SEED_LIMIT - 1)
        _constrain(create["image"], maxLength=max_image_chars(limits))
    if extend:
        _constrain(extend["frames"], minimum=1, maximum=limits.max_frames_per_request)
        extend["frames"]["description"] = extend["frames"].get("description", "") + frames_note
        _constrain(extend["prompt"], maxLength=limits.max_prompt_chars)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                if param.get("name") == "session_id" and param.get("in") == "path":
                    param["schema"]["pattern"] = SESSION_ID_PATTERN
                elif param.get("name", "").lower() == "x-lumos-owner":
                    _constrain(param["schema"], pattern=OWNER_KEY_PATTERN)
    info = schema.setdefault("info", {})
    info["description"] = info.get("description", "") + limits_table(limits)
    return schema


def install(app: FastAPI, limits: Limits) -> None:
    """Make app.openapi() build FastAPI's schema once, with the limits written in."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = document(schema, limits)
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
