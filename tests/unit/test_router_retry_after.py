"""The router honours a worker's `503 Retry-After` (a model being preempted or resumed there): it tries that
worker again only once the wait asked for has passed, goes at once where the model moved meanwhile, and at
its deadline answers with the worker's 503."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from residency_operator.router.app import ModelTable, create_app

MODEL = "team/m"
BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
OK = {"object": "text_completion", "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}


class FakeWorker:
    """A worker that answers from a script: (status, Retry-After or None) per call, the last one repeated."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str | None]] = [(200, None)]
        self.calls: list[float] = []  # time.monotonic() of each request
        self.on_call: Callable[[], None] = lambda: None

    def answer(self, *script: tuple[int, str | None], on_call: Callable[[], None] = lambda: None) -> None:
        self.script = list(script)
        self.calls = []
        self.on_call = on_call

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.calls, self.calls[1:], strict=False)]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        self.calls.append(time.monotonic())
        self.on_call()
        status, retry_after = self.script[min(len(self.calls), len(self.script)) - 1]
        if scope["path"].startswith("/moved/"):
            status, retry_after = 200, None  # the worker the model moved to
        if status == 200:
            body = json.dumps(OK).encode()
        else:
            body = json.dumps({"error": {"message": "preempted", "type": "ModelPreempted"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry_after is not None:
            headers.append((b"retry-after", retry_after.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[FakeWorker, str]]:
    """The fake worker over real HTTP on the loopback (uvicorn in a thread), as the router reaches one."""
    fake = FakeWorker()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(fake, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="fake-worker", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the fake worker did not start"
        time.sleep(0.02)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def ready_table(endpoint: str) -> ModelTable:
    ready = {
        "metadata": {"namespace": "team", "name": "m"},
        "status": {"phase": "Ready", "endpoint": endpoint},
    }
    table = ModelTable(lambda: [ready], refresh_seconds=3600)
    table.refresh()
    return table


def router(endpoint: str, hold_seconds: float) -> Any:
    return create_app(ready_table(endpoint), hold_seconds=hold_seconds)


async def post(app: Any) -> tuple[httpx.Response, float]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        started = time.monotonic()
        response = await client.post("/v1/completions", json=BODY, timeout=60)
        return response, time.monotonic() - started


async def test_a_503_is_retried_after_the_seconds_the_worker_asked_for(
    worker: tuple[FakeWorker, str],
) -> None:
    fake, url = worker
    fake.answer((503, "1"), (503, "1"), (200, None))
    response, _ = await post(router(url, hold_seconds=10))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "ok"
    assert len(fake.calls) == 3
    # not the router's own 0.5 s: the worker said when it would be ready
    assert all(gap >= 0.95 for gap in fake.gaps()), fake.gaps()


async def test_a_retry_after_past_the_deadline_is_answered_with_the_worker_s_503(
    worker: tuple[FakeWorker, str],
) -> None:
    fake, url = worker
    for asked, hold in (("3600", 2.0), ("2", 1.0)):
        fake.answer((503, asked))
        response, elapsed = await post(router(url, hold_seconds=hold))
        assert response.status_code == 503
        assert response.headers["retry-after"] == asked, "the client learns when to come back"
        assert response.json()["error"]["type"] == "ModelPreempted", "the worker's own answer"
        assert len(fake.calls) == 1, f"retried {len(fake.calls) - 1} times before the wait it asked for"
        assert hold - 0.1 <= elapsed < hold + 1.0, f"answered after {elapsed:.1f} s, the hold is {hold} s"


@pytest.mark.parametrize("hold", [4.0, 60.0])
async def test_a_model_that_moved_is_tried_where_it_went_whatever_the_old_worker_asked(
    worker: tuple[FakeWorker, str], hold: float
) -> None:
    """The old worker answers 503 (its default Retry-After: 5) as the model leaves it; the table then
    points at the worker the model went to. The router goes there at its next look, not after 5 s, and
    not giving up because 5 s is longer than what is left of the hold."""
    fake, url = worker
    table = ready_table(url)
    moved = {
        "metadata": {"namespace": "team", "name": "m"},
        "status": {"phase": "Ready", "endpoint": f"{url}/moved"},
    }

    def move() -> None:
        table.models = {MODEL: moved}

    fake.answer((503, "5"), on_call=move)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(table, hold_seconds=hold)), base_url="http://r"
    ) as client:
        started = time.monotonic()
        response = await client.post("/v1/completions", json=BODY, timeout=60)
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert len(fake.calls) == 2
    assert elapsed < 1.5, f"took {elapsed:.1f} s to follow the model"


async def test_a_retry_does_not_start_a_new_hold_past_the_deadline(worker: tuple[FakeWorker, str]) -> None:
    """The worker answers 503 as the model is preempted; by the retry the table says Preempted too. The
    request waits for it until its own deadline, not for a fresh hold after the retry."""
    fake, url = worker
    table = ready_table(url)
    preempted = {"metadata": {"namespace": "team", "name": "m"}, "status": {"phase": "Preempted"}}

    def preempt() -> None:
        table.models = {MODEL: preempted}

    fake.answer((503, "1"), on_call=preempt)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(table, hold_seconds=2.0)), base_url="http://r"
    ) as client:
        started = time.monotonic()
        response = await client.post("/v1/completions", json=BODY, timeout=60)
        elapsed = time.monotonic() - started
    assert response.status_code == 503 and "Preempted" in response.json()["error"]["message"]
    assert len(fake.calls) == 1
    assert 1.9 <= elapsed < 2.3, f"answered after {elapsed:.2f} s for a 2 s hold"


async def test_without_a_usable_retry_after_the_router_polls_at_its_own_interval(
    worker: tuple[FakeWorker, str],
) -> None:
    fake, url = worker
    for unusable in (None, "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "-3"):
        fake.answer((503, unusable), (503, unusable), (200, None))
        response, elapsed = await post(router(url, hold_seconds=10))
        assert response.status_code == 200, (unusable, response.text)
        assert all(0.45 <= gap < 0.95 for gap in fake.gaps()), (unusable, fake.gaps())
        assert elapsed < 3


async def test_an_unusable_retry_after_still_gives_up_at_the_deadline(worker: tuple[FakeWorker, str]) -> None:
    fake, url = worker
    fake.answer((503, "soon"))
    response, elapsed = await post(router(url, hold_seconds=1.2))
    assert response.status_code == 503 and response.headers["retry-after"] == "soon"
    assert 1.1 <= elapsed < 2.5 and 2 <= len(fake.calls) <= 5, (elapsed, len(fake.calls))


def test_retry_after_is_read_in_its_seconds_form_only() -> None:
    from residency_operator.router.app import retry_after_seconds

    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds(" 2 ") == 2.0
    assert retry_after_seconds("0") == 0.0
    assert retry_after_seconds("1.5") == 1.5
    for unusable in (None, "", "soon", "-1", "1e3", "nan", "inf", "1_0", "Wed, 21 Oct 2015 07:28:00 GMT"):
        assert retry_after_seconds(unusable) is None, unusable


async def test_the_hold_histogram_counts_each_request_once_with_its_retry_waits(
    worker: tuple[FakeWorker, str],
) -> None:
    fake, url = worker
    fake.answer((503, "1"), (503, "1"), (200, None))
    app = router(url, hold_seconds=10)
    response, _ = await post(app)
    assert response.status_code == 200
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        text = (await client.get("/metrics")).text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("residency_router_hold_seconds_")
    }
    assert samples["residency_router_hold_seconds_count"] == 1.0, "one request, one observation"
    assert samples["residency_router_hold_seconds_sum"] >= 1.9, "the two 1 s waits the worker asked for"
