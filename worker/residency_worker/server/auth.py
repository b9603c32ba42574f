"""Bearer tokens of the worker: the admin API takes the admin token, inference the router's token, probes
none. `TokenGate` checks before the app reads a body; the routes' dependencies check again."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from residency.httpguard import AsgiApp, Receive, Scope, Send, bearer_matches
from residency_worker.server.errors import ApiError, ServerSettings, error_response

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
"""Probes: kubelets carry no token, and they name no model."""
SCHEMA_PATH = "/openapi.json"
METRICS_PATH = "/metrics"


def _check_token(request: Request, expected: str | None, *, required: bool) -> None:
    if expected is None:
        if required:
            raise ApiError(401, "Unauthorized", "the admin API is disabled: no admin token is configured")
        return
    if not bearer_matches(request.headers.get("authorization", ""), expected):
        raise ApiError(401, "Unauthorized", "a valid bearer token is required")


def check_admin(request: Request, settings: ServerSettings) -> None:
    _check_token(request, settings.admin_token, required=True)


def check_inference(request: Request, settings: ServerSettings) -> None:
    _check_token(request, settings.inference_token, required=False)


def _check_either(request: Request, settings: ServerSettings) -> None:
    tokens = [t for t in (settings.admin_token, settings.inference_token) if t is not None]
    authorization = request.headers.get("authorization", "")
    if not any(bearer_matches(authorization, token) for token in tokens):
        raise ApiError(401, "Unauthorized", "a valid bearer token is required")


def check_metrics(request: Request, settings: ServerSettings) -> None:
    """/metrics names the models: as private as inference (open only where inference is open, as
    /v1/models is), for a holder of either token."""
    if settings.inference_token is not None:
        _check_either(request, settings)


def check_schema(request: Request, settings: ServerSettings) -> None:
    """The API's own description (it names every admin route): for a holder of either configured token."""
    if settings.admin_token is None and settings.inference_token is None:
        raise ApiError(401, "Unauthorized", "the API schema is disabled: no token is configured")
    _check_either(request, settings)


def _route_path(scope: Scope) -> str:
    """The path the app routes on: without the root path a proxy mounted it under (as Starlette does)."""
    path = str(scope["path"])
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def guard_of(path: str) -> Callable[[Request, ServerSettings], None] | None:
    """The token check a request for `path` must pass before the app reads anything of it (None: open).

    Paths outside the admin API, the schema, metrics and the probes (the /v1 API, and any unknown path)
    take the inference token, so a new route is never open by omission."""
    if path in PUBLIC_PATHS:
        return None
    if path == "/admin" or path.startswith("/admin/"):
        return check_admin
    if path == SCHEMA_PATH:
        return check_schema
    if path == METRICS_PATH:
        return check_metrics
    return check_inference


class TokenGate:
    """ASGI middleware: a request proves its bearer token before the app reads its body, so a caller
    without one gets 401 whatever it sends (not a 400 describing what its body lacks), and FastAPI's
    request parsing never runs for it. The routes keep their own checks too (defence in depth)."""

    def __init__(self, app: AsgiApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = guard_of(_route_path(scope))
        if guard is not None:
            try:
                guard(Request(scope), self.settings)
            except ApiError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
