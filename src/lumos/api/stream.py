"""The WebSocket stream of a session: `/api/sessions/{id}/stream?from=k` (see lumos.api.app).

The client sends `{"type": "auth", "token": "<token>"}` as its first text message within
AUTH_TIMEOUT_S; then the server sends the frames from k on exactly once and in order (stored,
then live, following later extends) and a state message whenever the status changes. Close
codes: 4400 a `from` that is not 1-9 ASCII digits; 4401 no auth message, or a wrong token / an
unknown session (one reason for both, "session not found", so the socket is no oracle); 4410
the session was deleted; 4503 the stream failed; 1000 the server is done. Each 44xx/45xx close
is preceded by `{"type": "error", "status": code - 4000, "error": message}`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi import WebSocket
from fastapi.encoders import jsonable_encoder
from starlette.exceptions import HTTPException
from starlette.websockets import WebSocketState

from lumos.api import metrics
from lumos.api.inputs import maybe
from lumos.api.schemas import public_state
from lumos.cluster.runtime import error_message

log = logging.getLogger("lumos.api")

AUTH_TIMEOUT_S = 10.0  # a WebSocket must send its auth message within this
MAX_AUTH_MESSAGE = 4096
STATE_POLL_S = 0.5
WS_NOT_FOUND = "session not found"  # the close reason of a wrong token and of an unknown id
WS_AUTH = 'auth required: send {"type": "auth", "token": "<token>"} first'

Authorize = Callable[[Any, str, "str | None"], Awaitable[dict[str, Any]]]


async def serve_stream(websocket: WebSocket, session_id: str, authorized: Authorize) -> None:
    """Run one stream. authorized(websocket, session_id, token) returns the session's state or
    raises HTTPException (401 / 404 / 503), as the HTTP routes' check does."""
    await websocket.accept()
    lock = asyncio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with lock:
            await websocket.send_json(message)

    async def fail(code: int, message: str) -> None:
        with contextlib.suppress(Exception):
            await send({"type": "error", "status": code - 4000, "error": message})
            await websocket.close(code=code, reason=message[:120])

    raw_from = websocket.query_params.get("from", "0")
    if not (raw_from.isascii() and raw_from.isdigit()) or len(raw_from) > 9:
        await fail(4400, "from must be a frame number: 1 to 9 ASCII digits (0-9)")
        return
    try:
        first_message = await asyncio.wait_for(websocket.receive(), AUTH_TIMEOUT_S)
    except TimeoutError:
        await fail(4401, WS_AUTH)
        return
    if first_message["type"] == "websocket.disconnect":
        return
    token = _auth_token(first_message.get("text"))
    if token is None:
        await fail(4401, WS_AUTH)
        return
    try:
        state = await authorized(websocket, session_id, token)
    except HTTPException as e:
        if e.status_code in (401, 404):
            await fail(4401, WS_NOT_FOUND)
        else:
            await fail(4000 + e.status_code, str(e.detail))
        return
    client_ = websocket.app.state.client
    next_seq = int(raw_from)

    async def send_frame(record: Any) -> None:
        nonlocal next_seq
        get = record.get if isinstance(record, dict) else lambda k: getattr(record, k, None)
        seq = int(get("seq"))
        if seq < next_seq:
            return  # already sent: exactly once
        if seq > next_seq:  # a gap in the live stream: fill it from the store, in order
            for missed in await maybe(client_.frames(session_id, next_seq, seq)):
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
                await maybe(events.aclose())
        return "ended"

    async def watch(last: dict[str, Any]) -> str:
        def key(s: dict[str, Any]) -> tuple:
            return (s.get("status"), s.get("error"), len(s.get("prompts") or []))

        previous = key(last)
        while True:
            await asyncio.sleep(STATE_POLL_S)
            try:
                now = await maybe(client_.state(session_id))
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
        while True:  # the client sends nothing more; text or bytes are ignored
            if (await websocket.receive())["type"] == "websocket.disconnect":
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
        if websocket.client_state != WebSocketState.CONNECTED:
            return
        if isinstance(exc, KeyError):
            await fail(4410, "session was deleted")
        else:
            log.error("stream of %s failed: %r", session_id, exc)
            await fail(4503, f"stream failed: {error_message(exc)}")
    elif result == "deleted":
        await fail(4410, "session was deleted")
    elif result == "ended":
        with contextlib.suppress(Exception):
            await websocket.close(code=1000)


def _auth_token(text: str | None) -> str | None:
    """The token of a WebSocket's first message {"type": "auth", "token": "..."}, or None."""
    if not isinstance(text, str) or len(text) > MAX_AUTH_MESSAGE:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") != "auth":
        return None
    token = data.get("token")
    return token if isinstance(token, str) and token else None
