"""The router's HTTP app (FastAPI): holds requests while a model loads or resumes, never drops silently."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from residency.httpguard import DEFAULT_MAX_BODY_BYTES, BodyLimit, bearer_matches, json_bytes, loads_strict
from residency_operator.router.table import WAKE_PHASES, Route, resolve

log = logging.getLogger("residency.router")

RETRY_SECONDS = 0.5
"""How soon a request the worker could not serve yet (unreachable, 404, 503 without Retry-After) is tried
again, within the hold deadline."""
MIN_RETRY_SECONDS = 0.1
"""The least wait before retrying a 503 with `Retry-After: 0`: no busy loop against a worker."""
_DELAY_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def retry_after_seconds(value: str | None) -> float | None:
    """The seconds a `Retry-After` header asks for (RFC 9110's delay-seconds form; a fraction is taken too),
    or None when it is absent or not in that form (an HTTP-date, garbage): the caller's own interval."""
    if value is None or not _DELAY_SECONDS.fullmatch(value.strip()):
        return None
    return float(value.strip())


class ModelTable:
    """LLMModels as last listed from the API server (refreshed in the background)."""

    def __init__(
        self,
        lister: Any,
        refresh_seconds: float = 1.0,
        waker: Any = None,
        min_forced_refresh_seconds: float = 0.25,
    ) -> None:
        self._lister = lister
        self._waker = waker
        self._woken: dict[str, float] = {}
        self._waking = threading.Lock()
        self.refresh_seconds = refresh_seconds
        self.models: dict[str, dict[str, Any]] = {}
        self.refreshed_at = 0.0
        self.min_forced_refresh_seconds = min_forced_refresh_seconds
        self._forced_at = -1e9
        self._refreshing = threading.Lock()
        self._stop = threading.Event()

    def refresh(self) -> None:
        listed_at = time.monotonic()  # what the listing can know about: the API server as of now
        items = self._lister()
        self.models = {f"{m['metadata']['namespace']}/{m['metadata']['name']}": m for m in items}
        self.refreshed_at = listed_at

    def ensure_listed_since(self, since: float) -> None:
        """Lists again unless a listing started after `since` (a request's arrival) already finished.

        A model applied a moment ago is not in the periodic table yet; before the router answers 404
        for it, it asks the API server. Concurrent misses share one listing (the lock), and forced
        listings are at least `min_forced_refresh_seconds` apart, so a flood of unknown names costs
        the API server a bounded rate of lists. A failed listing keeps the table (the 404 stands).
        """
        with self._refreshing:
            if self.refreshed_at >= since:
                return
            wait_seconds = self._forced_at + self.min_forced_refresh_seconds - time.monotonic()
            if wait_seconds > 0:
                time.sleep(wait_seconds)
            self._forced_at = time.monotonic()
            try:
                self.refresh()
            except Exception as exc:
                log.warning("could not list models (%s); answering from the last table", type(exc).__name__)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # API server away: keep routing with the last table
                log.warning("could not list models (%s); keeping the last table", exc.__class__.__name__)
            self._stop.wait(self.refresh_seconds)

    def stop(self) -> None:
        self._stop.set()

    def wake(self, key: str, waiting: int = 1) -> None:
        """Tell the operator that a model which is not running is asked for, and by how many requests this
        router holds for it (annotations on the LLMModel): an Idle one resumes, another may take the room
        of idle models, and the planner values it by what waits. At most every 2 s per model."""
        with self._waking:  # requests wait in threads: one of them wakes, the others see it did
            if self._waker is None or time.monotonic() - self._woken.get(key, -10.0) < 2.0:
                return
            self._woken[key] = time.monotonic()
        try:
            self._waker(key, max(1, waiting))
        except Exception as exc:  # the API server may be away: the request keeps waiting and retries
            log.warning("could not wake %s: %s", key, exc.__class__.__name__)


class SafeJSONResponse(JSONResponse):
    """JSON that renders whatever user input an error echoes (lone surrogates, NaN) instead of failing."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def error(status_code: int, message: str, retry_after_seconds: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_seconds)} if retry_after_seconds is not None else None
    kind = "unavailable" if status_code == 503 else "invalid_request_error"
    return SafeJSONResponse(
        {"error": {"message": message, "type": kind, "code": status_code}}, status_code, headers=headers
    )


# What the router reads of a request; everything else goes to the worker, which validates it in full.
_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "description": "namespace/name, or a name unique across namespaces"},
        "stream": {"type": "boolean"},
    },
    "additionalProperties": True,
}
_OPENAPI_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}
}


def create_app(
    table: ModelTable,
    hold_seconds: float = 60.0,
    token: str | None = None,
    worker_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The router: /v1/completions, /v1/chat/completions, /v1/models, /healthz, /metrics."""
    registry = CollectorRegistry()
    requests_total = Counter(
        "residency_router_requests", "Requests by outcome", ["outcome"], registry=registry
    )
    held_seconds = Histogram(
        "residency_router_hold_seconds", "Time requests waited for a model", registry=registry
    )
    app = FastAPI(title="residency router", default_response_class=SafeJSONResponse)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error(exc.status_code, str(exc.detail))

    # No cap on connections to workers: each worker bounds its own queue and answers 429 + Retry-After
    # when full. A shared pool cap would instead queue requests here, unbounded and blind to which
    # worker they wait for (one busy model would hold up every other model's requests).
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(300.0, connect=5.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )

    holding: dict[str, int] = {}  # requests held per model now (told to the operator with each wake)

    async def route_when_ready(model: str, deadline: float) -> tuple[Route, float]:
        """The model's route once it is not held any more, or the held route at the request's deadline
        (one deadline for the whole request: a retry after a worker's 503 does not start a new hold)."""
        started = time.monotonic()
        counted: str | None = None  # the model this request is counted as held for
        try:
            while True:
                route = resolve(table.models, model)
                if route.decision == "reject" and route.status_code == 404 and table.refreshed_at < started:
                    # not in a table listed before this request came: ask the API server before a 404
                    await asyncio.to_thread(table.ensure_listed_since, started)
                    route = resolve(table.models, model)
                if route.decision == "hold" and route.key and counted is None:
                    counted = route.key
                    holding[counted] = holding.get(counted, 0) + 1
                if route.phase in WAKE_PHASES and route.key:
                    await asyncio.to_thread(table.wake, route.key, holding.get(route.key, 1))
                now = time.monotonic()
                if route.decision != "hold" or now >= deadline:
                    return route, now - started
                await asyncio.sleep(min(0.2, deadline - now))
        finally:
            if counted is not None:
                holding[counted] -= 1
                if not holding[counted]:
                    del holding[counted]

    async def retry_due(model: str, endpoint: str, retry_at: float, deadline: float) -> bool:
        """Waits until ``endpoint`` may be tried again (``retry_at``) or the model's route moves off it,
        looking at the table every RETRY_SECONDS; False when the deadline comes first."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= retry_at:
                return True
            await asyncio.sleep(min(RETRY_SECONDS, retry_at - now, deadline - now))
            route = resolve(table.models, model)
            if route.decision != "forward" or route.endpoint != endpoint:
                return time.monotonic() < deadline

    upstream_headers = {"authorization": f"Bearer {worker_token}"} if worker_token else {}

    def authorised(request: Request) -> bool:
        """Every /v1 route needs the clients' bearer token when one is set (the model list names every
        tenant's models)."""
        return not token or bearer_matches(request.headers.get("authorization", ""), token)

    async def proxy(request: Request, path: str) -> Response:
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        try:
            body = loads_strict(await request.body())
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return error(400, f"request body must be JSON: {exc}"[:500])
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error(400, "request body must be a JSON object with a string `model`")
        deadline = time.monotonic() + hold_seconds
        held = [0.0]  # seconds this request waited for its model (once per request, retries included)
        try:
            return await forward(body, path, deadline, held)
        finally:
            held_seconds.observe(held[0])

    async def forward(body: dict[str, Any], path: str, deadline: float, held: list[float]) -> Response:
        while True:
            route, waited = await route_when_ready(body["model"], deadline)
            held[0] += waited
            if route.decision == "reject":
                requests_total.labels("rejected").inc()
                # a model that is not running was told it is wanted: it may get room, so try again soon
                retry = 2 if route.phase in WAKE_PHASES else None
                return error(
                    route.status_code,
                    f"{route.message}; asked the operator for room" if retry else route.message,
                    retry,
                )
            if route.decision == "hold":
                requests_total.labels("timed_out").inc()
                return error(503, f"{route.message}; still not ready after {hold_seconds:.0f} s", 5)
            assert route.endpoint is not None and route.key is not None
            forwarded = {**body, "model": route.key}
            url = f"{route.endpoint.rstrip('/')}/{path}"
            upstream: httpx.Response | None = None
            try:
                upstream = await client.send(
                    client.build_request("POST", url, json=forwarded, headers=upstream_headers),
                    stream=True,
                )
                # Nothing has reached the client yet, so a worker lost now is retried like one that was
                # never reached: read the whole of a plain answer, the first chunk of a stream.
                streaming = upstream.status_code == 200 and bool(body.get("stream"))
                chunks = upstream.aiter_raw()
                first = await anext(chunks, b"") if streaming else await upstream.aread()
            except httpx.TransportError as exc:
                if upstream is not None:
                    await upstream.aclose()
                # the worker went away or the model moved: look again until the hold deadline
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    await asyncio.sleep(min(RETRY_SECONDS, remaining))
                    held[0] += min(RETRY_SECONDS, remaining)
                    continue
                requests_total.labels("unavailable").inc()
                return error(503, f"worker for {route.key} unreachable: {exc.__class__.__name__}", 2)
            # 503: the model is preempted or reloading there; 404: it just moved off that worker (the
            # table lags the API server by up to a refresh). Both retry until the hold deadline: that
            # worker again once the Retry-After it asked for has passed (a 503 without one, or a 404,
            # after the usual interval), another at once if the model moved there meanwhile. At the
            # deadline the client gets the worker's answer, Retry-After included.
            if upstream.status_code in (404, 503):
                asked = None
                if upstream.status_code == 503:
                    asked = retry_after_seconds(upstream.headers.get("retry-after"))
                pause = RETRY_SECONDS if asked is None else max(asked, MIN_RETRY_SECONDS)
                waiting_since = time.monotonic()
                due = await retry_due(body["model"], route.endpoint, waiting_since + pause, deadline)
                held[0] += time.monotonic() - waiting_since
                if due:
                    await upstream.aclose()
                    continue
            requests_total.labels(str(upstream.status_code)).inc()
            headers = {
                k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")
            }
            if not streaming:
                await upstream.aclose()
                return Response(first, status_code=upstream.status_code, headers=headers)
            return StreamingResponse(_relay(upstream, chunks, first, route.key), headers=headers)

    @app.post("/v1/completions", openapi_extra=_OPENAPI_BODY)
    async def completions(request: Request) -> Response:
        return await proxy(request, "completions")

    @app.post("/v1/chat/completions", openapi_extra=_OPENAPI_BODY)
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        data = [
            {
                "id": key,
                "object": "model",
                "owned_by": "residency",
                "phase": (m.get("status") or {}).get("phase", "Pending"),
            }
            for key, m in sorted(table.models.items())
        ]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.on_event("shutdown")
    async def close_client() -> None:
        await client.aclose()

    return app


async def _relay(
    upstream: httpx.Response, chunks: AsyncIterator[bytes], first: bytes, key: str
) -> AsyncIterator[bytes]:
    """Relays a stream; a worker lost mid-stream ends it with an SSE error event saying when to retry."""
    try:
        yield first
        async for chunk in chunks:
            yield chunk
    except httpx.TransportError as exc:
        log.warning("worker for %s went away mid-stream: %s", key, exc.__class__.__name__)
        message = f"the worker serving {key} went away mid-stream ({exc.__class__.__name__}); retry"
        event = {"error": {"message": message, "type": "unavailable", "code": 503, "retry_after": 2}}
        yield f"\n\ndata: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
    finally:
        await upstream.aclose()
