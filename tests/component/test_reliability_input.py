"""Reliability: bad input to the worker and the router, in process, through the real code paths.

- Broken model directories (corrupt or truncated safetensors, config.json missing or malformed, absurd or
  inconsistent shapes, unsupported architecture, `auto_map` remote code, symlinks escaping the allowed
  roots, a FIFO, a missing or corrupt tokenizer, ...) loaded through the worker's admin API: each is
  refused with a 4xx naming its reason, the operator's validation agrees wherever it can tell without
  loading, and a model already serving keeps serving with its memory untouched.
- Hand-written bad requests (oversized, chunked oversized, invalid JSON, NaN, lone surrogates, negative
  max_tokens, huge n, prompts beyond maxSequenceLength, ...) to the worker and to the router.
- Schema-driven fuzzing (schemathesis, from each app's OpenAPI document) of every operation of both apps.

Everything must answer 4xx with a message (503 with Retry-After where the model is merely not ready),
never 500, never hang, never take the serving model down.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from safetensors.torch import load_file, save_file

from residency.modelgen import make_model
from residency_operator.conditions import Verdict
from residency_operator.router.app import ModelTable
from residency_operator.router.app import create_app as create_router
from residency_operator.router.auth import OpenAccess
from residency_operator.validation import validate_model
from residency_worker.engine import Engine, ModelOptions, make_gpu_tier
from residency_worker.engine import loading as loading_module
from residency_worker.server import ServerSettings, create_app

pytestmark = [pytest.mark.component, pytest.mark.reliability]

ADMIN_TOKEN = "input-admin-token"  # test-only secrets
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GOOD = "good"
MAX_SEQ = 64  # the serving model's maxSequenceLength: keeps fuzzed generations short
ROUTED = f"team/{GOOD}"  # the same model under the name the router forwards (namespace/name)
SERVING = sorted([GOOD, ROUTED])


# -- broken model directories ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Broken:
    """One broken model directory: what the worker must answer, and what the operator says before placing.

    `operator_reason` None: the directory looks sound without loading it (the operator plans it and the
    worker's load fails, which the operator then reports as Failed with the worker's reason)."""

    name: str
    path: Path
    worker_reason: str
    operator_reason: str | None


def _config(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "config.json").read_text()))


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def build_broken(root: Path, outside: Path, good: Path) -> list[Broken]:
    """Writes one broken variant of `good` per class under `root` (and what escapes it under `outside`)."""
    made: list[Broken] = []

    def variant(name: str, worker: str, operator: str | None, mutate: Callable[[Path], None]) -> None:
        directory = root / name
        shutil.copytree(good, directory)
        mutate(directory)
        made.append(Broken(name, directory, worker, operator))

    weights = "model.safetensors"
    variant(
        "weights-garbage",
        "WeightsCorrupt",
        "WeightsCorrupt",
        lambda d: (d / weights).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64),
    )
    variant(
        "weights-truncated",
        "WeightsCorrupt",
        "WeightsCorrupt",
        lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:-4096]),
    )
    variant(
        "weights-empty-file", "WeightsCorrupt", "WeightsCorrupt", lambda d: (d / weights).write_bytes(b"")
    )
    variant(
        "weights-header-absurd",
        "WeightsCorrupt",
        "WeightsCorrupt",
        lambda d: (d / weights).write_bytes((2**63).to_bytes(8, "little") + b"{}"),
    )
    variant("weights-missing", "WeightsMissing", "WeightsMissing", lambda d: (d / weights).unlink())
    variant("config-missing", "ConfigMissing", "ConfigMissing", lambda d: (d / "config.json").unlink())
    variant(
        "config-malformed",
        "ConfigInvalid",
        "ConfigInvalid",
        lambda d: (d / "config.json").write_text('{"model_type": "llama", '),
    )
    variant(
        "config-not-object", "ConfigInvalid", "ConfigInvalid", lambda d: (d / "config.json").write_text("[1]")
    )
    variant(
        "config-deeply-nested",
        "ConfigInvalid",
        "ConfigInvalid",
        lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000),
    )
    variant(
        "config-no-layers",
        "ConfigInvalid",
        "ConfigInvalid",
        lambda d: _write_config(d, {k: v for k, v in _config(d).items() if k != "num_hidden_layers"}),
    )
    variant(
        "config-absurd-layers",
        "ConfigInvalid",
        "ConfigInvalid",
        lambda d: _write_config(d, {**_config(d), "num_hidden_layers": 10**9}),
    )
    variant(
        "config-negative-width",
        "ConfigInvalid",
        "ConfigInvalid",
        lambda d: _write_config(d, {**_config(d), "hidden_size": -64}),
    )
    variant(
        "config-layers-disagree",
        "ConfigInvalid",
        "ConfigInvalid",
        lambda d: _write_config(d, {**_config(d), "num_hidden_layers": 8}),
    )
    variant(
        "config-width-disagrees",
        "WeightsInvalid",
        None,
        lambda d: _write_config(d, {**_config(d), "hidden_size": 96}),
    )
    variant(
        "arch-unsupported",
        "UnsupportedArchitecture",
        "UnsupportedArchitecture",
        lambda d: _write_config(
            d, {**_config(d), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
        ),
    )
    variant(
        "arch-missing",
        "UnsupportedArchitecture",
        "UnsupportedArchitecture",
        lambda d: _write_config(d, {k: v for k, v in _config(d).items() if k != "model_type"}),
    )
    variant(
        "remote-code",
        "RemoteCodeNotAllowed",
        "RemoteCodeNotAllowed",
        lambda d: _write_config(d, {**_config(d), "auto_map": {"AutoModelForCausalLM": "evil.Model"}}),
    )
    variant(
        "tokenizer-missing", "TokenizerMissing", "TokenizerMissing", lambda d: (d / "tokenizer.json").unlink()
    )
    variant(
        "tokenizer-corrupt",
        "TokenizerInvalid",
        None,
        lambda d: (d / "tokenizer.json").write_text('{"model": 7}'),
    )
    variant(
        "tensor-unexpected",
        "WeightsInvalid",
        None,
        lambda d: _edit_tensors(
            d, lambda t: t.update({"model.backdoor.weight": t["model.norm.weight"].clone()})
        ),
    )
    variant(
        "tensor-missing",
        "WeightsInvalid",
        None,
        lambda d: _edit_tensors(d, lambda t: t.pop("model.norm.weight")),
    )
    variant(
        "index-escapes-dir",
        "WeightsInvalid",
        None,
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "../good/model.safetensors"}})
        ),
    )
    # links: the directory, a file in it, a device, a FIFO
    outside_model = outside / "elsewhere"
    shutil.copytree(good, outside_model)
    os.symlink(outside_model, root / "link-dir-escapes")
    made.append(Broken("link-dir-escapes", root / "link-dir-escapes", "PathNotAllowed", "PathNotAllowed"))
    (outside / "config.json").write_text((good / "config.json").read_text())

    def link_config(d: Path) -> None:
        (d / "config.json").unlink()
        os.symlink(outside / "config.json", d / "config.json")

    variant("link-file-escapes", "PathNotAllowed", "PathNotAllowed", link_config)

    def link_dev_zero(d: Path) -> None:
        (d / "tokenizer.json").unlink()
        os.symlink("/dev/zero", d / "tokenizer.json")

    variant("link-to-dev-zero", "PathNotAllowed", "PathNotAllowed", link_dev_zero)

    def fifo(d: Path) -> None:
        (d / weights).unlink()
        os.mkfifo(d / weights)

    variant("weights-fifo", "PathNotAllowed", "PathNotAllowed", fifo)
    # paths that are not model directories at all
    made.append(Broken("path-is-a-file", good / "config.json", "ModelNotFound", "ModelNotFound"))
    made.append(Broken("path-absent", root / "absent", "ModelNotFound", "ModelNotFound"))
    made.append(Broken("path-name-too-long", root / ("x" * 300), "ModelNotFound", "ModelNotFound"))
    made.append(Broken("path-outside-roots", outside_model, "PathNotAllowed", "PathNotAllowed"))
    return made


@dataclass
class Fixture:
    root: Path
    broken: list[Broken]
    engine: Engine


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    """An engine (emulated tier) serving one good tiny model, and the broken directories beside it."""
    base = tmp_path_factory.mktemp("input")
    root, outside = base / "models", base / "outside"
    root.mkdir()
    outside.mkdir()
    make_model(root / GOOD, "llama", "tiny", seed=3, dtype="float32")
    broken = build_broken(root, outside, root / GOOD)
    engine = Engine(make_gpu_tier(64 * 2**20, force_emulated=True), [root], node="input", calibration_bytes=0)
    options = ModelOptions(dtype="float32", max_sequence_length=MAX_SEQ, max_batch_size=4, max_queue=64)
    for name in SERVING:
        engine.load(name, str(root / GOOD), options)
    yield Fixture(root, broken, engine)
    engine.close()


def worker_app(engine: Engine) -> Any:
    return create_app(engine, ServerSettings(admin_token=ADMIN_TOKEN, preempted_wait_seconds=0.2))


@pytest.fixture
async def worker(served: Fixture) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=worker_app(served.engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=60) as client:
        yield client


async def idle_bytes(engine: Engine) -> tuple[int, int]:
    """(reserved, allocated) GPU-tier bytes once no sequence runs: a finished request's KV cache is
    released on the model's thread just after its last event, so the answer can arrive first."""
    deadline = time.monotonic() + 10
    while any(engine.status(n).active_sequences or engine.status(n).queue_depth for n in engine.names()):
        assert time.monotonic() < deadline, "requests still running"
        await asyncio.sleep(0.05)
    previous = None
    while True:  # and until the last cache release has happened
        await asyncio.sleep(0.1)
        now = engine.tier.reserved_bytes(), engine.tier.allocated_bytes()
        if now == previous:
            return now
        previous = now


