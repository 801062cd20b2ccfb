"""The HTTP + WebSocket API of Lumos and its static viewer (system.md, "streams -> SignalR").

The app is a thin, untrusting shell around `lumos.cluster.client.LumosClient`: it parses and types
every input, applies the request-rate limits, checks the session's bearer token, and turns the
client's frame stream into WebSocket messages. The client checks every field against the one
`Limits` of the `ServeConfig` and admits sessions atomically through the store. The app never sees
tensors or Ray.

Auth. Each session has its own bearer token, returned once by `POST /api/sessions`. Every request
on a session sends `Authorization: Bearer <token>`; no route takes a token in its URL (the viewer
fetches frames and the mp4 with the header and shows them as blob: URLs). No token: 401. A token
that does not open this session, or an unknown session id: 404 with the same body, so a caller
cannot tell whether a session exists. `X-Lumos-Owner: <random key>` (kept by the browser) groups
one person's sessions; the server passes on only a salted sha256 of it, and `GET /api/sessions`
lists that owner's sessions, never their tokens.

Limits (values: `GET /api/config`, and in this schema). Fields out of range: 422 (413 for a body or
image over its size). Capacity: at most `max_sessions` sessions active (queued or generating) at
once, `max_sessions_per_owner` per owner key, `max_stored_sessions_per_owner` kept per owner key;
checked and reserved in one atomic step in the store, so concurrent requests never exceed them.
Rate: a token bucket per client address (`rate_per_s`, burst `rate_burst`) and per owner key
(`owner_rate_per_s`, burst `owner_rate_burst`) on create and extend. Beyond any of them: 429 with
`Retry-After` (seconds) and `{"error", "reason": "sessions_cap" | "owner_cap" | "rate_limit"}`;
a refused request changes nothing already stored.

Errors. Every error is JSON `{"error": "<message>"}` (validation errors add `details`): 400
malformed JSON or a refused request, 401 no token, 403 a wrong admin token, 404 unknown session /
wrong token / no such frame, 409 the session is still generating, 413 body or image too large, 422
a field out of range or of the wrong type (text that is not valid Unicode included), 429 a limit
(above), 503 the cluster failed.

WebSocket `/api/sessions/{id}/stream?from=k` (k: ASCII digits, default 0). The client first sends
the text message `{"type": "auth", "token": "<token>"}` (within 10 s). Then the server sends
`{"type": "frame", "seq", "png" (base64), "shape", "meta"}` for frames k.. exactly once and in
order (stored frames, then live, following later extends) and `{"type": "state", ...}` when the
status changes. Before closing on an error it sends `{"type": "error", "status", "error"}`; close
codes: 4400 a bad `from`; 4401 no auth message, a wrong token or an unknown session (the reason
"session not found" for both of the latter); 4410 the session was deleted; 4503 the stream failed.
A client that loses the socket (or sees the API restart) reconnects with from=<last seq + 1>.

Health. `GET /api/health` (public) answers `{"status": "ok" | "degraded", "workers": <live
workers>, "sessions": {"active", "limit"}}`: 200 when ok, 503 with a `reason` when no worker is
live. `GET /api/admin/health` with `Authorization: Bearer <admin token>` (ServeConfig.admin_token,
or env LUMOS_ADMIN_TOKEN) adds every worker's details, the 429 counts by reason and the limits;
without an admin token configured it answers 404, without a token 401, with a wrong one 403.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Header, Request, WebSocket
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lumos.api import metrics, openapi
from lumos.api.inputs import (
    Guard,
    RedactTokens,
    bearer,
    decode_image,
    error,
    max_image_chars,
    maybe,
)
from lumos.api.ratelimit import RateLimiter, retry_after
from lumos.api.schemas import (
    REFUSAL_REASONS,
    AdminHealth,
    CreateSessionRequest,
    CreateSessionResponse,
    ErrorBody,
    ExtendRequest,
    Health,
    RefusalBody,
    SessionList,
    SessionState,
    public_state,
)
from lumos.api.stream import serve_stream
from lumos.cluster.limits import InvalidRequest, Limits, TooLarge
from lumos.cluster.runtime import error_message as _message
from lumos.store import AdmissionRefused

if TYPE_CHECKING:
    from lumos.cluster.client import LumosClient
    from lumos.cluster.runtime import ServeConfig

log = logging.getLogger("lumos.api")

STATIC = Path(__file__).parent / "static"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch
OWNER_KEY = re.compile(r"[A-Za-z0-9_-]{16,128}")  # fullmatch
MAX_TOKEN_CHARS = 512
NOT_FOUND = "session not found (unknown id, or a token that does not open it)"
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' ws: wss:; "
        "style-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'"
    ),
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "malformed request"),
        (401, "no token"),
        (404, "unknown session or wrong token"),
        (409, "session busy"),
        (413, "too large"),
        (422, "invalid field"),
        (503, "cluster unavailable"),
    )
}
ERRORS[429] = {
    "model": RefusalBody,
    "description": "a capacity or rate limit: retry after Retry-After seconds",
    "headers": RETRY_AFTER,
}


class Refused(HTTPException):
    """A 429: carries the reason ("sessions_cap" | "owner_cap" | "rate_limit")."""

    def __init__(self, message: str, reason: str, retry_after_s: int) -> None:
        super().__init__(429, message, {"Retry-After": str(int(retry_after_s))})
        self.reason = reason


def owner_hash(key: str) -> str:
    """What the server stores for an owner key: a salted sha256, never the key itself."""
    return hashlib.sha256(b"lumos-owner\x00" + key.encode()).hexdigest()


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    prompts = state.get("prompts") or []
    prompt = state.get("prompt") or (prompts[0][1] if prompts else "")
    return {
        "id": state.get("id") or state.get("session_id"),
        "prompt": str(prompt),
        "n_frames": int(state.get("n_frames") or 0),
        "status": str(state.get("status")),
        "created": state.get("created_at") or state.get("created"),
        "updated": state.get("updated_at") or state.get("updated"),
    }


def create_app(cfg: ServeConfig | None = None, client: LumosClient | None = None) -> FastAPI:
    """Build the app. With client=None the lifespan starts `LumosClient.start(cfg)` and closes
    it on shutdown; a client passed in is used as is and left open (the caller owns it)."""
    if cfg is None and client is None:
        raise ValueError("create_app needs a ServeConfig (or an already started client)")
    source = cfg if cfg is not None else getattr(client, "cfg", None)
    limits = getattr(source, "limits", None) or Limits()
    admin_token = getattr(source, "admin_token", None)
    max_body = max_image_chars(limits) + 64 * 1024
    by_address = RateLimiter(limits.rate_per_s, limits.rate_burst)
    by_owner = RateLimiter(limits.owner_rate_per_s, limits.owner_rate_burst)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client is not None:
            app.state.client = client
            yield
            return
        from lumos.cluster.client import LumosClient

        started = await maybe(LumosClient.start(cfg))
        app.state.client = started
        try:
            yield
        finally:
            await maybe(started.close())

    app = FastAPI(
        title="Lumos",
        summary="Interactive autoregressive video generation",
        description=(__doc__ or "").split("\n\n", 1)[1],
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load from a CDN: /docs is static/docs.html instead
        redoc_url=None,
    )
    app.state.refusals = dict.fromkeys(REFUSAL_REASONS, 0)  # 429s by reason (metrics export it)
    app.add_middleware(Guard, max_body=max_body)
    metrics.install(app)  # GET /metrics (lumos.api.metrics)
    openapi.install(app, limits)  # the limits' values in /openapi.json
    for name in ("uvicorn.access", "uvicorn.error"):  # the latter logs WebSocket URLs
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())

    def cluster(request: Request | WebSocket) -> Any:
        return request.app.state.client

    async def call(coro: Awaitable[Any] | Any, *, conflict: bool = False) -> Any:
        """Await a client call, mapping its errors onto HTTP errors."""
        try:
            return await maybe(coro)
        except HTTPException:
            raise
        except AdmissionRefused as e:  # a capacity limit: nothing was stored, retry later
            raise Refused(str(e), e.reason, e.retry_after_s) from None
        except TooLarge as e:
            raise HTTPException(413, str(e)) from None
        except InvalidRequest as e:
            raise HTTPException(422, str(e)) from None
        except KeyError:
            raise HTTPException(404, NOT_FOUND) from None
        except ValueError as e:
            raise HTTPException(409 if conflict else 400, _message(e)) from None
        except Exception as e:
            log.exception("cluster call failed")
            raise HTTPException(503, f"cluster error: {_message(e)}") from None

    def rate_limit(request: Request, owner: str | None) -> None:
        """Take a token from the caller's address bucket and its owner's; 429 if either is out."""
        address = request.client.host if request.client else "unknown"
        wait = by_address.take(address)
        if wait:
            raise Refused(
                f"too many requests from this address (at most {limits.rate_per_s:g} creates "
                f"and extends per second, bursts of {limits.rate_burst}); retry in "
                f"{retry_after(wait)} s",
                "rate_limit",
                retry_after(wait),
            )
        wait = by_owner.take(owner) if owner else 0.0
        if wait:
            raise Refused(
                f"too many requests for this owner (at most {limits.owner_rate_per_s:g} creates "
                f"and extends per second, bursts of {limits.owner_rate_burst}); retry in "
                f"{retry_after(wait)} s",
                "rate_limit",
                retry_after(wait),
            )

    async def authorized(
        request: Request | WebSocket, session_id: str, token: str | None
    ) -> dict[str, Any]:
        """Check the token for the session and return its state; 401 / 404 otherwise."""
        if not token:
            raise HTTPException(
                401,
                "missing token: send Authorization: Bearer <token>",
                {"WWW-Authenticate": "Bearer"},
            )
        if not SESSION_ID.fullmatch(session_id) or len(token) > MAX_TOKEN_CHARS:
            raise HTTPException(404, NOT_FOUND)
        client_ = cluster(request)
        try:
            ok = bool(await maybe(client_.verify(session_id, token)))
        except (KeyError, ValueError):
            ok = False
        if not ok:
            raise HTTPException(404, NOT_FOUND)
        state = await call(client_.state(session_id))
        if state is None:
            raise HTTPException(404, NOT_FOUND)
        return state

    def owner_of(key: str | None, required: bool) -> str | None:
        if key is None:
            if required:
                raise HTTPException(400, "X-Lumos-Owner header required to list sessions")
            return None
        if not OWNER_KEY.fullmatch(key):
            raise HTTPException(
                400, "X-Lumos-Owner must be 16-128 characters of A-Z, a-z, 0-9, '-' or '_'"
            )
        return owner_hash(key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        extra = {}
        if isinstance(exc, Refused):
            refusals = request.app.state.refusals
            refusals[exc.reason] = refusals.get(exc.reason, 0) + 1
            extra["reason"] = exc.reason
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None), **extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error(400, "request body is not valid JSON")
        details = []
        for e in errors:
            loc = [str(part) for part in e.get("loc", ()) if part != "body"]
            details.append({"field": ".".join(loc), "message": e.get("msg"), "type": e.get("type")})
        text = "; ".join(
            f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details
        )
        return JSONResponse(
            jsonable_encoder({"error": text or "invalid request", "details": details}),
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, "internal server error")

    # -- pages -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> FileResponse:
        """The API reference, rendered from /openapi.json by static/docs.js (works offline)."""
        return FileResponse(STATIC / "docs.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- service -----------------------------------------------------------------------------

    async def health_report(request: Request) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the client's health report, the session counts or None if the store failed)."""
        client_ = cluster(request)
        try:
            report = dict(await maybe(client_.health()))
        except Exception as e:
            log.warning("health: %r", e)
            report = {"status": "unavailable", "reason": f"cluster error: {_message(e)}"}
        report["workers"] = [w for w in report.get("workers") or [] if w.get("alive", True)]
        try:
            active = int(await maybe(client_.store.active_count()))
            sessions = {"active": active, "limit": limits.max_sessions}
        except Exception as e:
            log.warning("health: the store failed: %r", e)
            sessions = None
            if report.get("status") == "ok":
                report["status"], report["reason"] = "unavailable", "the session store failed"
        if report.get("status") == "ok" and not report["workers"]:
            report["status"], report["reason"] = "unavailable", "no live worker"
        return report, sessions

    @app.get(
        "/api/health",
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: {"model": Health, "description": "degraded: see reason"}},
    )
    async def health(request: Request) -> Any:
        """Public liveness: ok/degraded and counts only (details: /api/admin/health)."""
        report, sessions = await health_report(request)
        body: dict[str, Any] = {"status": "ok", "workers": len(report["workers"])}
        if sessions is not None:
            body["sessions"] = sessions
        if report.get("status") != "ok":
            body["status"], body["reason"] = "degraded", str(report.get("reason") or "unavailable")
            return JSONResponse(body, status_code=503)
        return body

    @app.get(
        "/api/admin/health",
        response_model=AdminHealth,
        response_model_exclude_none=True,
        responses={
            401: {"model": ErrorBody, "description": "no admin token"},
            403: {"model": ErrorBody, "description": "a wrong admin token"},
            404: {"model": ErrorBody, "description": "no admin token is configured"},
            503: {"model": AdminHealth, "description": "degraded: see reason"},
        },
    )
    async def admin_health(request: Request, authorization: str | None = Header(None)) -> Any:
        """Operator view behind `Authorization: Bearer <admin token>`: every worker's details
        (names, hosts, devices, load), the 429 counts by reason and the limits."""
        if not admin_token:
            raise HTTPException(404, "Not Found")
        token = bearer(authorization)
        if not token:
            raise HTTPException(
                401,
                "missing admin token: send Authorization: Bearer <admin token>",
                {"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.encode(), admin_token.encode()):
            raise HTTPException(403, "wrong admin token")
        report, sessions = await health_report(request)
        body = {
            "status": "ok" if report.get("status") == "ok" else "degraded",
            "reason": report.get("reason"),
            "workers": jsonable_encoder(report["workers"]),
            "hosts": jsonable_encoder(report.get("hosts")),
            "sessions": sessions,
            "refusals": dict(request.app.state.refusals),
            "limits": limits.as_dict(),
        }
        if body["status"] != "ok":
            return JSONResponse(jsonable_encoder(body), status_code=503)
        return body

    model_name = str(getattr(cfg if cfg is not None else client, "model", None) or "bundled")

    @app.get("/api/config")
    async def config() -> dict[str, Any]:
        """The input limits of this server and its model (the viewer reads them): model_name is
        a folder, "bundled", or "random[:preset]"; random_weights true means it serves noise."""
        return {
            "limits": limits.as_dict(),
            "model": getattr(cfg, "model", None),
            "model_name": model_name,
            "random_weights": model_name.startswith("random"),
        }

    # -- sessions ----------------------------------------------------------------------------

    @app.post(
        "/api/sessions", status_code=201, response_model=CreateSessionResponse, responses=ERRORS
    )
    async def create_session(
        body: CreateSessionRequest,
        request: Request,
        x_lumos_owner: str | None = Header(None, description="the caller's private owner key"),
    ) -> dict[str, Any]:
        """Start a session and generate its first frames. The token is returned only here."""
        owner = owner_of(x_lumos_owner, required=False)
        rate_limit(request, owner)
        image = None
        if body.image is not None:
            image = await asyncio.to_thread(decode_image, body.image, limits)
        state, token = await call(
            cluster(request).create_session(
                prompt=body.prompt,
                frames=body.frames,
                steps=body.steps,
                cfg_scale=body.cfg,
                seed=body.seed,
                image_png=image,
                owner=owner or "anon-" + secrets.token_hex(16),
            )
        )
        state = public_state(state)
        return {"id": state["id"], "token": token, "state": state}

    @app.get("/api/sessions", response_model=SessionList, responses=ERRORS)
    async def list_sessions(
        request: Request,
        x_lumos_owner: str | None = Header(None, description="the caller's private owner key"),
    ) -> dict[str, Any]:
        """The caller's sessions, newest first (reopen them with the tokens you kept)."""
        owner = owner_of(x_lumos_owner, required=True)
        states = await call(cluster(request).list_sessions(owner))
        return {"sessions": [_summary(s) for s in states or []]}

    @app.get("/api/sessions/{session_id}", response_model=SessionState, responses=ERRORS)
    async def get_session(
        session_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        """The session's state."""
        return public_state(await authorized(request, session_id, bearer(authorization)))

    @app.post(
        "/api/sessions/{session_id}/extend",
        status_code=202,
        response_model=SessionState,
        responses=ERRORS,
    )
    async def extend_session(
        session_id: str,
        body: ExtendRequest,
        request: Request,
        authorization: str | None = Header(None),
    ) -> dict[str, Any]:
        """Generate more frames (optionally under a new prompt); they stream on the WebSocket."""
        state = await authorized(request, session_id, bearer(authorization))
        rate_limit(request, state.get("owner") or None)
        new = await call(
            cluster(request).extend(session_id, body.frames, body.prompt), conflict=True
        )
        return public_state(new)

    @app.post("/api/sessions/{session_id}/cancel", response_model=SessionState, responses=ERRORS)
    async def cancel_session(
        session_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        """Stop a running generation: the frames committed so far stay, the status is `done`."""
        await authorized(request, session_id, bearer(authorization))
        return public_state(await call(cluster(request).cancel(session_id)))

    @app.get(
        "/api/sessions/{session_id}/frames/{seq}.png",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    )
    async def frame_png(
        session_id: str,
        request: Request,
        seq: int = PathParam(ge=0, le=10**7),
        authorization: str | None = Header(None),
    ) -> Response:
        """One committed frame as PNG (bearer header only: no token in URLs)."""
        await authorized(request, session_id, bearer(authorization))
        records = await call(cluster(request).frames(session_id, seq, seq + 1))
        if not records or not records[0].pixels:
            raise HTTPException(404, f"frame {seq} does not exist (yet)")
        return Response(
            records[0].pixels, media_type="image/png", headers={"Cache-Control": "private"}
        )

    @app.get(
        "/api/sessions/{session_id}/video.mp4",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"video/mp4": {}}}},
    )
    async def video(
        session_id: str,
        request: Request,
        authorization: str | None = Header(None),
    ) -> Response:
        """Every committed frame of the session as an H.264 mp4 (bearer header only), streamed
        as it is encoded (a fragmented mp4; a long video is never held in memory)."""
        state = await authorized(request, session_id, bearer(authorization))
        if not int(state.get("n_frames") or 0):
            raise HTTPException(409, "the session has no frames yet")
        chunks = cluster(request).video_mp4(session_id)
        first = await call(anext(chunks), conflict=True)  # errors become HTTP errors here

        async def body() -> AsyncIterator[bytes]:
            yield first
            async for chunk in chunks:
                yield chunk

        return StreamingResponse(
            body(),
            media_type="video/mp4",
            headers={
                "Content-Disposition": f'attachment; filename="lumos-{session_id}.mp4"',
                "Cache-Control": "private, no-store",
            },
        )

    @app.delete("/api/sessions/{session_id}", status_code=204, responses=ERRORS)
    async def delete_session(
        session_id: str, request: Request, authorization: str | None = Header(None)
    ) -> Response:
        """Delete the session and all its frames."""
        await authorized(request, session_id, bearer(authorization))
        await call(cluster(request).delete_session(session_id))
        return Response(status_code=204)

    # -- streaming ---------------------------------------------------------------------------

    @app.websocket("/api/sessions/{session_id}/stream")
    async def stream(websocket: WebSocket, session_id: str) -> None:
        """Auth message first; then frames from ?from= on, exactly once and in order, live
        frames and state changes (lumos.api.stream; close codes in the module docstring)."""
        await serve_stream(websocket, session_id, authorized)

    return app
