"""The worker's one error shape (OpenAI's, see residency.openai_errors) and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from residency.httpguard import DEFAULT_MAX_BODY_BYTES, json_bytes
from residency.openai_errors import error_body
from residency_worker.engine import EngineError

_STATUS_OF_REASON = {
    "PathNotAllowed": 403,
    "ModelNotLoaded": 404,
    "ModelNotFound": 404,
    "ModelAlreadyLoaded": 409,
    "InvalidState": 409,
    "PlacementDoesNotFit": 409,
    "QueueFull": 429,
    "ModelPreempted": 503,
    "ModelUnloaded": 503,
    "GpuLost": 503,
    "InferenceFailed": 500,
}


@dataclass(frozen=True)
class ServerSettings:
    admin_token: str | None = None  # None: the admin API refuses every call
    inference_token: str | None = None  # None: inference is open (e.g. behind a cluster network policy)
    preempted_wait_seconds: float = 10.0  # how long a request to a preempted model waits for resume
    retry_after_seconds: int = 5
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before parsing


class SafeJSONResponse(JSONResponse):
    """JSON that renders whatever user input an error echoes (lone surrogates, NaN) instead of failing."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


class ApiError(Exception):
    """An error answer: HTTP status, a reason code (e.g. the engine's), a message, the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after_seconds: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_seconds = retry_after_seconds
        self.param = param


def invalid(message: str, param: str | None = None) -> ApiError:
    """A 400 for a request the worker will not serve as sent."""
    return ApiError(400, "InvalidRequest", message, param=param)


def api_error(exc: EngineError, settings: ServerSettings) -> ApiError:
    status = _STATUS_OF_REASON.get(exc.reason, 400)
    retry = exc.retry_after_seconds
    if status in (429, 503) and retry is None:
        retry = settings.retry_after_seconds
    return ApiError(status, exc.reason, exc.message, retry)


def error_response(exc: ApiError) -> SafeJSONResponse:
    headers = {}
    if exc.retry_after_seconds is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_seconds)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = error_body(exc.status, exc.message, exc.code, exc.param)
    return SafeJSONResponse(body, status_code=exc.status, headers=headers)


def validation_error(exc: RequestValidationError) -> SafeJSONResponse:
    """400 (as OpenAI answers) naming the first offending field; the offending input is not echoed back."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    location = list(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        field = None
        where = location[-1] if location else 0
        message = f"the request body is not valid JSON ({first.get('msg', '')} at {where})"
    else:
        field = ".".join(str(part) for part in location if part != "body") or None
        message = f"{field}: {first.get('msg', '')}" if field else str(first.get("msg", "invalid request"))
    return error_response(ApiError(400, "InvalidRequest", message, param=field))
