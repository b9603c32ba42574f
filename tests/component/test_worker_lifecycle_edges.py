"""The worker at the edges of a model's life: a weights index naming a FIFO, an unload racing a reload of
the same name, requests parked by a preemption, clients that hang up, many waiters on a preempted model,
and the metrics of an unloaded model. Emulated GPU tier, tiny model, in process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from residency.modelgen import make_model
from residency_worker.engine import Engine, EngineError, ModelOptions, SamplingParams, make_gpu_tier
from residency_worker.engine import engine as engine_module
from residency_worker.engine.runner import ModelRunner
from residency_worker.server import ServerSettings, create_app

pytestmark = pytest.mark.component

ADMIN = {"Authorization": "Bearer admin-secret"}
PREEMPTED_WAIT_SECONDS = 0.5
RETRY_AFTER_SECONDS = 3
STEP_SECONDS = 0.01  # a slowed decode step: a long generation lasts seconds, long enough to interrupt
OPTIONS = ModelOptions(dtype="float32", decode_mode="stream", max_sequence_length=256, max_batch_size=4)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_model(root / "tiny", "llama", "tiny", seed=2, dtype="float32")
    return root


def _engine(root: Path) -> Engine:
    return Engine(make_gpu_tier(32 * 2**20, force_emulated=True), [root], node="test", calibration_bytes=0)


@contextlib.asynccontextmanager
async def _serve(
    models_root: Path, preempted_wait_seconds: float
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """An engine serving `tiny` (max_queue 64) behind the worker app, over in-process ASGI."""
    engine = _engine(models_root)
    settings = ServerSettings(
        admin_token="admin-secret",
        preempted_wait_seconds=preempted_wait_seconds,
        retry_after_seconds=RETRY_AFTER_SECONDS,
    )
    app = create_app(engine, settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=60) as http:
        await asyncio.to_thread(engine.load, "tiny", str(models_root / "tiny"), _options(max_queue=64))
        yield engine, http
    await asyncio.to_thread(engine.close)


@pytest.fixture
async def served(models_root: Path) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    async with _serve(models_root, PREEMPTED_WAIT_SECONDS) as engine_and_client:
        yield engine_and_client


def _options(**changes: Any) -> ModelOptions:
    return ModelOptions(**{**OPTIONS.__dict__, **changes})


def _slow_and_endless(runner: ModelRunner) -> None:
    """Every step takes STEP_SECONDS and no token ends a sequence early: it runs to max_tokens."""
    forward = runner._forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(STEP_SECONDS)
        return forward(*args, **kwargs)

    runner._forward = slow_forward  # type: ignore[method-assign]
    runner._eos_ids = frozenset()


async def _until(condition: Callable[[], bool], what: str, timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


# -- 1: every weights file the loader opens is a regular file -------------------------------------------
@contextlib.contextmanager
def _unblocking(fifo: Path) -> Iterator[None]:
    """A reader blocked on a FIFO holds the GIL: only another process can free it (a writer opening it,
    after 5 s), so that a regression fails the test instead of freezing the run. Killed once done."""
    opens_for_writing = f"import time; time.sleep(5); open({str(fifo)!r}, 'w').close()"
    unblocker = subprocess.Popen([sys.executable, "-c", opens_for_writing])
    try:
        yield
    finally:
        unblocker.kill()
        unblocker.wait()


def test_index_naming_a_fifo_in_a_subdirectory_is_refused(models_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    bad = root / "bad"
    shutil.copytree(models_root / "tiny", bad)
    (bad / "sub").mkdir()
    fifo = bad / "sub" / "model-00001.safetensors"
    os.mkfifo(fifo)
    index = {"weight_map": {"model.norm.weight": "sub/model-00001.safetensors"}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    engine = _engine(root)
    with _unblocking(fifo), pytest.raises(EngineError) as refused:
        engine.load("bad", str(bad), OPTIONS)
    assert refused.value.reason == "PathNotAllowed"
    assert (
        "sub/model-00001.safetensors" in refused.value.message
        and "not a regular file" in refused.value.message
    )
    shutil.copytree(models_root / "tiny", root / "good")
    engine.load("bad", str(root / "good"), OPTIONS)  # the name is free again
    engine.close()


def test_a_fifo_swapped_in_after_the_check_is_refused_at_open(
    models_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that a weights file is regular and the read that follows are apart: a FIFO put in its
    place between them must be refused when the loader opens it, not read (which would freeze the worker)."""
    from residency_worker.engine import loading

    root = tmp_path / "models"
    swapped = root / "swapped"
    shutil.copytree(models_root / "tiny", swapped)
    weights = next(swapped.glob("*.safetensors"))
    real_check = loading._regular_file

    def check_then_swap(file: Path, directory: Path) -> Path:
        checked = real_check(file, directory)
        file.unlink()
        os.mkfifo(file)  # the swap, just after the check
        return checked

    monkeypatch.setattr(loading, "_regular_file", check_then_swap)
    engine = _engine(root)
    try:
        with _unblocking(weights), pytest.raises(EngineError) as refused:
            engine.load("swapped", str(swapped), OPTIONS)
    finally:
        engine.close()
    assert refused.value.reason == "PathNotAllowed" and "not a regular file" in refused.value.message


