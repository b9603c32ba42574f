"""What the router's endpoints share: settings, state, metrics, the error shape and the auth dependency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from residency.heap import GcPauseMetric
from residency.httpguard import DEFAULT_MAX_BODY_BYTES, json_bytes
from residency.openai_errors import error_body
from residency_operator.router.admission import Admission
from residency_operator.router.auth import Access, AccessError, Caller
from residency_operator.router.models import ModelTable

ARRIVED_AT = "arrived_at"
"""`request.state.arrived_at`: when the request reached the router's app (monotonic; see ArrivalTime)."""


class ArrivalTime:
    """ASGI middleware, outermost: stamps when each request reached the app, so that a time to first token
    counts what the router itself spent on the request (body, auth, a busy event loop)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[ARRIVED_AT] = time.monotonic()
        await self.app(scope, receive, send)


class SafeJSONResponse(JSONResponse):
    """JSON that renders whatever user input an error echoes (lone surrogates, NaN) instead of failing."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def error(
    status_code: int,
    message: str,
    retry_after_seconds: int | None = None,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error answer in OpenAI's shape."""
    headers = {"Retry-After": str(retry_after_seconds)} if retry_after_seconds is not None else {}
    if status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return SafeJSONResponse(error_body(status_code, message, code, param), status_code, headers=headers)


class RouterMetrics:
    """Prometheus metrics of one router (their model labels are why /metrics needs a caller's right)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "residency_router_requests", "Requests by outcome", ["outcome"], registry=self.registry
        )
        self.held_seconds = Histogram(
            "residency_router_hold_seconds", "Time requests waited for a model", registry=self.registry
        )
        self.admitted = Counter(
            "residency_router_admitted", "Requests admitted to a model", ["model"], registry=self.registry
        )
        self.refused = Counter(
            "residency_router_refused",
            "Requests refused before any work, by reason (admission: 429; unavailable: 503)",
            ["model", "reason"],
            registry=self.registry,
        )
        self.queued = Gauge(
            "residency_router_queued",
            "Requests held for a model that is not ready",
            ["model"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "residency_router_in_flight", "Admitted requests in flight", ["model"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "residency_router_time_to_first_token_seconds",
            "Admitted requests' time from reaching the router to their first token from the worker",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.refusal_seconds = Histogram(
            "residency_router_refusal_seconds",
            "Time from a request reaching the router to its 429 (admission refuses before any work)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.event_loop_lag = Histogram(
            "residency_router_event_loop_lag_seconds",
            "How late the router's event loop wakes for a timer: what every request waits on top of its work",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.admission_ttft_quantile = Gauge(
            "residency_router_admission_ttft_quantile_seconds",
            "The time-to-first-token p99 (the router's view plus its event loop's lag) that the admission "
            "feedback holds under its setpoint, over the first tokens admitted under the current limit",
            ["model"],
            registry=self.registry,
        )
        self.gc = GcPauseMetric(self.registry)
        self.admission_limit = Gauge(
            "residency_router_admission_limit",
            "Concurrent requests a model admits now",
            ["model"],
            registry=self.registry,
        )

    def drain_gc_pauses(self) -> None:
        """Moves the collector's pauses recorded since the last scrape into the histogram."""
        self.gc.drain()


@dataclass
class RouterSettings:
    hold_seconds: float = 60.0
    worker_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass
class RouterState:
    """Everything the endpoints read: `request.app.state.router`."""

    table: ModelTable
    access: Access
    admission: Admission
    settings: RouterSettings
    client: httpx.AsyncClient
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    holding: dict[str, int] = field(default_factory=dict)  # requests held per model now
    event_loop_lag_seconds: float = 0.0
    """How late the event loop woke for its last timer: about what a request that arrives now waits before
    the app sees it (see app.py), a part of its time to first token that the router cannot measure."""

    @property
    def upstream_headers(self) -> dict[str, str]:
        token = self.settings.worker_token
        return {"authorization": f"Bearer {token}"} if token else {}


def state_of(request: Request) -> RouterState:
    state: RouterState = request.app.state.router
    return state


async def router_state(request: Request) -> RouterState:
    """The dependency (a coroutine: FastAPI runs a plain function dependency in its thread pool, a thread hop
    per request, and a wait for one of the pool's 40 threads, that a refusal must not pay)."""
    return state_of(request)


async def caller(request: Request) -> Caller:
    """The authenticated caller (a dependency of every /v1 route); AccessError 401 otherwise."""
    return await state_of(request).access.authenticate(request.headers.get("authorization", ""))


async def metrics_reader(request: Request) -> None:
    """/metrics names models: only for a caller allowed to read it (RBAC `get` on the non-resource URL)."""
    access = state_of(request).access
    who = await access.authenticate(request.headers.get("authorization", ""))
    if not await access.may_read_metrics(who):
        raise AccessError(403, "forbidden")
