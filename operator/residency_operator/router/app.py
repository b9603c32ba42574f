"""The router's HTTP app (FastAPI): routers by concern (openai_api.py, health.py), one error shape, and
the state they share (deps.py). Holds requests while a model loads or resumes, never drops silently."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from residency.httpguard import DEFAULT_MAX_BODY_BYTES, BodyLimit
from residency_operator.router import health, openai_api
from residency_operator.router.admission import Admission
from residency_operator.router.auth import Access, AccessError, OpenAccess, StaticTokenAccess
from residency_operator.router.deps import ArrivalTime, RouterSettings, RouterState, SafeJSONResponse, error
from residency_operator.router.forward import retry_after_seconds
from residency_operator.router.models import ModelTable
from residency_operator.router.refuse import EarlyRefusal

__all__ = ["ModelTable", "create_app", "retry_after_seconds"]


def create_app(
    table: ModelTable,
    hold_seconds: float = 60.0,
    token: str | None = None,
    worker_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    access: Access | None = None,
    admission: Admission | None = None,
) -> FastAPI:
    """The router: /v1/completions, /v1/chat/completions, /v1/models[/{id}], /healthz, /readyz, /metrics.

    `access` decides who may call what (KubernetesAccess in the chart); without it, `token` is one shared
    bearer token, and without that too the router is open (only apps built by hand in tests)."""
    if access is None:
        access = StaticTokenAccess(token) if token else OpenAccess()
    # No cap on connections to workers: admission (per model) bounds what is in flight, and each worker
    # bounds its own queue. A shared pool cap would instead queue requests here, blind to their model.
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(300.0, connect=5.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )
    state = RouterState(
        table=table,
        access=access,
        admission=admission or Admission(),
        settings=RouterSettings(hold_seconds, worker_token, max_body_bytes),
        client=client,
    )
    app = FastAPI(title="residency router", default_response_class=SafeJSONResponse)
    app.state.router = state
    app.add_middleware(EarlyRefusal, state=state)  # innermost of the three: its body is bounded
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(ArrivalTime)  # added last: outermost, the first to see a request
    app.include_router(openai_api.router)
    app.include_router(health.router)

    @app.exception_handler(AccessError)
    async def _on_access_error(_: Request, exc: AccessError) -> Response:
        state.metrics.requests.labels(str(exc.status)).inc()
        return error(exc.status, exc.message, exc.retry_after_seconds)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, exc: RequestValidationError) -> Response:
        return error(
            400, str(exc.errors()[0].get("msg", "invalid request")) if exc.errors() else "invalid request"
        )

    lag_watch: list[asyncio.Task[None]] = []

    @app.on_event("startup")
    async def watch_loop_lag() -> None:
        def observe(lag_seconds: float) -> None:
            state.event_loop_lag_seconds = lag_seconds
            state.metrics.event_loop_lag.observe(lag_seconds)

        lag_watch.append(asyncio.create_task(_watch_event_loop_lag(observe)))

    @app.on_event("shutdown")
    async def close_client() -> None:
        for task in lag_watch:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.aclose()

    return app


LAG_TICK_SECONDS = 0.1


async def _watch_event_loop_lag(observe: Callable[[float], None]) -> None:
    """Observes, every LAG_TICK_SECONDS, how late the event loop woke up (a starved or blocked router)."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(LAG_TICK_SECONDS)
        observe(max(0.0, time.monotonic() - before - LAG_TICK_SECONDS))