# -- 2: a reload of a name waits for its unload; each runner reserves under its own owner ---------------
def test_load_of_a_name_still_unloading_waits_and_keeps_its_reservation(
    models_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(models_root)
    path = str(models_root / "tiny")
    engine.load("tiny", path, OPTIONS)
    old = engine.runner("tiny")
    in_step, step_may_end = threading.Event(), threading.Event()
    forward = old._forward

    def held_forward(*args: Any, **kwargs: Any) -> Any:  # a long step of a big model, ended by the test
        in_step.set()
        step_may_end.wait(30)
        return forward(*args, **kwargs)

    old._forward = held_forward  # type: ignore[method-assign]
    engine.submit("tiny", [1, 2, 3], SamplingParams(max_tokens=2))
    assert in_step.wait(10)
    unloader = threading.Thread(target=engine.unload, args=("tiny",))
    unloader.start()
    deadline = time.monotonic() + 10
    while "tiny" in engine.names():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # the old step ends once the new load either waits for the unload or reads the directory beside it
    old_state_when_read: list[str] = []
    validate = engine_module.validate_model_dir

    def observed_validate(*args: Any) -> Any:
        old_state_when_read.append(old.state)
        step_may_end.set()
        return validate(*args)

    class EndStepWhenLoadWaits(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waits for its previous runner" in record.getMessage():
                step_may_end.set()

    monkeypatch.setattr(engine_module, "validate_model_dir", observed_validate)
    caplog.set_level(logging.INFO, logger=engine_module.__name__)
    handler = EndStepWhenLoadWaits()
    logging.getLogger(engine_module.__name__).addHandler(handler)
    try:
        engine.load("tiny", path, OPTIONS)
    finally:
        logging.getLogger(engine_module.__name__).removeHandler(handler)
        step_may_end.set()
    unloader.join(10)
    new = engine.runner("tiny")
    assert old_state_when_read == ["unloaded"], "the load overlapped the unload of the same name"
    assert new.owner != old.owner
    assert engine.tier.reserved_bytes(new.owner) > 0
    assert engine.tier.reserved_bytes() == engine.tier.reserved_bytes(new.owner)
    assert engine.generate("tiny", [1, 2, 3], SamplingParams(max_tokens=2)).finish_reason is not None
    engine.close()


# -- 3: requests parked by a preemption get the same deadline as new ones -------------------------------
def test_preempt_clears_resumed_before_it_says_preempted(models_root: Path) -> None:
    engine = _engine(models_root)
    engine.load("tiny", str(models_root / "tiny"), OPTIONS)
    runner = engine.runner("tiny")
    state_when_cleared: list[str] = []

    class Resumed(threading.Event):
        def clear(self) -> None:
            state_when_cleared.append(runner.state)
            super().clear()

    runner._resumed = Resumed()
    runner._resumed.set()
    engine.preempt("tiny")
    # whoever reads "preempted" and then waits for the resume must not find the event still set
    assert state_when_cleared == ["ready"]
    assert not engine.wait_until_ready("tiny", 0)
    engine.close()


async def test_requests_in_flight_when_preempted_get_503_after_the_wait(
    served: tuple[Engine, httpx.AsyncClient],
) -> None:
    engine, http = served
    runner = engine.runner("tiny")
    _slow_and_endless(runner)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "temperature": 0}
    whole = asyncio.create_task(http.post("/v1/completions", json=body))
    streamed = asyncio.create_task(http.post("/v1/completions", json={**body, "stream": True}))
    await _until(lambda: runner.active_sequences == 2, "both requests generate")
    preempted = await http.post("/admin/models/tiny/preempt", headers=ADMIN)
    assert preempted.status_code == 200 and preempted.json()["sequences_parked"] == 2
    refused = await asyncio.wait_for(whole, 10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert refused.json()["error"]["code"] == "ModelPreempted"
    stream = await asyncio.wait_for(streamed, 10)
    assert stream.status_code == 200
    data = [line[len("data: ") :] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "ModelPreempted" and error["code"] == 503
    assert error["retry_after"] == RETRY_AFTER_SECONDS
    assert all("choices" in json.loads(d) for d in data[:-2])
    # both were cancelled: after the resume their parked sequences leave the batch at once
    assert (await http.post("/admin/models/tiny/resume", headers=ADMIN)).status_code == 200
    await _until(lambda: runner.active_sequences == 0, "the cancelled sequences leave", 5)
    metrics = (await http.get("/metrics")).text
    assert 'residency_requests_total{model="tiny",outcome="ModelPreempted"} 2.0' in metrics


# -- 4: a non-streaming request is cancelled when its client hangs up -----------------------------------
async def test_non_streaming_request_is_cancelled_when_the_client_hangs_up(
    served: tuple[Engine, httpx.AsyncClient],
) -> None:
    engine, http = served
    runner = engine.runner("tiny")
    _slow_and_endless(runner)
    app = http._transport.app  # type: ignore[attr-defined]
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 200, "temperature": 0}).encode()
    hung_up = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:  # what the server sends the app: the body, then the hang-up
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass  # nobody reads it: the client is gone

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"worker"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("worker", 80),
    }
    call = asyncio.create_task(app(scope, receive, send))
    await _until(lambda: runner.active_sequences == 1, "the request generates")
    request = runner.scheduler.running[0].request
    hung_up.set()
    await asyncio.wait_for(call, 10)
    assert request.finish_reason == "cancelled"
    assert len(request.token_ids) < 200
    await _until(lambda: runner.active_sequences == 0, "its slot is free", 5)
    metrics = (await http.get("/metrics")).text
    assert 'residency_requests_total{model="tiny",outcome="cancelled"} 1.0' in metrics


