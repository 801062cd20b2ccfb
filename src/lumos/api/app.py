"""The HTTP + WebSocket API of Lumos and its static viewer (system.md, "streams -> SignalR").

The app is a thin, untrusting shell around `lumos.cluster.client.LumosClient`: it validates every
input against the limits of the `ServeConfig`, checks the session's bearer token, and turns the
client's frame stream into WebSocket messages. It never sees tensors or Ray.

Auth. Each session has its own bearer token, returned once by `POST /api/sessions`. Requests on a
session send `Authorization: Bearer <token>`; the WebSocket and the links a browser follows
(frame PNGs, the mp4) may pass `?token=` instead. No token at all: 401. A token that does not open
this session, or an unknown session id: 404 with the same body, so a caller cannot tell whether a
session exists. `X-Lumos-Owner: <random key>` (kept by the browser) groups one person's sessions;
the server passes on only a salted sha256 of it, and `GET /api/sessions` lists that owner's
sessions, never their tokens.

Errors. Every error is JSON `{"error": "<message>"}` (validation errors add `details`): 400
malformed JSON or a refused request, 401 no token, 404 unknown session / wrong token / no such
frame, 409 the session is still generating, 413 body or image too large, 422 a field out of
range or of the wrong type, 429 too many sessions generating (retry later), 503 the cluster
failed.

WebSocket `/api/sessions/{id}/stream?token=..&from=k` sends `{"type": "frame", "seq", "png"
(base64), "shape", "meta"}` for frames k.. exactly once and in order (stored frames, then live,
following later extends), `{"type": "state", ...}` when the status changes, and `{"type":
"error", "status", "error"}` before closing with code 4000 + status. A client that loses the socket
(or sees the API restart) reconnects with from=<last seq + 1>.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import inspect
import io
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.websockets import WebSocketState

from lumos.api import metrics
from lumos.api.schemas import (
    CreateSessionRequest,
    CreateSessionResponse,
    ErrorBody,
    ExtendRequest,
    Health,
    Limits,
    SessionList,
    SessionState,
)

if TYPE_CHECKING:
    from lumos.cluster.client import LumosClient
    from lumos.cluster.runtime import ServeConfig

log = logging.getLogger("lumos.api")

STATIC = Path(__file__).parent / "static"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
OWNER_KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
MAX_TOKEN_CHARS = 512
MAX_FORWARD_SIDE = 1024  # images are shrunk to this side before going to the cluster
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
STATE_KEYS = tuple(SessionState.model_fields)
STATE_POLL_S = 0.5
NOT_FOUND = "session not found (unknown id, or a token that does not open it)"
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' ws: wss:; "
        "style-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'"
    ),
}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "malformed request"),
        (401, "no token"),
        (404, "unknown session or wrong token"),
        (409, "session busy"),
        (413, "too large"),
        (422, "invalid field"),
        (429, "the cluster is at capacity"),
        (503, "cluster unavailable"),
    )
}


async def _maybe(value: Any) -> Any:
    """Await value if it is awaitable (the client's methods are coroutines; tolerate plain ones)."""
    return await value if inspect.isawaitable(value) else value


def _message(exc: BaseException) -> str:
    """A one-line message for an exception raised by the cluster (innermost cause preferred)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def owner_hash(key: str) -> str:
    """What the server stores for an owner key: a salted sha256, never the key itself."""
    return hashlib.sha256(b"lumos-owner\x00" + key.encode()).hexdigest()


def public_state(state: dict[str, Any]) -> dict[str, Any]:
    """The fields of a client state dict a token holder may see (drops anything internal)."""
    out = {key: state.get(key) for key in STATE_KEYS}
    out["id"] = state.get("id") or state.get("session_id")
    out["n_frames"] = int(out["n_frames"] or 0)
    out["target"] = None if out["target"] is None else int(out["target"])
    out["prompts"] = [list(p) for p in (out["prompts"] or [])]
    out["settings"] = dict(out["settings"] or {})
    return jsonable_encoder(out)


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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def decode_image(text: str, limits: Limits) -> bytes:
    """Base64 PNG/JPEG (or a data: URL of one) -> validated PNG bytes; HTTPException if bad."""
    from PIL import Image, UnidentifiedImageError

    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not re.fullmatch(r"data:image/(png|jpeg|jpg);base64", header):
            raise HTTPException(422, "image: a data URL must be data:image/png|jpeg;base64,...")
    text = "".join(text.split())
    if len(text) > (limits.max_image_bytes + 2) // 3 * 4:
        raise HTTPException(413, f"image: larger than the limit of {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "image: not valid base64") from None
    if len(data) > limits.max_image_bytes:
        raise HTTPException(413, f"image: larger than the limit of {limits.max_image_bytes} bytes")
    if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
        raise HTTPException(422, "image: not a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if max(width, height) > limits.max_image_side or min(width, height) < 1:
                raise HTTPException(
                    422,
                    f"image: {width}x{height} pixels; each side must be 1..{limits.max_image_side}",
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            rgb.thumbnail((MAX_FORWARD_SIDE, MAX_FORWARD_SIDE))  # bounds the PNG passed on
    except HTTPException:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise HTTPException(422, "image: not a readable PNG or JPEG image") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


class _Guard:
    """ASGI middleware: cap request bodies (413) and add security headers to every response."""

    def __init__(self, app: Any, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            too_large = _error(413, f"request body larger than {self.max_body} bytes")
            if length is not None:
                if not length.isdigit():
                    await _error(400, "bad Content-Length")(scope, receive, send_with_headers)
                    return
                if int(length) > self.max_body:
                    await too_large(scope, receive, send_with_headers)
                    return
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    await too_large(scope, receive, send_with_headers)
                    return
                if not message.get("more_body", False):
                    break
            body, replayed = b"".join(chunks), False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


class _RedactTokens(logging.Filter):
    """Hide `token=` query values in access logs (the WebSocket and mp4 links carry them)."""

    pattern = re.compile(r"(token=)[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self.pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def create_app(cfg: ServeConfig | None = None, client: LumosClient | None = None) -> FastAPI:
    """Build the app. With client=None the lifespan starts `LumosClient.start(cfg)` and closes
    it on shutdown; a client passed in is used as is and left open (the caller owns it)."""
    if cfg is None and client is None:
        raise ValueError("create_app needs a ServeConfig (or an already started client)")
    limits = Limits.from_config(cfg if cfg is not None else getattr(client, "cfg", None))
    max_body = (limits.max_image_bytes + 2) // 3 * 4 + 64 * 1024

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client is not None:
            app.state.client = client
            yield
            return
        from lumos.cluster.client import LumosClient

        started = await _maybe(LumosClient.start(cfg))
        app.state.client = started
        try:
            yield
        finally:
            await _maybe(started.close())

    app = FastAPI(
        title="Lumos",
        summary="Interactive autoregressive video generation",
        description=(__doc__ or "").split("\n\n", 1)[1],
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load from a CDN: /docs is static/docs.html instead
        redoc_url=None,
    )
    app.add_middleware(_Guard, max_body=max_body)
    metrics.install(app)  # GET /metrics (lumos.api.metrics)
    for name in ("uvicorn.access", "uvicorn.error"):  # the latter logs WebSocket URLs
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactTokens) for f in logger.filters):
            logger.addFilter(_RedactTokens())

    try:
        from lumos.cluster.client import LimitExceeded

        capacity_errors: tuple[type[BaseException], ...] = (LimitExceeded,)
    except ImportError:  # a build without the cluster package (a test client is passed in)
        capacity_errors = ()

    def cluster(request: Request | WebSocket) -> Any:
        return request.app.state.client

    async def call(coro: Awaitable[Any] | Any, *, conflict: bool = False) -> Any:
        """Await a client call, mapping its errors onto HTTP errors."""
        try:
            return await _maybe(coro)
        except HTTPException:
            raise
        except KeyError:
            raise HTTPException(404, NOT_FOUND) from None
        except ValueError as e:
            if isinstance(e, capacity_errors):  # the cluster is at capacity: retry later
                raise HTTPException(429, _message(e), {"Retry-After": "5"}) from None
            raise HTTPException(409 if conflict else 400, _message(e)) from None
        except Exception as e:
            log.exception("cluster call failed")
            raise HTTPException(503, f"cluster error: {_message(e)}") from None

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
        if not SESSION_ID.match(session_id) or len(token) > MAX_TOKEN_CHARS:
            raise HTTPException(404, NOT_FOUND)
        client_ = cluster(request)
        try:
            ok = bool(await _maybe(client_.verify(session_id, token)))
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
        if not OWNER_KEY.match(key):
            raise HTTPException(
                400, "X-Lumos-Owner must be 16-128 characters of A-Z, a-z, 0-9, '-' or '_'"
            )
        return owner_hash(key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "request body is not valid JSON")
        details = []
        for e in errors:
            loc = [str(part) for part in e.get("loc", ()) if part != "body"]
            details.append({"field": ".".join(loc), "message": e.get("msg"), "type": e.get("type")})
        text = "; ".join(
            f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details
        )
        return JSONResponse(
            {"error": text or "invalid request", "details": details}, status_code=422
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal server error")

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

    @app.get("/api/health", response_model=Health, responses=ERRORS)
    async def health(request: Request) -> dict[str, Any]:
        """Liveness and the cluster's workers."""
        workers = await call(cluster(request).workers())
        return {"status": "ok", "workers": jsonable_encoder(list(workers))}

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
        owner = owner_of(x_lumos_owner, required=False) or "anon-" + secrets.token_hex(16)
        prompt = body.prompt.strip()
        for problem in (
            limits.prompt_error(prompt, required=True),
            limits.frames_error(body.frames, 1 if body.image is not None else 0),
            limits.settings_error(body.steps, body.cfg),
        ):
            if problem:
                raise HTTPException(422, problem)
        image = None
        if body.image is not None:
            image = await asyncio.to_thread(decode_image, body.image, limits)
        state, token = await call(
            cluster(request).create_session(
                prompt=prompt,
                frames=body.frames,
                steps=body.steps,
                cfg_scale=body.cfg,
                seed=body.seed,
                image_png=image,
                owner=owner,
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
        return public_state(await authorized(request, session_id, _bearer(authorization)))

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
        state = await authorized(request, session_id, _bearer(authorization))
        prompt = (body.prompt or "").strip() or None
        problem = limits.prompt_error(prompt or "", required=False) or limits.frames_error(
            body.frames, int(state.get("n_frames") or 0)
        )
        if problem:
            raise HTTPException(422, problem)
        if state.get("status") in ("queued", "running"):
            raise HTTPException(409, "the session is still generating; extend it when it is done")
        new = await call(cluster(request).extend(session_id, body.frames, prompt), conflict=True)
        return public_state(new)

    @app.post("/api/sessions/{session_id}/cancel", response_model=SessionState, responses=ERRORS)
    async def cancel_session(
        session_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        """Stop a running generation: the frames committed so far stay, the status is `done`."""
        await authorized(request, session_id, _bearer(authorization))
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
        token: str | None = Query(None, description="the session token (for <img> links)"),
    ) -> Response:
        """One committed frame as PNG."""
        await authorized(request, session_id, _bearer(authorization) or token)
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
        token: str | None = Query(None, description="the session token (for download links)"),
    ) -> Response:
        """Every committed frame of the session as an H.264 mp4."""
        state = await authorized(request, session_id, _bearer(authorization) or token)
        if not int(state.get("n_frames") or 0):
            raise HTTPException(409, "the session has no frames yet")
        data = await call(cluster(request).video_mp4(session_id), conflict=True)
        return Response(
            data,
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
        await authorized(request, session_id, _bearer(authorization))
        await call(cluster(request).delete_session(session_id))
        return Response(status_code=204)

    # -- streaming ---------------------------------------------------------------------------

    @app.websocket("/api/sessions/{session_id}/stream")
    async def stream(websocket: WebSocket, session_id: str) -> None:
        """Frames from ?from= on, exactly once and in order; then live frames and state changes."""
        await websocket.accept()
        lock = asyncio.Lock()

        async def send(message: dict[str, Any]) -> None:
            async with lock:
                await websocket.send_json(message)

        async def fail(status: int, message: str) -> None:
            with contextlib.suppress(Exception):
                await send({"type": "error", "status": status, "error": message})
                await websocket.close(code=4000 + status, reason=message[:100])

        raw_from = websocket.query_params.get("from", "0")
        if not raw_from.isdigit() or len(raw_from) > 9:
            await fail(400, "from must be a non-negative integer")
            return
        token = websocket.query_params.get("token") or _bearer(
            websocket.headers.get("authorization")
        )
        try:
            state = await authorized(websocket, session_id, token)
        except HTTPException as e:
            await fail(e.status_code, str(e.detail))
            return
        client_ = cluster(websocket)
        next_seq = int(raw_from)

        async def send_frame(record: Any) -> None:
            nonlocal next_seq
            get = record.get if isinstance(record, dict) else lambda k: getattr(record, k, None)
            seq = int(get("seq"))
            if seq < next_seq:
                return  # already sent: exactly once
            if seq > next_seq:  # a gap in the live stream: fill it from the store, in order
                for missed in await _maybe(client_.frames(session_id, next_seq, seq)):
                    await send_frame(missed)
                if seq != next_seq:
                    raise RuntimeError(f"frames {next_seq}..{seq - 1} are missing from the store")
            shape = get("shape")
            await send(
                {
                    "type": "frame",
                    "seq": seq,
                    "png": base64.b64encode(bytes(get("pixels") or b"")).decode("ascii"),
                    "shape": list(shape) if shape is not None else None,
                    "meta": jsonable_encoder(get("meta") or {}),
                }
            )
            metrics.observe_frame_sent(websocket, record, state)
            next_seq = seq + 1

        async def pump() -> str:
            events = client_.subscribe(session_id, from_seq=next_seq, follow=True)
            if inspect.isawaitable(events):
                events = await events
            try:
                async for event in events:
                    if isinstance(event, dict) and "pixels" not in event:
                        await send({"type": "state", **public_state(event)})
                    else:
                        await send_frame(event)
            finally:
                with contextlib.suppress(Exception):
                    await _maybe(events.aclose())
            return "ended"

        async def watch(last: dict[str, Any]) -> str:
            def key(s: dict[str, Any]) -> tuple:
                return (s.get("status"), s.get("error"), len(s.get("prompts") or []))

            previous = key(last)
            while True:
                await asyncio.sleep(STATE_POLL_S)
                try:
                    now = await _maybe(client_.state(session_id))
                except KeyError:
                    now = None
                except Exception as e:  # transient: the frame stream goes on regardless
                    log.warning("state of %s: %r", session_id, e)
                    continue
                if now is None:
                    return "deleted"
                if key(now) != previous:
                    previous = key(now)
                    await send({"type": "state", **public_state(now)})

        async def receive() -> str:
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()
            return "disconnected"

        await send({"type": "state", **public_state(state)})
        outcome: list[tuple[str | None, Exception | None]] = []

        async def first(fn: Callable[[], Awaitable[str]], tg: Any) -> None:
            try:
                outcome.append((await fn(), None))
            except Exception as e:
                outcome.append((None, e))
            tg.cancel_scope.cancel()  # the first task to finish ends the stream

        async with anyio.create_task_group() as tg:
            tg.start_soon(first, pump, tg)
            tg.start_soon(first, lambda: watch(state), tg)
            tg.start_soon(first, receive, tg)
        result, exc = outcome[0] if outcome else ("cancelled", None)
        if exc is not None:
            if isinstance(exc, WebSocketDisconnect) or (
                websocket.client_state != WebSocketState.CONNECTED
            ):
                return
            if isinstance(exc, KeyError):
                await fail(404, NOT_FOUND)
            else:
                log.error("stream of %s failed: %r", session_id, exc)
                await fail(503, f"stream failed: {_message(exc)}")
        elif result == "deleted":
            await fail(404, "session was deleted")
        elif result == "ended":
            with contextlib.suppress(Exception):
                await websocket.close(code=1000)

    return app
