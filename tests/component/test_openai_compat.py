"""OpenAI compatibility, tested with the official `openai` client through the router to a real worker (a tiny
real model): every endpoint and parameter the docs promise, plain and streamed, and OpenAI's error shape and
status codes (400, not 422; unsupported parameters refused by name)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from residency.modelgen import make_model
from residency_operator.router.app import ModelTable, create_app
from residency_worker.engine import Engine, ModelOptions, make_gpu_tier
from residency_worker.server import ServerSettings
from residency_worker.server import create_app as create_worker_app

pytestmark = pytest.mark.component

MODEL = "team/tiny"
ROUTER_TOKEN = "router-secret"  # the workers' inference token: only the router holds it
CLIENT_TOKEN = "client-secret"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def worker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker over real HTTP (uvicorn in a thread) serving `team/tiny`, as the agent names models."""
    root = tmp_path_factory.mktemp("models")
    make_model(root / "tiny", "llama", "tiny", seed=5, dtype="float32")
    engine = Engine(
        make_gpu_tier(64 * 2**20, force_emulated=True), [root], node="test", calibration_bytes=2**20
    )
    engine.load(
        MODEL, str(root / "tiny"), ModelOptions(dtype="float32", max_sequence_length=256, max_batch_size=8)
    )
    app = create_worker_app(engine, ServerSettings(admin_token="admin-secret", inference_token=ROUTER_TOKEN))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    engine.close()


@pytest.fixture
async def client(worker_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client, pointed at the router (in-process), which forwards to the worker."""
    ready = {
        "metadata": {"namespace": "team", "name": "tiny", "creationTimestamp": "2026-03-04T05:06:07Z"},
        "status": {"phase": "Ready", "endpoint": f"{worker_url}/v1"},
    }
    table = ModelTable(lambda: [ready], refresh_seconds=3600)
    table.refresh()
    router = create_app(table, hold_seconds=5, token=CLIENT_TOKEN, worker_token=ROUTER_TOKEN)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://router", timeout=120)
    async with openai.AsyncOpenAI(
        base_url="http://router/v1", api_key=CLIENT_TOKEN, http_client=http, max_retries=0
    ) as api:
        yield api


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    listed = [m async for m in client.models.list()]
    assert [(m.id, m.object, m.owned_by) for m in listed] == [(MODEL, "model", "team")]
    assert listed[0].created == 1772600767
    one = await client.models.retrieve(MODEL)
    assert one.id == MODEL and one.created == listed[0].created
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("team/nope")
    assert missing.value.status_code == 404 and set(_error(missing.value)) == ERROR_KEYS


async def test_completions_with_n_seed_and_logprobs(client: openai.AsyncOpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "prompt": "The scheduler",
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 7,
    }
    first = await client.completions.create(n=3, logprobs=2, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    again = await client.completions.create(n=3, logprobs=2, **kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices], "a seeded request repeats"
    assert len({c.text for c in first.choices}) > 1, "choices sampled with the same seed"
    assert first.usage is not None
    for choice in first.choices:
        logprobs = choice.logprobs
        assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
        assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in first.choices if c.logprobs)


async def test_chat_with_n_and_top_logprobs(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        max_completion_tokens=5,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].message.content == answer.choices[1].message.content, "greedy choices agree"
    content = answer.choices[0].logprobs.content if answer.choices[0].logprobs else None
    assert content and answer.usage is not None
    assert answer.usage.completion_tokens == 2 * len(content)
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        # greedy: the chosen token is the likeliest one
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.bytes == list(token.token.encode())


async def test_streams_with_usage_match_the_plain_answer(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Count with me"}]
    plain = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    roles: dict[int, str | None] = {}
    chunks = [chunk async for chunk in stream]
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        choice = chunk.choices[0]
        roles.setdefault(choice.index, choice.delta.role)
        texts[choice.index] += choice.delta.content or ""
    assert roles == {0: "assistant", 1: "assistant"}, "each choice's first chunk carries the role"
    assert texts[0] == texts[1] == plain.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and plain.usage is not None
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert last.usage.completion_tokens == 2 * plain.usage.completion_tokens

    completion = await client.completions.create(
        model=MODEL,
        prompt="Once",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = [chunk async for chunk in completion]
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens >= 1
    assert "".join(p.choices[0].text for p in parts[:-1] if p.choices)


async def test_unsupported_and_invalid_parameters_are_400_in_one_shape(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    tool: Any = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("tools", {"tools": [tool]}),
        ("response_format", {"response_format": {"type": "json_object"}}),
        ("logit_bias", {"logit_bias": {"1": 5}}),
        ("max_tokens", {"max_tokens": -1}),
        ("n", {"n": 1000}),
        ("top_logprobs", {"top_logprobs": 2}),  # without logprobs: true
    ]
    for param, extra in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model=MODEL, messages=messages, **extra)
        error = _error(refused.value)
        assert refused.value.status_code == 400 and set(error) == ERROR_KEYS, (param, error)
        assert error["param"] == param and error["type"] == "invalid_request_error", (param, error)
    # accepted as neutral: the values that ask for nothing
    fine = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=2,
        response_format={"type": "text"},
        user="u",
        tool_choice="none",
    )
    assert fine.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.AuthenticationError) as anonymous:
        await openai.AsyncOpenAI(
            base_url="http://router/v1", api_key="wrong", http_client=client._client, max_retries=0
        ).models.list()
    assert set(_error(anonymous.value)) == ERROR_KEYS


async def test_the_worker_serves_only_the_router(worker_url: str) -> None:
    async with httpx.AsyncClient(base_url=worker_url, timeout=30) as http:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        for headers in ({}, {"authorization": f"Bearer {CLIENT_TOKEN}"}):
            assert (await http.post("/v1/completions", json=body, headers=headers)).status_code == 401
            assert (await http.get("/metrics", headers=headers)).status_code == 401
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and "tiny" not in ready.text, "a probe named a model"
        served = await http.post(
            "/v1/completions", json=body, headers={"authorization": f"Bearer {ROUTER_TOKEN}"}
        )
        assert served.status_code == 200 and float(served.headers["x-residency-ttft-seconds"]) >= 0
        assert (
            float(served.headers["x-residency-decode-seconds"]) >= 0
        )  # the router's TTFT: its wait less this


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    """The `error` object of an error answer (the client hands over its body's `error`)."""
    body = exc.body
    assert isinstance(body, dict), body
    return body.get("error", body)