async def test_broken_model_dirs_fail_with_reason_and_others_keep_serving(
    served: Fixture, worker: httpx.AsyncClient, reliability: Any
) -> None:
    broken = served.broken
    classes = len(broken)
    reliability.record(injected=f"{classes} broken model dirs loaded via admin API + operator validation")
    engine = served.engine
    reserved, allocated = await idle_bytes(engine)
    served_ok, served_failed = 0, 0
    stop = asyncio.Event()

    async def keep_serving() -> None:  # the good model answers throughout
        nonlocal served_ok, served_failed
        while not stop.is_set():
            response = await worker.post(
                "/v1/completions", json={"model": GOOD, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            )
            if response.status_code == 200:
                served_ok += 1
            else:
                served_failed += 1

    background = asyncio.create_task(keep_serving())
    wrong: list[str] = []
    operator_failed, worker_only = 0, 0
    seconds: list[float] = []
    for case in broken:
        started = time.perf_counter()
        response = await asyncio.wait_for(
            worker.post(
                "/admin/models",
                headers=ADMIN,
                json={"name": case.name.replace("_", "-"), "path": str(case.path), "dtype": "float32"},
            ),
            60,
        )
        seconds.append(time.perf_counter() - started)
        error = response.json().get("error", {})
        if not 400 <= response.status_code < 500 or error.get("code") != case.worker_reason:
            wrong.append(f"worker {case.name}: {response.status_code} {response.text[:300]}")
        elif not error.get("message"):
            wrong.append(f"worker {case.name}: no message")
        verdict = validate_model({"source": {"path": str(case.path)}, "dtype": "float32"}, [served.root])
        if isinstance(verdict, Verdict):
            operator_failed += 1
            if verdict.phase != "Failed" or verdict.reason != case.operator_reason or not verdict.message:
                wrong.append(
                    f"operator {case.name}: {verdict.phase} {verdict.reason} (want {case.operator_reason})"
                )
        else:
            worker_only += 1
            if case.operator_reason is not None:
                wrong.append(f"operator {case.name}: accepted, want {case.operator_reason}")
    stop.set()
    await background
    assert wrong == [], "\n".join(wrong)
    assert engine.names() == SERVING, "a broken model was left loaded"
    assert await idle_bytes(engine) == (reserved, allocated)
    assert served_ok > 0 and served_failed == 0, (served_ok, served_failed)
    reasons = collections.Counter(c.worker_reason for c in broken)
    reliability.record(measured=f"{classes}/{classes} refused 4xx with the expected reason, 0 5xx")
    reliability.record(measured=f"operator Failed {operator_failed} before placement, {worker_only} at load")
    reliability.record(measured=f"reasons {dict(sorted(reasons.items()))}")
    reliability.record(measured=f"slowest refusal {max(seconds):.2f} s")
    reliability.record(
        measured=f"good model {served_ok}/{served_ok + served_failed} ok meanwhile; GPU bytes unchanged"
    )


# -- hand-written bad requests ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def worker_url(served: Fixture) -> Iterator[str]:
    """The worker app served over real HTTP (uvicorn in a thread), for the router to forward to."""
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            worker_app(served.engine), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, name="worker-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the worker's HTTP server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def router_table(worker_url: str) -> ModelTable:
    """Routes: team/good is Ready at the worker; others are still loading, failed, or away."""

    def model(name: str, phase: str, endpoint: str | None = None) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": phase, "reason": "Test", "message": "test"}
        if endpoint:
            status["endpoint"] = endpoint
        return {"metadata": {"namespace": "team", "name": name}, "status": status}

    models = [
        model(GOOD, "Ready", f"{worker_url}/v1"),
        model("loading", "Loading"),
        model("broken", "Failed"),
        model("gone", "Ready", "http://127.0.0.1:9/v1"),  # nothing listens there
    ]
    table = ModelTable(lambda: models)
    table.refresh()
    return table


def router_app(worker_url: str) -> Any:
    # open, callers in namespace `team`: bare names resolve there (auth: tests/unit/test_router_tenancy.py)
    return create_router(router_table(worker_url), hold_seconds=0.5, access=OpenAccess("team"))


@dataclass(frozen=True)
class Bad:
    """A bad request and the status it must get (None: any 4xx)."""

    name: str
    path: str
    body: bytes | Callable[[], AsyncIterator[bytes]]
    status: int | None = None
    content_type: str = "application/json"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates travel as \\udXXX escapes


def bad_requests() -> list[Bad]:
    completion = "/v1/completions"
    chat = "/v1/chat/completions"
    ok: dict[str, Any] = {"model": GOOD, "prompt": "Hello", "max_tokens": 4}
    message = [{"role": "user", "content": "hi"}]

    async def chunked_oversized() -> AsyncIterator[bytes]:  # no Content-Length: counted while streamed
        yield b'{"model": "good", "prompt": "'
        for _ in range(20):
            yield b"a" * 2**20
        yield b'"}'

    return [
        Bad("oversized-body", completion, b'{"model":"good","prompt":"' + b"a" * (17 * 2**20) + b'"}', 413),
        Bad("oversized-chunked", completion, chunked_oversized, 413),
        Bad("invalid-json", completion, b'{"model": "good", "prompt": ', None),
        Bad("not-an-object", completion, b"[1, 2, 3]", None),
        Bad("invalid-utf8", completion, b'{"model": "good", "prompt": "\xff\xfe"}', None),
        Bad("deep-nesting", completion, b"[" * 50_000 + b"]" * 50_000, None),
        Bad("nan", completion, b'{"model": "good", "prompt": "hi", "temperature": NaN}', None),
        Bad("infinity", completion, b'{"model": "good", "prompt": "hi", "top_p": -Infinity}', None),
        Bad(
            "wrong-content-type",
            completion,
            b"model=good&prompt=hi",
            None,
            "application/x-www-form-urlencoded",
        ),
        Bad("empty-body", completion, b"", None),
        Bad("model-missing", completion, _json({"prompt": "hi"}), None),
        Bad("model-not-string", completion, _json({"model": 7, "prompt": "hi"}), None),
        Bad("model-unknown", completion, _json({**ok, "model": "nope"}), 404),
        Bad("model-surrogate", completion, _json({**ok, "model": "g\ud800od"}), None),
        Bad("max-tokens-negative", completion, _json({**ok, "max_tokens": -1}), 400),
        Bad("max-tokens-zero", completion, _json({**ok, "max_tokens": 0}), 400),
        Bad("max-tokens-huge", completion, _json({**ok, "max_tokens": 10**12}), 400),
        Bad("max-tokens-string", completion, _json({**ok, "max_tokens": "many"}), 400),
        Bad("n-huge", completion, _json({**ok, "n": 10**9}), 400),
        Bad("n-over-the-limit", completion, _json({**ok, "n": 17}), 400),
        Bad("logit-bias-unsupported", completion, _json({**ok, "logit_bias": {"1": 100}}), 400),
        Bad(
            "tools-unsupported",
            chat,
            _json({"model": GOOD, "messages": message, "tools": [{"type": "function"}]}),
            400,
        ),
        Bad("temperature-negative", completion, _json({**ok, "temperature": -1}), 400),
        Bad("top-p-zero", completion, _json({**ok, "top_p": 0}), 400),
        Bad("seed-overflow", completion, _json({**ok, "seed": 2**80}), 400),
        Bad("stop-too-many", completion, _json({**ok, "stop": ["a", "b", "c", "d", "e"]}), 400),
        Bad("prompt-empty", completion, _json({**ok, "prompt": ""}), 400),
        Bad("prompt-beyond-max-seq", completion, _json({**ok, "prompt": "hello " * 4 * MAX_SEQ}), 400),
        Bad("prompt-ids-beyond-max-seq", completion, _json({**ok, "prompt": [1] * (MAX_SEQ + 1)}), 400),
        Bad("prompt-ids-out-of-vocab", completion, _json({**ok, "prompt": [10**9]}), 400),
        Bad("prompt-ids-negative", completion, _json({**ok, "prompt": [-1, 2]}), 400),
        Bad("prompt-two-strings", completion, _json({**ok, "prompt": ["a", "b"]}), 400),
        Bad("prompt-lone-surrogate", completion, _json({**ok, "prompt": "hi \udc00 there"}), 400),
        Bad("prompt-wrong-type", completion, _json({**ok, "prompt": {"text": "hi"}}), 400),
        Bad("chat-no-messages", chat, _json({"model": GOOD, "messages": []}), 400),
        Bad(
            "chat-bad-role", chat, _json({"model": GOOD, "messages": [{"role": "root", "content": "x"}]}), 400
        ),
        Bad(
            "chat-beyond-max-seq",
            chat,
            _json({"model": GOOD, "messages": [{"role": "user", "content": "hi " * 4 * MAX_SEQ}]}),
            400,
        ),
        Bad(
            "chat-lone-surrogate",
            chat,
            _json({"model": GOOD, "messages": [{"role": "user", "content": "\ud83d"}]}),
            400,
        ),
        Bad(
            "chat-max-tokens-negative",
            chat,
            _json({"model": GOOD, "messages": message, "max_tokens": -5}),
            400,
        ),
        Bad("chat-n-huge", chat, _json({"model": GOOD, "messages": message, "n": 10**6}), 400),
        Bad("unknown-route", "/v1/embeddings", _json(ok), 404),
    ]


def edge_requests() -> list[tuple[str, dict[str, Any]]]:
    """Odd but valid requests: each must be served (200), not refused and not failed."""
    ok: dict[str, Any] = {"model": GOOD, "prompt": "Hello", "max_tokens": 4}
    return [
        ("temperature-tiny", {**ok, "temperature": 1e-300}),
        ("temperature-subnormal", {**ok, "temperature": 5e-324}),
        ("top-p-tiny", {**ok, "top_p": 1e-300}),
        ("seed-min", {**ok, "seed": -(2**63), "temperature": 1}),
        ("seed-max", {**ok, "seed": 2**64 - 1, "temperature": 1}),
        ("max-tokens-beyond-max-seq", {**ok, "max_tokens": 1_000_000, "temperature": 0}),
        ("stop-empty-string", {**ok, "stop": [""]}),
        ("prompt-nul-and-controls", {**ok, "prompt": "a\x00b\x1bc\u202e"}),
        ("prompt-emoji-and-rtl", {**ok, "prompt": "\U0001f600 \u05e9\u05dc\u05d5\u05dd"}),
        ("prompt-one-token-id", {**ok, "prompt": [0]}),
        ("bookkeeping-fields-ignored", {**ok, "user": "x", "metadata": {"k": "v"}, "n": 1}),
    ]


async def _send(client: httpx.AsyncClient, bad: Bad) -> httpx.Response:
    content = bad.body() if callable(bad.body) else bad.body
    return await asyncio.wait_for(
        client.post(bad.path, content=content, headers={"content-type": bad.content_type}), 60
    )


def _explains(response: httpx.Response) -> str:
    """The error message of a 4xx answer ('' when there is none)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    detail = body.get("detail") if isinstance(body, dict) else None
    return json.dumps(detail) if detail else ""


async def test_bad_requests_get_4xx_with_a_message_never_500(
    served: Fixture, worker_url: str, reliability: Any
) -> None:
    cases = bad_requests()
    reliability.record(injected=f"{len(cases)} hand-written bad requests x (worker, router)")
    problems: list[str] = []
    statuses: dict[str, collections.Counter[int]] = {}
    apps = {"worker": worker_app(served.engine), "router": router_app(worker_url)}
    for label, app in apps.items():
        counts: collections.Counter[int] = collections.Counter()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{label}", timeout=60) as client:
            for bad in cases:
                response = await _send(client, bad)
                counts[response.status_code] += 1
                if not 400 <= response.status_code < 500:
                    problems.append(f"{label} {bad.name}: {response.status_code} {response.text[:200]}")
                elif bad.status is not None and response.status_code != bad.status:
                    problems.append(
                        f"{label} {bad.name}: {response.status_code} not {bad.status}: {response.text[:200]}"
                    )
                elif not _explains(response):
                    problems.append(f"{label} {bad.name}: {response.status_code} without a message")
            for name, body in edge_requests():
                response = await asyncio.wait_for(
                    client.post(
                        "/v1/completions", content=_json(body), headers={"content-type": "application/json"}
                    ),
                    60,
                )
                if response.status_code != 200:
                    problems.append(f"{label} {name}: {response.status_code} {response.text[:200]}")
            # still serving afterwards
            good = await client.post("/v1/completions", json={"model": GOOD, "prompt": "Hi", "max_tokens": 3})
            if good.status_code != 200:
                problems.append(
                    f"{label}: the good model stopped serving: {good.status_code} {good.text[:200]}"
                )
        statuses[label] = counts
    assert problems == [], "\n".join(problems)
    for label, counts in statuses.items():
        histogram = ", ".join(f"{code}x{n}" for code, n in sorted(counts.items()))
        reliability.record(
            measured=f"{label}: {sum(counts.values())}/{len(cases)} 4xx with message ({histogram})"
        )
    edges = len(edge_requests())
    reliability.record(measured=f"{edges}/{edges} odd-but-valid requests served 200 by each app")
    reliability.record(measured="0 5xx, 0 hangs; good model served after each app's run")


async def test_router_not_ready_and_unreachable_models_get_retryable_answers(
    worker_url: str, reliability: Any
) -> None:
    reliability.record(injected="requests for loading, failed and unreachable models through the router")
    transport = httpx.ASGITransport(app=router_app(worker_url))
    answers = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://router", timeout=60) as client:
        for model in ("loading", "broken", "gone", "team/nope", "good/../x"):
            response = await client.post("/v1/completions", json={"model": model, "prompt": "hi"})
            answers[model] = (response.status_code, response.headers.get("retry-after"), _explains(response))
    assert answers["loading"][:2] == (503, "5") and answers["loading"][2]
    assert answers["broken"][0] == 409 and answers["broken"][2]
    assert answers["gone"][0] == 503 and answers["gone"][1] is not None and answers["gone"][2]
    assert answers["team/nope"][0] == 404 and answers["good/../x"][0] == 400  # not namespace/name
    reliability.record(measured=", ".join(f"{m}→{a[0]}" for m, a in answers.items()))


# -- schema-driven fuzzing ---------------------------------------------------------------------------
def _examples(config: pytest.Config) -> int:
    return 50 if config.getoption("--reliability-full") else 8


def fuzz(
    app: Any,
    examples: int,
    prepare: Callable[[Any], None],
    restore: Callable[[], None],
    headers: dict[str, str],
) -> tuple[collections.Counter[int], list[str], int]:
    """Every operation of `app`'s OpenAPI document, `examples` valid and (where a body can be invalid)
    `examples` invalid generated requests each; returns the status counts, the failures, operations."""
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    # the worker's schema is for token holders only: fetched with the headers the cases carry
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=headers)
    counts: collections.Counter[int] = collections.Counter()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.body:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            if "{name}" in operation.path:  # half the time aim at the model that is really loaded
                aimed = operation.as_strategy(generation_mode=mode, path_parameters={"name": GOOD})
                strategy = st.one_of(strategy, aimed)
            check = _Checker(f"{operation.label} [{mode}]", prepare, restore, headers, counts, failures)
            check.run(strategy, examples)
    return counts, failures, len(operations)


@dataclass
class _Checker:
    """Sends generated cases of one operation and notes every answer that is not a 2xx/4xx with a message."""

    where: str
    prepare: Callable[[Any], None]
    restore: Callable[[], None]
    headers: dict[str, str]
    counts: collections.Counter[int]
    failures: list[str]

    def run(self, strategy: Any, examples: int) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy, aim=st.booleans())
        def send(case: Any, aim: bool) -> None:
            if aim:
                self.prepare(case)
            self.check(case)
            self.restore()

        send()

    def check(self, case: Any) -> None:
        started = time.perf_counter()
        response = case.call(headers=self.headers, timeout=60)
        status = response.status_code
        self.counts[status] += 1
        retryable = status == 503 and "retry-after" in {k.lower() for k in response.headers}
        if status >= 500 and not retryable:
            self.failures.append(f"{self.where} {status}: {response.text[:200]} <- {str(case.body)[:200]}")
        elif 400 <= status < 500 and status != 405:
            try:
                body = json.loads(response.content)
            except ValueError:
                body = None
            if not isinstance(body, dict) or not ("error" in body or "detail" in body):
                self.failures.append(f"{self.where} {status} without a JSON message")
        if time.perf_counter() - started > 30:
            self.failures.append(f"{self.where} took {time.perf_counter() - started:.0f} s")


def test_worker_api_fuzzed_from_its_openapi_schema(
    served: Fixture, request: pytest.FixtureRequest, reliability: Any
) -> None:
    examples = _examples(request.config)
    reliability.record(injected=f"schemathesis on the worker: {examples} valid + {examples} invalid per op")
    engine = served.engine
    budget = engine.tier.budget_bytes
    options = ModelOptions(dtype="float32", max_sequence_length=MAX_SEQ, max_batch_size=4, max_queue=64)

    def prepare(case: Any) -> None:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = GOOD
        if isinstance(case.body, dict) and case.path == "/admin/models":  # not /admin/profile: hours
            case.body["path"] = str(served.root / GOOD)

    def restore() -> None:  # admin calls may have unloaded, preempted or shrunk it: serve again
        engine.tier.budget_bytes = budget
        for name in engine.names():
            if name not in SERVING:
                engine.unload(name)
        for name in SERVING:
            if name not in engine.names():
                engine.load(name, str(served.root / GOOD), options)
            elif engine.status(name).state == "preempted":
                engine.resume(name)

    started = time.perf_counter()
    counts, failures, operations = fuzz(worker_app(engine), examples, prepare, restore, ADMIN)
    assert failures == [], "\n".join(failures[:20])
    assert engine.names() == SERVING
    histogram = ", ".join(f"{code}x{n}" for code, n in sorted(counts.items()))
    reliability.record(measured=f"{sum(counts.values())} requests over {operations} operations: {histogram}")
    reliability.record(measured=f"0 500s, 0 unanswered; {time.perf_counter() - started:.0f} s")


def test_router_api_fuzzed_from_its_openapi_schema(
    worker_url: str, request: pytest.FixtureRequest, reliability: Any
) -> None:
    examples = _examples(request.config)
    reliability.record(injected=f"schemathesis on the router: {examples} valid + {examples} invalid per op")

    def prepare(case: Any) -> None:
        if isinstance(case.body, dict):
            case.body["model"] = GOOD

    started = time.perf_counter()
    counts, failures, operations = fuzz(router_app(worker_url), examples, prepare, lambda: None, {})
    assert failures == [], "\n".join(failures[:20])
    histogram = ", ".join(f"{code}x{n}" for code, n in sorted(counts.items()))
    reliability.record(measured=f"{sum(counts.values())} requests over {operations} operations: {histogram}")
    reliability.record(measured=f"0 500s, 0 unanswered; {time.perf_counter() - started:.0f} s")


# -- trust_remote_code ---------------------------------------------------------------------------------
def test_remote_code_flag_reaches_transformers_only_under_an_allowed_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reliability: Any
) -> None:
    """No remote code ever runs here: the transformers entry points are wrapped to record the flag they
    get and are then called with trust_remote_code=False (the auto_map names a module that does not exist)."""
    reliability.record(injected="a model declaring auto_map under a plain root and under a remote-code root")
    plain, remote = tmp_path / "plain", tmp_path / "remote"
    for root in (plain, remote):
        make_model(root / "custom", "llama", "tiny", seed=4, dtype="float32")
        config = _config(root / "custom")
        _write_config(root / "custom", {**config, "auto_map": {"AutoConfig": "no_such_module.Config"}})
    make_model(remote / "native", "llama", "tiny", seed=5, dtype="float32")
    seen: list[tuple[str, bool]] = []

    def recording(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, bool(kwargs.get("trust_remote_code"))))
            return real(*args, **{**kwargs, "trust_remote_code": False})

        return call

    for owner, attribute in (
        (loading_module.AutoConfig, "from_pretrained"),
        (loading_module.AutoTokenizer, "from_pretrained"),
        (loading_module.AutoModelForCausalLM, "from_config"),
    ):
        monkeypatch.setattr(
            owner, attribute, recording(f"{owner.__name__}.{attribute}", getattr(owner, attribute))
        )
    options = ModelOptions(dtype="float32", max_sequence_length=32, max_batch_size=1)

    default = Engine(make_gpu_tier(32 * 2**20, force_emulated=True), [plain, remote], calibration_bytes=0)
    for root in (plain, remote):
        with pytest.raises(Exception) as refused:
            default.load("custom", str(root / "custom"), options)
        assert getattr(refused.value, "reason", None) == "RemoteCodeNotAllowed"
    assert seen == [], "transformers was called for a refused model"
    default.close()

    admin = Engine(
        make_gpu_tier(32 * 2**20, force_emulated=True),
        [plain, remote],
        calibration_bytes=0,
        remote_code_roots=[remote],
    )
    with pytest.raises(Exception) as refused:
        admin.load("custom", str(plain / "custom"), options)
    assert getattr(refused.value, "reason", None) == "RemoteCodeNotAllowed", "allowed for another root only"
    admin.load("native", str(remote / "native"), options)
    native = sorted(set(seen))
    seen.clear()
    admin.load("custom", str(remote / "custom"), options)
    custom = sorted(set(seen))
    admin.close()
    assert native and all(flag is False for _, flag in native), native
    assert custom and all(flag is True for _, flag in custom), custom
    # the operator's validation draws the same line
    spec = {"source": {"path": str(remote / "custom")}, "dtype": "float32"}
    assert getattr(validate_model(spec, [plain, remote]), "reason", None) == "RemoteCodeNotAllowed"
    info = validate_model(spec, [plain, remote], [remote])
    assert getattr(info, "trust_remote_code", None) is True
    reliability.record(
        measured="default: refused under both roots (RemoteCodeNotAllowed), transformers never called"
    )
    reliability.record(
        measured=f"remote-code root: {len(custom)} transformers calls with trust_remote_code=True"
    )
    reliability.record(measured="native model under that root and other roots: trust_remote_code=False")