# -- 5: waiting on a preempted model holds no executor thread -------------------------------------------
async def test_waiters_on_a_preempted_model_leave_threads_for_others(models_root: Path) -> None:
    async with _serve(models_root, preempted_wait_seconds=20) as (engine, http):
        await _waiters_leave_threads_for_others(engine, http, models_root)


async def _waiters_leave_threads_for_others(
    engine: Engine, http: httpx.AsyncClient, models_root: Path
) -> None:
    await asyncio.to_thread(engine.load, "other", str(models_root / "tiny"), OPTIONS)
    assert (await http.post("/admin/models/tiny/preempt", headers=ADMIN)).status_code == 200
    waiter_count = 40  # more than the default executor's threads (at most 32)
    body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 2, "temperature": 0}
    waiters = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(waiter_count)]
    await _until(lambda: engine.status("tiny").queue_depth == waiter_count, "all requests wait")
    # a prompt to tokenise (an executor thread) for another model, and the resume (another thread)
    hello = {"model": "other", "prompt": "Hello", "max_tokens": 2}
    other = await asyncio.wait_for(http.post("/v1/completions", json=hello), 5)
    assert other.status_code == 200
    resumed = await asyncio.wait_for(http.post("/admin/models/tiny/resume", headers=ADMIN), 5)
    assert resumed.status_code == 200
    assert not any(w.done() for w in waiters), "waiters answered before the others got a thread"
    assert [w.status_code for w in await asyncio.gather(*waiters)] == [200] * waiter_count


# -- 6: no series of an unloaded model --------------------------------------------------------------------
async def test_metrics_of_an_unloaded_model_disappear(
    served: tuple[Engine, httpx.AsyncClient], models_root: Path
) -> None:
    engine, http = served
    await asyncio.to_thread(engine.load, "other", str(models_root / "tiny"), OPTIONS)
    for name in ("tiny", "other"):
        ok = await http.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200
    before = (await http.get("/metrics")).text
    assert 'residency_requests_total{model="tiny",outcome="ok"} 1.0' in before
    assert 'residency_queue_depth{model="tiny"}' in before
    assert (await http.delete("/admin/models/tiny", headers=ADMIN)).status_code == 200
    after = (await http.get("/metrics")).text
    assert not [line for line in after.splitlines() if 'model="tiny"' in line]
    assert 'residency_requests_total{model="other",outcome="ok"} 1.0' in after
    assert 'residency_queue_depth{model="other"}' in after
