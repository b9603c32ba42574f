"""Admission control: a model admits what it serves within its TTFT target; the rest get 429 + Retry-After
at once, before any work; a model that cannot be placed gets 503 at once with the reason from its status."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from residency_operator.router.admission import Admission
from residency_operator.router.app import ModelTable, create_app
from residency_operator.router.auth import Caller, OpenAccess


def test_the_limit_admits_then_refuses_with_a_retry_after_from_the_queue() -> None:
    admission = Admission(ttft_target_seconds=1.0, initial_limit=2)
    assert admission.try_admit("m", 0.0) is None and admission.try_admit("m", 0.0) is None
    admission.gate("m").seconds_per_request = 4.0  # each request takes 4 s: 2 in flight drain 0.5/s
    refusals = [admission.try_admit("m", 0.0) for _ in range(6)]
    assert all(r is not None for r in refusals)
    waits = [r.retry_after_seconds for r in refusals if r is not None]
    assert waits == sorted(waits) and waits[0] == 2 and waits[-1] == 12, waits  # the queue grows
    admission.finish("m", 4.0)
    assert admission.try_admit("m", 0.0) is None, "a finished request frees its slot"


def test_the_limit_follows_the_time_to_first_token() -> None:
    admission = Admission(ttft_target_seconds=1.0, initial_limit=10)
    for _ in range(8):
        admission.try_admit("m", 0.0)
    for _ in range(10):  # quick, and the limit nearly used: one more, once per target interval
        admission.first_token("m", 0.2, now=0.0)
    assert admission.gate("m").limit == 11
    admission.try_admit("m", 0.0)  # 9 in flight of 11
    admission.first_token("m", 0.2, now=1.0)
    assert admission.gate("m").limit == 12
    admission.gate("m").limit = 11
    admission.first_token("m", 3.0, now=2.0)  # late: cut by a tenth
    assert admission.gate("m").limit == pytest.approx(9.9)
    admission.first_token("m", 3.0, now=2.5)  # again within the target interval: not cut twice
    assert admission.gate("m").limit == pytest.approx(9.9)
    admission.first_token("m", 0.2, now=2.5)  # nor raised right after a cut
    assert admission.gate("m").limit == pytest.approx(9.9)
    admission.first_token("m", 0.8, now=4.0)  # within the 1 s target, but not within the router's 3/4 of it
    assert admission.gate("m").limit == pytest.approx(8.91)
    for step in range(100):
        admission.first_token("m", 3.0, now=2.0 + step)
    assert admission.gate("m").limit == 1.0, "never below one request"
    admission.floors["batched"] = 8.0  # a model with a batch of 8: never below a full batch
    admission.gate("batched").limit = 10.0
    for step in range(100):
        admission.first_token("batched", 3.0, now=2.0 + step)
    assert admission.gate("batched").limit == 8.0


def _finished(admission: Admission, key: str, count: int, over_seconds: float, end: float) -> None:
    """`count` admitted requests of `key` that finished evenly over the `over_seconds` before `end`."""
    for i in range(count):
        assert admission.try_admit(key, 0.0) is None
        admission.finish(key, 1.0, end - over_seconds + over_seconds * (i + 1) / count)


def test_a_new_model_admits_two_batches_until_its_rate_is_measured() -> None:
    admission = Admission()
    admission.floors["m"] = 4.0  # spec.maxBatchSize 4
    assert admission.limit_of("m", 0.0) == 8
    assert admission.limit_of("unknown-batch", 0.0) == 16, "spec.maxBatchSize defaults to 8"


def test_the_measured_rate_bounds_what_is_admitted_within_the_target() -> None:
    """40 requests finished in the last 10 s: 4/s. A batch of 8 runs; the rest wait for a slot that frees
    4 times a second, so 8 + 4 * 2 s * 0.25 = 10 in flight wait at most a quarter of the 2 s target."""
    admission = Admission(ttft_target_seconds=2.0, initial_limit=100)
    admission.floors["m"] = 8.0
    _finished(admission, "m", 40, 10.0, end=100.0)
    assert admission.service_rate("m", 100.0) == pytest.approx(4.0)
    assert admission.limit_of("m", 100.0) == 10
    admitted = [admission.try_admit("m", 100.0) for _ in range(10)]
    assert all(a is None for a in admitted)
    refusal = admission.try_admit("m", 100.0)
    assert refusal is not None and "limit 10" in refusal.message
    assert refusal.retry_after_seconds == 1, "one refused request drains at 4/s: within a second"
    more = [admission.try_admit("m", 100.0) for _ in range(11)]
    assert [r.retry_after_seconds for r in more if r is not None][-1] == 3, "12 refused at 4/s: 3 s"
    # a stricter target of its own admits fewer; a rate that fell (nothing finished lately) forgets the bound
    admission.targets["m"] = 1.0
    assert admission.limit_of("m", 100.0) == 9
    assert admission.service_rate("m", 200.0) is None and admission.limit_of("m", 200.0) == 100


def test_quick_first_tokens_raise_the_limit_only_up_to_the_rate_bound() -> None:
    admission = Admission(ttft_target_seconds=2.0, initial_limit=10)
    admission.floors["m"] = 8.0
    _finished(admission, "m", 40, 10.0, end=100.0)  # bound 10
    for _ in range(10):
        admission.try_admit("m", 100.0)
    for step in range(50):
        admission.first_token("m", 0.1, now=100.0 + 2 * step / 1000)
    assert admission.gate("m").limit == 10.0 and admission.limit_of("m", 100.0) == 10


class SlowWorker:
    """A worker whose every answer takes `seconds` (a model at its capacity)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        self.calls += 1
        await asyncio.sleep(self.seconds)
        body = json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}).encode()
        headers = [(b"content-type", b"application/json"), (b"x-residency-ttft-seconds", b"0.1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def slow_worker() -> Iterator[tuple[SlowWorker, str]]:
    fake = SlowWorker(1.5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(fake, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


async def test_requests_over_the_limit_get_429_at_once_and_the_rest_are_served(
    slow_worker: tuple[SlowWorker, str],
) -> None:
    worker, endpoint = slow_worker
    ready = {
        "metadata": {"namespace": "team", "name": "m"},
        "status": {"phase": "Ready", "endpoint": endpoint},
    }
    table = ModelTable(lambda: [ready], refresh_seconds=3600)
    table.refresh()
    app = create_app(table, admission=Admission(initial_limit=3))
    calls_before = worker.calls

    async def post(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await client.post("/v1/completions", json={"model": "team/m", "prompt": "x"}, timeout=30)
        return response, time.monotonic() - started

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        results = await asyncio.gather(*(post(client) for _ in range(10)))
        metrics = (await client.get("/metrics")).text
    served = [seconds for r, seconds in results if r.status_code == 200]
    refused = [(r, seconds) for r, seconds in results if r.status_code == 429]
    assert len(served) == 3 and len(refused) == 7, [r.status_code for r, _ in results]
    assert worker.calls - calls_before == 3, "a refused request reached the worker"
    for response, seconds in refused:
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert seconds < min(served), "a refusal waited for the work it refused"
    assert 'residency_router_admitted_total{model="team/m"} 3.0' in metrics
    assert 'residency_router_refused_total{model="team/m",reason="admission"} 7.0' in metrics
    assert "residency_router_refusal_seconds_count 7.0" in metrics  # each 429's time in the router


async def test_a_model_that_cannot_be_placed_answers_503_at_once_with_its_reason() -> None:
    waiting = {
        "metadata": {"namespace": "team", "name": "big"},
        "status": {"phase": "WaitingForCapacity", "reason": "NoRoom", "message": "needs 40 GiB, 8 free"},
    }
    woken: list[str] = []
    table = ModelTable(lambda: [waiting], refresh_seconds=3600, waker=lambda key, _n: woken.append(key))
    table.refresh()
    app = create_app(table, hold_seconds=60)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        started = time.monotonic()
        answer = await client.post("/v1/completions", json={"model": "team/big", "prompt": "x"})
        seconds = time.monotonic() - started
    assert answer.status_code == 503 and seconds < 5, "held instead of answered at once"
    assert answer.headers["retry-after"] == "5"
    assert (
        "NoRoom" in answer.json()["error"]["message"] and "needs 40 GiB" in answer.json()["error"]["message"]
    )
    assert answer.json()["error"]["code"] == "WaitingForCapacity"
    assert woken == ["team/big"], "the operator is told that it is wanted"


async def test_a_model_s_own_ttft_target_from_its_spec_sets_its_limit(
    slow_worker: tuple[SlowWorker, str],
) -> None:
    """spec.slo.maxTimeToFirstTokenSeconds: a first token at 0.1 s is late for a 0.05 s target (cut), quick
    for the default 2 s (raised)."""
    _, endpoint = slow_worker
    models = [
        {
            "metadata": {"namespace": "team", "name": name},
            "spec": {"slo": {"minDecodeTokensPerSecond": 1, **slo}},
            "status": {"phase": "Ready", "endpoint": endpoint},
        }
        for name, slo in (("strict", {"maxTimeToFirstTokenSeconds": 0.05}), ("default", {}))
    ]
    table = ModelTable(lambda: models, refresh_seconds=3600)
    table.refresh()
    admission = Admission(initial_limit=1)
    app = create_app(table, admission=admission)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        for name in ("strict", "default"):
            answer = await client.post(
                "/v1/completions", json={"model": f"team/{name}", "prompt": "x"}, timeout=30
            )
            assert answer.status_code == 200
    assert admission.target_of("team/strict") == 0.05 and admission.target_of("team/default") == 2.0
    assert admission.gate("team/strict").limit == 1.0, "late for its own target: not raised"
    assert admission.gate("team/default").limit == 2.0, "quick for the default target: raised"


class SlowAccess(OpenAccess):
    """Everybody may use everything, decided after `seconds` (a slow API server, a busy event loop)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def allowed(self, caller: Caller, namespace: str, name: str) -> bool:
        await asyncio.sleep(self.seconds)
        return True


class Recording(Admission):
    def __init__(self) -> None:
        super().__init__()
        self.ttfts: list[float] = []

    def first_token(self, key: str, ttft_seconds: float, now: float) -> None:
        self.ttfts.append(ttft_seconds)
        super().first_token(key, ttft_seconds, now)


async def test_the_time_a_request_spent_in_the_router_counts_to_its_first_token(
    slow_worker: tuple[SlowWorker, str],
) -> None:
    """The worker says 0.1 s to the first token; the router spent 0.5 s before it sent the request on: the
    admission sees 0.6 s (a starved router must not read its own delay as quick first tokens)."""
    _, endpoint = slow_worker
    ready = {
        "metadata": {"namespace": "team", "name": "m"},
        "status": {"phase": "Ready", "endpoint": endpoint},
    }
    table = ModelTable(lambda: [ready], refresh_seconds=3600)
    table.refresh()
    admission = Recording()
    app = create_app(table, access=SlowAccess(0.5), admission=admission)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        answer = await client.post("/v1/completions", json={"model": "team/m", "prompt": "x"}, timeout=30)
        metrics = (await client.get("/metrics")).text
    assert answer.status_code == 200
    (ttft,) = admission.ttfts
    assert 0.6 <= ttft < 1.5, ttft  # not the worker's 1.5 s answer: its decoding is not a first token
    assert 'residency_router_time_to_first_token_seconds_count{model="team/m"} 1.0' in metrics
