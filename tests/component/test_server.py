"""The worker's HTTP API in-process over ASGI: OpenAI shapes, streaming, auth, back-pressure, bad models."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from residency.modelgen import make_model
from residency_worker.engine import Engine, make_gpu_tier
from residency_worker.server import ServerSettings, create_app

pytestmark = pytest.mark.component

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_model(root / "tiny", "llama", "tiny", seed=2, dtype="float32")
    for name in ("remote", "gpt2", "noconfig", "corrupt"):
        shutil.copytree(root / "tiny", root / name)
    config = json.loads((root / "tiny" / "config.json").read_text())
    (root / "remote" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    (root / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    (root / "noconfig" / "config.json").unlink()
    weights = root / "corrupt" / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    return root


@pytest.fixture
async def client(models_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    engine = Engine(
        make_gpu_tier(32 * 2**20, force_emulated=True), [models_root], node="test", calibration_bytes=2**20
    )
    app = create_app(
        engine, ServerSettings(admin_token="admin-secret", preempted_wait_seconds=0.5, retry_after_seconds=3)
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=60) as http:
        response = await http.post(
            "/admin/models",
            headers=ADMIN,
            json={
                "name": "tiny",
                "path": str(models_root / "tiny"),
                "dtype": "float32",
                "resident_fraction": 0.5,
                "decode_mode": "stream",
                "max_sequence_length": 256,
                "max_batch_size": 4,
                "max_queue": 2,
            },
        )
        assert response.status_code == 200, response.text
        yield http
    await asyncio.to_thread(engine.close)


async def test_completion_and_models(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] >= 1
    again = await client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "temperature": 0}
    )
    assert again.json()["choices"][0]["text"] == body["choices"][0]["text"]
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["state"] == "ready"
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready["emulated"] is True and ready["models"] == 1  # a count: probes name no model


async def test_streaming_completion_matches_non_streaming(client: httpx.AsyncClient) -> None:
    request = {"model": "tiny", "prompt": "The scheduler", "max_tokens": 10, "temperature": 0}
    whole = (await client.post("/v1/completions", json=request)).json()["choices"][0]["text"]
    chunks = []
    async with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: ") :])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert len(events) >= 2
    assert "".join(e["choices"][0]["text"] for e in events) == whole
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_completion_streaming(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    whole = (
        await client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0},
        )
    ).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    text = []
    async with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True},
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text.append(delta.get("content", ""))
    assert "".join(text) == whole["choices"][0]["message"]["content"]


async def test_chat_takes_what_openai_sdks_send_and_stop_strings_are_bounded(
    client: httpx.AsyncClient,
) -> None:
    """Content as a list of text parts, `content: null` on an assistant turn, the `developer` role: the
    same prompt as plain strings and `system`. Stop strings over OpenAI's limits are refused (each is
    matched at every token of the batch)."""
    plain = [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "hi there"},
    ]
    sdk = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        },
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
    ]
    answers = []
    for messages in (plain, sdk):
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0},
        )
        assert answer.status_code == 200, answer.text
        answers.append(answer.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]
    for stop in (["a"] * 5, "x" * 257):
        refused = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "stop": stop}
        )
        assert refused.status_code == 400, refused.text
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    refused = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": image})
    assert refused.status_code == 400  # a text model takes no images


async def test_admin_requires_the_token(client: httpx.AsyncClient) -> None:
    assert (await client.post("/admin/models/tiny/preempt")).status_code == 401
    wrong = await client.post("/admin/models/tiny/preempt", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/admin/node")).status_code == 401
    node = await client.get("/admin/node", headers=ADMIN)
    assert node.status_code == 200 and node.json()["emulated"] is True


async def test_queue_bound_gives_429_and_preempted_gives_503(client: httpx.AsyncClient) -> None:
    assert (await client.post("/admin/models/tiny/preempt", headers=ADMIN)).status_code == 200
    request = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    # while preempted, a request waits (0.5 s here) for a resume, then gets 503 with Retry-After
    refused = await client.post("/v1/completions", json=request)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "ModelPreempted"
    engine = client._transport.app.state.engine  # type: ignore[attr-defined]
    assert engine.status("tiny").queue_depth == 0, "a refused request must leave the queue"
    # requests that wait for the resume fill the bounded queue (2); the next one is refused at once
    waiting = [asyncio.create_task(client.post("/v1/completions", json=request)) for _ in range(2)]
    while engine.status("tiny").queue_depth < 2:
        await asyncio.sleep(0.01)
    busy = await client.post("/v1/completions", json=request)
    assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["code"] == "QueueFull"
    resumed = await client.post("/admin/models/tiny/resume", headers=ADMIN)
    assert resumed.status_code == 200 and resumed.json()["reload"]["emulated"] is True
    assert [(await w).status_code for w in waiting] == [200, 200], "waiting requests complete after resume"
    assert (await client.post("/v1/completions", json=request)).status_code == 200


async def test_bad_models_get_clear_4xx_and_serving_continues(
    client: httpx.AsyncClient, models_root: Path
) -> None:
    expected = {
        "remote": (400, "RemoteCodeNotAllowed"),
        "gpt2": (400, "UnsupportedArchitecture"),
        "noconfig": (400, "ConfigMissing"),
        "corrupt": (400, "WeightsCorrupt"),
    }
    for name, (status, code) in expected.items():
        response = await client.post(
            "/admin/models",
            headers=ADMIN,
            json={"name": name, "path": str(models_root / name), "dtype": "float32"},
        )
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
        assert response.json()["error"]["message"]
    outside = await client.post("/admin/models", headers=ADMIN, json={"name": "etc", "path": "/etc"})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "PathNotAllowed"
    missing = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404
    ok = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert ok.status_code == 200


async def test_residency_change_and_metrics(client: httpx.AsyncClient) -> None:
    changed = await client.post(
        "/admin/models/tiny/residency", headers=ADMIN, json={"resident_fraction": 1.0}
    )
    assert changed.status_code == 200 and changed.json()["resident_fraction"] == 1.0
    too_big = await client.post(
        "/admin/models/tiny/residency", headers=ADMIN, json={"resident_fraction": 1.5}
    )
    assert too_big.status_code == 400
    await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    status = (await client.get("/admin/models/tiny", headers=ADMIN)).json()
    assert status["state"] == "ready" and status["timings"]["load_seconds"] > 0
    metrics = (await client.get("/metrics")).text
    assert 'residency_resident_fraction{model="tiny"} 1.0' in metrics
    assert 'residency_requests_total{model="tiny",outcome="ok"}' in metrics
    assert "residency_emulated 1.0" in metrics
    assert 'residency_queue_depth{model="tiny"} 0.0' in metrics
    assert await client.post("/admin/models/tiny/preempt", headers=ADMIN)
    assert (await client.post("/admin/models/tiny/resume", headers=ADMIN)).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'residency_reload_seconds_count{model="tiny"} 1.0' in metrics
    assert 'residency_transfer_gbps{model="tiny",what="reload"}' in metrics
    unloaded = await client.delete("/admin/models/tiny", headers=ADMIN)
    assert unloaded.status_code == 200
    assert (await client.get("/v1/models")).json()["data"] == []


async def test_inference_token_and_admin_profile(models_root: Path) -> None:
    engine = Engine(
        make_gpu_tier(32 * 2**20, force_emulated=True), [models_root], node="test", calibration_bytes=0
    )
    app = create_app(engine, ServerSettings(admin_token="admin-secret", inference_token="user-secret"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=60) as http:
        assert (await http.get("/v1/models")).status_code == 401
        user = {"Authorization": "Bearer user-secret"}
        assert (await http.get("/v1/models", headers=user)).status_code == 200
        assert (await http.get("/admin/node", headers=user)).status_code == 401, "the user token is not admin"
        assert (await http.get("/healthz")).status_code == 200, "probes stay open"
        profile = await http.post(
            "/admin/profile",
            headers=ADMIN,
            json={
                "path": str(models_root / "tiny"),
                "dtype": "float32",
                "fractions": [1.0, 0.0],
                "sequence_lengths": [8],
                "decode_tokens": 3,
                "trials": 1,
            },
        )
        assert profile.status_code == 200, profile.text
        points = profile.json()["points"]
        assert len(points) == 4 and all(p["decodeTokensPerSecond"] > 0 for p in points)
    await asyncio.to_thread(engine.close)
