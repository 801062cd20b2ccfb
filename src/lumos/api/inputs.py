"""What the API does to raw input before a route sees it: the body cap and security headers
(`Guard`), bearer-token parsing, image decoding, and hiding stray `token=` values in logs.

Field limits themselves are `lumos.cluster.limits.Limits` (checked once, by the client); this
module only turns transport forms (base64, data: URLs, headers) into values those checks take.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import logging
import re
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lumos.cluster.limits import InvalidRequest, Limits, TooLarge

DATA_URL = re.compile(r"data:image/(png|jpeg|jpg);base64")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


async def maybe(value: Any) -> Any:
    """Await value if it is awaitable (the client's methods are coroutines; tolerate plain ones)."""
    return await value if inspect.isawaitable(value) else value


def error(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The JSON error body every route answers with: {"error": message, **extra}."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def max_image_chars(limits: Limits) -> int:
    """The longest base64 text of an image within the limit (plus a data: URL header)."""
    return (limits.max_image_bytes + 2) // 3 * 4 + len("data:image/jpeg;base64,")


def decode_image(text: str, limits: Limits) -> bytes:
    """Base64 PNG/JPEG (or a data: URL of one) -> its validated bytes; HTTPException if bad."""
    from PIL import Image

    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not DATA_URL.fullmatch(header):
            raise HTTPException(422, "image: a data URL must be data:image/png|jpeg;base64,...")
    text = "".join(text.split())
    if len(text) > (limits.max_image_bytes + 2) // 3 * 4:
        raise HTTPException(413, f"image: larger than the limit of {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "image: not valid base64") from None
    try:
        limits.check_image(data)
    except TooLarge as e:
        raise HTTPException(413, str(e)) from None
    except InvalidRequest as e:
        raise HTTPException(422, str(e)) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")  # every pixel decodes (verify() alone misses truncated files)
    except Exception:
        raise HTTPException(422, "image is not a decodable PNG or JPEG file") from None
    # the original bytes (within max_image_bytes and max_image_side) go on unchanged: the
    # worker resizes them with video.decode_image, the same rule as `lumos generate --image`
    return data


class Guard:
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
            too_large = error(413, f"request body larger than {self.max_body} bytes")
            if length is not None:
                if not length.isdigit() or len(length) > 18:
                    await error(400, "bad Content-Length")(scope, receive, send_with_headers)
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


class RedactTokens(logging.Filter):
    """Hide `token=` query values in access logs. No route takes a token in its URL; this keeps
    one a client put there anyway out of the logs."""

    pattern = re.compile(r"(token=)[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self.pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True
