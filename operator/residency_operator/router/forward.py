"""Forwarding one request to the worker that holds its model: hold while the model loads or resumes, admit
or refuse (429) at once, retry a worker's 503/404 until the request's one deadline, relay streams."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi.responses import Response, StreamingResponse

from residency.openai_errors import error_body
from residency_operator.router.admission import Refusal
from residency_operator.router.deps import RouterState, error
from residency_operator.router.table import WAKE_PHASES, Route, resolve

log = logging.getLogger("residency.router")

RETRY_SECONDS = 0.5
"""How soon a request the worker could not serve yet (unreachable, 404, 503 without Retry-After) is tried
again, within the hold deadline."""
MIN_RETRY_SECONDS = 0.1
"""The least wait before retrying a 503 with `Retry-After: 0`: no busy loop against a worker."""
UNPLACEABLE_RETRY_SECONDS = 5
"""Retry-After of a model that cannot be placed now (WaitingForCapacity, Unschedulable): it was told it is
wanted, and the operator may find it room."""
TTFT_HEADER = "x-residency-ttft-seconds"
"""A worker's time to first token of a plain (not streamed) answer, from its engine's queue on."""
DECODE_HEADER = "x-residency-decode-seconds"
"""A worker's time from the first token to the last of a plain answer: the router's own wait minus it is
the time to first token with every queue on the way (the worker's event loop, tokenizer, network)."""
_DELAY_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def retry_after_seconds(value: str | None) -> float | None:
    """The seconds a `Retry-After` header asks for (RFC 9110's delay-seconds form; a fraction is taken too),
    or None when it is absent or not in that form (an HTTP-date, garbage): the caller's own interval."""
    if value is None or not _DELAY_SECONDS.fullmatch(value.strip()):
        return None
    return float(value.strip())


async def route_when_ready(state: RouterState, key: str, deadline: float) -> tuple[Route, float]:
    """The model's route once it is not held any more, or the held route at the request's deadline
    (one deadline for the whole request: a retry after a worker's 503 does not start a new hold)."""
    table, holding = state.table, state.holding
    started = time.monotonic()
    counted: str | None = None  # the model this request is counted as held for
    try:
        while True:
            route = resolve(table.models, key)
            if route.decision == "reject" and route.status_code == 404 and table.refreshed_at < started:
                # not in a table listed before this request came: ask the API server before a 404
                await asyncio.to_thread(table.ensure_listed_since, started)
                route = resolve(table.models, key)
            if route.decision == "hold" and route.key and counted is None:
                counted = route.key
                holding[counted] = holding.get(counted, 0) + 1
                state.metrics.queued.labels(counted).set(holding[counted])
            if route.phase in WAKE_PHASES and route.key:
                await asyncio.to_thread(table.wake, route.key, holding.get(route.key, 1))
            now = time.monotonic()
            if route.decision != "hold" or now >= deadline:
                return route, now - started
            await asyncio.sleep(min(0.2, deadline - now))
    finally:
        if counted is not None:
            holding[counted] -= 1
            state.metrics.queued.labels(counted).set(holding[counted])
            if not holding[counted]:
                del holding[counted]


async def retry_due(state: RouterState, key: str, endpoint: str, retry_at: float, deadline: float) -> bool:
    """Waits until ``endpoint`` may be tried again (``retry_at``) or the model's route moves off it,
    looking at the table every RETRY_SECONDS; False when the deadline comes first."""
    while True:
        now = time.monotonic()
        if now >= deadline:
            return False
        if now >= retry_at:
            return True
        await asyncio.sleep(min(RETRY_SECONDS, retry_at - now, deadline - now))
        route = resolve(state.table.models, key)
        if route.decision != "forward" or route.endpoint != endpoint:
            return time.monotonic() < deadline


async def forward(
    state: RouterState, body: dict[str, Any], key: str, path: str, arrived_at: float | None = None
) -> Response:
    """The answer to `body` (already authorised for model `key`) from the worker serving it. `arrived_at`:
    when the request reached the router (monotonic); the time before this call counts to its TTFT."""
    now = time.monotonic()
    deadline = now + state.settings.hold_seconds
    held = [0.0]  # seconds this request waited for its model (once per request, retries included)
    try:
        return await _forward(
            state, body, key, path, deadline, held, now if arrived_at is None else arrived_at
        )
    finally:
        state.metrics.held_seconds.observe(held[0])


async def _forward(
    state: RouterState,
    body: dict[str, Any],
    key: str,
    path: str,
    deadline: float,
    held: list[float],
    arrived_at: float,
) -> Response:
    metrics, admission = state.metrics, state.admission
    while True:
        route, waited = await route_when_ready(state, key, deadline)
        held[0] += waited
        if route.decision == "reject":
            metrics.requests.labels("rejected").inc()
            unplaceable = route.phase in WAKE_PHASES
            if route.key is not None and route.status_code == 503:
                metrics.refused.labels(route.key, "unavailable").inc()
            return error(
                route.status_code,
                f"{route.message}; asked the operator for room" if unplaceable else route.message,
                UNPLACEABLE_RETRY_SECONDS if unplaceable else None,
                code=route.phase or ("model_not_found" if route.status_code == 404 else None),
            )
        if route.decision == "hold":
            metrics.requests.labels("timed_out").inc()
            metrics.refused.labels(key, "unavailable").inc()
            message = f"{route.message}; still not ready after {state.settings.hold_seconds:.0f} s"
            return error(503, message, 5, code=route.phase)
        assert route.endpoint is not None and route.key is not None
        set_target(state, route.key)
        refusal = admission.try_admit(route.key, time.monotonic())
        if refusal is not None:
            return refused(state, route.key, refusal, arrived_at)
        metrics.admitted.labels(route.key).inc()
        _observe_gate(state, route.key)
        sent_at = time.monotonic()
        # what the request spent in the router before it was sent on (its body, auth, a busy event loop)
        # counts to its time to first token, not the time it was held for a model that was not ready
        before_sent = max(0.0, sent_at - arrived_at - held[0])
        forwarded = {**body, "model": route.key}
        url = f"{route.endpoint.rstrip('/')}/{path}"
        upstream: httpx.Response | None = None
        streaming = False
        try:
            upstream = await state.client.send(
                state.client.build_request("POST", url, json=forwarded, headers=state.upstream_headers),
                stream=True,
            )
            # Nothing has reached the client yet, so a worker lost now is retried like one that was
            # never reached: read the whole of a plain answer, the first chunk of a stream.
            streaming = upstream.status_code == 200 and bool(body.get("stream"))
            chunks = upstream.aiter_raw()
            first = await anext(chunks, b"") if streaming else await upstream.aread()
        except httpx.TransportError as exc:
            admission.release(route.key)
            _observe_gate(state, route.key)
            if upstream is not None:
                await upstream.aclose()
            # the worker went away or the model moved: look again until the hold deadline
            remaining = deadline - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(min(RETRY_SECONDS, remaining))
                held[0] += min(RETRY_SECONDS, remaining)
                continue
            metrics.requests.labels("unavailable").inc()
            return error(503, f"worker for {route.key} unreachable: {exc.__class__.__name__}", 2)
        # 503: the model is preempted or reloading there; 404: it just moved off that worker (the
        # table lags the API server by up to a refresh). Both retry until the hold deadline: that
        # worker again once the Retry-After it asked for has passed (a 503 without one, or a 404,
        # after the usual interval), another at once if the model moved there meanwhile. At the
        # deadline the client gets the worker's answer, Retry-After included.
        if upstream.status_code in (404, 503):
            admission.release(route.key)
            _observe_gate(state, route.key)
            asked = None
            if upstream.status_code == 503:
                asked = retry_after_seconds(upstream.headers.get("retry-after"))
            pause = RETRY_SECONDS if asked is None else max(asked, MIN_RETRY_SECONDS)
            waiting_since = time.monotonic()
            due = await retry_due(state, key, route.endpoint, waiting_since + pause, deadline)
            held[0] += time.monotonic() - waiting_since
            if due:
                await upstream.aclose()
                continue
            metrics.requests.labels(str(upstream.status_code)).inc()
            await upstream.aclose()
            return Response(first, status_code=upstream.status_code, headers=_relayed_headers(upstream))
        metrics.requests.labels(str(upstream.status_code)).inc()
        now = time.monotonic()
        ttft = now - sent_at if streaming else _plain_ttft(upstream, now - sent_at)
        if ttft is not None and upstream.status_code == 200:
            # the admission also counts the wait before the app saw the request: its event loop's lag
            admission.first_token(route.key, before_sent + ttft + state.event_loop_lag_seconds, now)
            metrics.time_to_first_token.labels(route.key).observe(before_sent + ttft)
        headers = _relayed_headers(upstream)
        done = _finisher(state, route.key, sent_at)
        if not streaming:
            await upstream.aclose()
            done()
            return Response(first, status_code=upstream.status_code, headers=headers)
        return StreamingResponse(_relay(upstream, chunks, first, route.key, done), headers=headers)


def _finisher(state: RouterState, key: str, sent_at: float) -> Callable[[], None]:
    """What ends an admitted request: its slot back, its duration into the model's statistics."""

    def done() -> None:
        now = time.monotonic()
        state.admission.finish(key, now - sent_at, now)
        _observe_gate(state, key)

    return done


def _plain_ttft(upstream: httpx.Response, waited_seconds: float) -> float | None:
    """Time to first token of a plain answer: the router's wait less the worker's decoding, else the
    worker's own figure (which misses the queues before its engine), else None."""
    decode = retry_after_seconds(upstream.headers.get(DECODE_HEADER))
    if decode is not None:
        return max(0.0, waited_seconds - decode)
    return retry_after_seconds(upstream.headers.get(TTFT_HEADER))


def set_target(state: RouterState, key: str) -> None:
    """The model's own TTFT target (spec.slo.maxTimeToFirstTokenSeconds, or the router's default) and the
    least limit (its batch size, spec.maxBatchSize)."""
    spec = (state.table.models.get(key) or {}).get("spec") or {}
    target = (spec.get("slo") or {}).get("maxTimeToFirstTokenSeconds")
    if isinstance(target, int | float) and target > 0:
        state.admission.targets[key] = float(target)
    else:
        state.admission.targets.pop(key, None)
    batch = spec.get("maxBatchSize")
    if isinstance(batch, int) and batch > 0:
        state.admission.floors[key] = float(batch)
    else:
        state.admission.floors.pop(key, None)


def refused(state: RouterState, key: str, refusal: Refusal, arrived_at: float) -> Response:
    """The 429 of a request over its model's admission limit, counted (`arrived_at`: when it came)."""
    state.metrics.requests.labels("429").inc()
    state.metrics.refused.labels(key, "admission").inc()
    state.metrics.refusal_seconds.observe(time.monotonic() - arrived_at)
    return error(429, refusal.message, refusal.retry_after_seconds, code="rate_limit_exceeded")


def _relayed_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}


def _observe_gate(state: RouterState, key: str) -> None:
    gate = state.admission.gate(key)
    state.metrics.in_flight.labels(key).set(gate.in_flight)
    state.metrics.admission_limit.labels(key).set(state.admission.limit_of(key, time.monotonic()))
    if gate.held_quantile_seconds is not None:
        state.metrics.admission_ttft_quantile.labels(key).set(gate.held_quantile_seconds)


async def _relay(
    upstream: httpx.Response, chunks: AsyncIterator[bytes], first: bytes, key: str, done: Callable[[], None]
) -> AsyncIterator[bytes]:
    """Relays a stream; a worker lost mid-stream ends it with an SSE error event saying when to retry."""
    try:
        yield first
        async for chunk in chunks:
            yield chunk
    except httpx.TransportError as exc:
        log.warning("worker for %s went away mid-stream: %s", key, exc.__class__.__name__)
        message = f"the worker serving {key} went away mid-stream ({exc.__class__.__name__}); retry"
        event = error_body(503, message, "WorkerLost")
        event["error"]["retry_after"] = 2
        yield f"\n\ndata: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
    finally:
        done()
        await upstream.aclose()
