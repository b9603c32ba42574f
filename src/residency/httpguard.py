"""HTTP input guards shared by the worker's and the router's apps (plain ASGI and JSON; no framework import).

- `BodyLimit`: an ASGI middleware that answers 413 to a request body over a byte limit, whether the client
  declared its length or streams it, before the app parses anything.
- `json_bytes`: renders a response body that is always valid JSON, even when it echoes user input holding
  lone surrogates or non-finite floats (which `json.dumps(..., allow_nan=False)` and UTF-8 refuse).
- `loads_strict`: parses a request body as RFC 8259 JSON: no NaN/Infinity, no lone surrogates.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from residency.openai_errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
"""16 MiB: a 1M-token prompt as token ids, with room to spare."""


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as strings and lone surrogates escaped, so that it encodes as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_finite(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_bytes(content: Any) -> bytes:
    """UTF-8 JSON of `content`; user input echoed in it (bad Unicode, NaN) is made printable, never fatal."""
    try:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except (ValueError, UnicodeEncodeError):  # ValueError: NaN or Infinity
        return json.dumps(
            _finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=str
        ).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(body: bytes) -> Any:
    """Parses JSON the way RFC 8259 defines it; raises ValueError (with a reason) for anything else."""
    value = json.loads(body, parse_constant=_no_constant)
    if _has_surrogate(value):
        raise ValueError("a string holds a lone UTF-16 surrogate (invalid Unicode)")
    return value


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 with a JSON error; the app never sees it."""

    def __init__(self, app: AsgiApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._refuse(send, 400, "Content-Length is not a number")
                return
            if length > self.max_bytes:
                await self._too_large(send)
                return
        # read (and count) the body here, so a streamed body without a declared length is bounded too
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        await self.app(scope, replayed(body, receive), send)

    async def _too_large(self, send: Send) -> None:
        await self._refuse(send, 413, f"the request body exceeds the limit of {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        code = "RequestTooLarge" if status == 413 else "InvalidRequest"
        body = json_bytes(error_body(status, message, code))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def bearer_matches(authorization: str, expected: str) -> bool:
    """Whether an ``Authorization`` header carries ``expected`` as its bearer token (the scheme's case does
    not matter, RFC 7235; the token is compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


def replayed(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app a body already read, whole, then waits on the real one (for the
    disconnect, as the server would)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
