"""One error shape for both HTTP apps, as OpenAI's API answers: ``{"error": {message, type, param, code}}``.

``type`` follows the HTTP status the way OpenAI's API uses it (the official clients map statuses to
exception classes, not types); ``code`` is a string naming the reason (the engine's reason, e.g.
``QueueFull``, ``ModelPreempted``) or None; ``param`` names the offending request field or is None.
No framework import: the ASGI guards use it too.
"""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
}


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The body of an error answer (or of an SSE error event, with the status the answer would have had)."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
