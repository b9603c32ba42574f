"""The worker's bearer tokens are checked before anything reads a request: a caller without its token gets
401 whatever its body holds; the API schema needs a token; the probes stay open and name no model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from residency.modelgen import make_model
from residency_worker.engine import Engine, ModelOptions, make_gpu_tier
from residency_worker.server import ServerSettings, create_app

pytestmark = pytest.mark.component

ADMIN_TOKEN = "hx-admin-secret"  # test-only secrets
USER_TOKEN = "hx-user-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USER = {"Authorization": f"Bearer {USER_TOKEN}"}
MODEL = "hx-secret-model-name"

# bodies a caller without a token may send: none of them may be parsed (or described) for it
BAD_BODIES = [b"{not json", b"", b"[1, 2", b"\xff\xfe", b"[]", b'{"model": 7}', b'{"prompt": NaN}']
NOT_AUTHORISED = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}]
ADMIN_ROUTES = [
    ("POST", "/admin/models"),
    ("POST", "/admin/profile"),
    ("PUT", "/admin/node/budget"),
    ("POST", f"/admin/models/{MODEL}/residency"),
]
INFERENCE_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]


@dataclass
class Served:
    engine: Engine


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("models")
    make_model(root / "tiny", "llama", "tiny", seed=5, dtype="float32")
    engine = Engine(make_gpu_tier(32 * 2**20, force_emulated=True), [root], node="hx", calibration_bytes=0)
    engine.load(MODEL, str(root / "tiny"), ModelOptions(dtype="float32", max_sequence_length=64))
    yield Served(engine)
    engine.close()


def client_of(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker", timeout=60)


@pytest.fixture
async def guarded(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    """Both tokens configured: the admin API and inference are closed to callers without theirs."""
    app = create_app(served.engine, ServerSettings(admin_token=ADMIN_TOKEN, inference_token=USER_TOKEN))
    async with client_of(app) as client:
        yield client


def is_unauthorised(response: httpx.Response) -> bool:
    body = response.json()
    return (
        response.status_code == 401
        and response.headers.get("www-authenticate") == "Bearer"
        and body["error"]["code"] == "Unauthorized"
        and "detail" not in body  # nothing about what the body lacked
    )


async def test_a_caller_without_its_token_gets_401_whatever_the_body(guarded: httpx.AsyncClient) -> None:
    problems = []
    for routes, right in ((ADMIN_ROUTES, ADMIN), (INFERENCE_ROUTES, USER)):
        wrong_kind = USER if right is ADMIN else ADMIN
        for method, path in routes:
            for headers in [*NOT_AUTHORISED, wrong_kind]:
                for body in BAD_BODIES:
                    response = await guarded.request(
                        method, path, content=body, headers={**headers, "content-type": "application/json"}
                    )
                    if not is_unauthorised(response):
                        problems.append(f"{method} {path} {headers} {body!r}: {response.status_code}")
            # with the right token the same bodies are validated as before
            response = await guarded.request(
                method, path, content=b"{not json", headers={**right, "content-type": "application/json"}
            )
            if response.status_code != 400 or "not valid JSON" not in response.json()["error"]["message"]:
                problems.append(f"{method} {path} with its token: {response.status_code} {response.text}")
    assert problems == [], "\n".join(problems)


async def test_the_admin_api_without_a_configured_token_refuses_before_parsing(served: Served) -> None:
    app = create_app(served.engine, ServerSettings(admin_token=None))
    async with client_of(app) as client:
        for method, path in ADMIN_ROUTES:
            for headers in ({}, ADMIN):
                response = await client.request(method, path, content=b"{not json", headers=headers)
                assert is_unauthorised(response), (method, path, response.status_code, response.text)
                assert "disabled" in response.json()["error"]["message"]
        # inference without a configured token stays open: a bad body is described, as before
        open_inference = await client.post("/v1/completions", content=b"{not json")
        assert open_inference.status_code == 400


async def test_an_unauthenticated_body_is_never_read(served: Served) -> None:
    """Not even buffered: an unauthenticated caller cannot make the worker take in 16 MiB to refuse."""
    app = create_app(served.engine, ServerSettings(admin_token=ADMIN_TOKEN, inference_token=USER_TOKEN))
    sent: list[MutableMapping[str, Any]] = []
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * (32 * 2**20), "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    for path in ("/admin/models", "/v1/completions"):
        sent.clear()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"worker"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("worker", 80),
        }
        await app(scope, receive, send)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 401, (path, sent[0])
        assert json.loads(sent[1]["body"])["error"]["code"] == "Unauthorized"
    assert reads == 0


async def test_the_api_schema_needs_a_token_and_no_docs_page_is_served(
    served: Served, guarded: httpx.AsyncClient
) -> None:
    for headers in NOT_AUTHORISED:
        assert is_unauthorised(await guarded.get("/openapi.json", headers=headers)), headers
    for headers in (ADMIN, USER):
        schema = await guarded.get("/openapi.json", headers=headers)
        assert schema.status_code == 200 and "/admin/models" in schema.json()["paths"]
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        for headers in ({}, ADMIN):
            response = await guarded.get(page, headers=headers)
            assert response.status_code in (401, 404), (page, headers, response.status_code)
            assert "swagger" not in response.text.lower() and "redoc" not in response.text.lower()
    # no token configured at all: no schema for anyone
    async with client_of(create_app(served.engine, ServerSettings())) as bare:
        assert is_unauthorised(await bare.get("/openapi.json"))
        assert is_unauthorised(await bare.get("/openapi.json", headers=ADMIN))


async def test_probes_need_no_token_and_name_no_model_and_metrics_are_as_private_as_inference(
    guarded: httpx.AsyncClient, served: Served
) -> None:
    # a kubelet carries no token: the probes are open, and so they name no model; /metrics names the
    # models (labels), so it takes a token wherever inference does (the chart's ServiceMonitor has one)
    assert (await guarded.get("/healthz")).status_code == 200
    for headers in NOT_AUTHORISED:
        ready = await guarded.get("/readyz", headers=headers)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert MODEL not in ready.text
        assert is_unauthorised(await guarded.get("/metrics", headers=headers)), headers
    for headers in (USER, ADMIN):
        metrics = await guarded.get("/metrics", headers=headers)
        assert metrics.status_code == 200 and "residency_" in metrics.text
    # a worker whose inference is open (no inference token) has open metrics too
    async with client_of(create_app(served.engine, ServerSettings(admin_token=ADMIN_TOKEN))) as open_worker:
        assert (await open_worker.get("/metrics")).status_code == 200


async def test_requests_with_the_token_are_still_served(guarded: httpx.AsyncClient) -> None:
    listed = await guarded.get("/v1/models", headers=USER)
    assert [m["id"] for m in listed.json()["data"]] == [MODEL]
    answer = await guarded.post(
        "/v1/completions", headers=USER, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    )
    assert answer.status_code == 200, answer.text
    node = await guarded.get("/admin/node", headers=ADMIN)
    assert node.status_code == 200
