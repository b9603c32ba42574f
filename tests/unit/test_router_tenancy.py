"""The router's tenancy: who may list, call and wake which model (Kubernetes auth with fake reviews; the
e2e suite makes the same checks with real TokenReview and SubjectAccessReview calls), namespaced names."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from fastapi import Request

from residency_operator.router.app import ModelTable, create_app
from residency_operator.router.auth import Caller, KubernetesAccess
from residency_operator.router.deps import caller
from residency_operator.router.table import qualify

TEAM_A = Caller("system:serviceaccount:team-a:app", "uid-a", ("system:serviceaccounts",))
TEAM_B = Caller("system:serviceaccount:team-b:app", "uid-b", ("system:serviceaccounts",))
TOKENS = {"token-a": TEAM_A, "token-b": TEAM_B}


class FakeReviews:
    """TokenReview and SubjectAccessReview as the API server answers them: a ServiceAccount may `infer` on
    the models of its own namespace; counted, to see the cache."""

    def __init__(self) -> None:
        self.token_reviews = 0
        self.access_reviews = 0
        self.lock = threading.Lock()
        self.fail = False

    def review_token(self, token: str) -> Caller | None:
        with self.lock:
            self.token_reviews += 1
        if self.fail:
            raise ConnectionError("API server away")
        return TOKENS.get(token)

    def review_access(self, caller: Caller, verb: str, namespace: str, name: str) -> bool:
        with self.lock:
            self.access_reviews += 1
        return verb == "infer" and caller.namespace == namespace

    def review_path(self, caller: Caller, verb: str, path: str) -> bool:
        return False  # no tenant may read the router's metrics


def model(namespace: str, name: str, phase: str = "Failed") -> dict[str, Any]:
    metadata = {"namespace": namespace, "name": name, "creationTimestamp": "2026-01-02T03:04:05Z"}
    return {"metadata": metadata, "status": {"phase": phase, "reason": "ConfigInvalid", "message": "m"}}


MODELS = [
    model("team-a", "chat"),
    model("team-a", "sleepy", "Idle"),
    model("team-b", "chat"),
    model("team-b", "sleepy", "Idle"),
]


@pytest.fixture
def reviews() -> FakeReviews:
    return FakeReviews()


def app_for(reviews: FakeReviews, woken: list[str] | None = None) -> Any:
    woken_list = woken if woken is not None else []
    table = ModelTable(lambda: MODELS, refresh_seconds=3600, waker=lambda key, _n: woken_list.append(key))
    table.refresh()
    return create_app(table, hold_seconds=0.3, access=KubernetesAccess(reviews, cache_seconds=60))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_a_tenant_lists_and_calls_its_own_models_and_nobody_elses(reviews: FakeReviews) -> None:
    woken: list[str] = []
    app = app_for(reviews, woken)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        listed = await client.get("/v1/models", headers=bearer("token-a"))
        assert [m["id"] for m in listed.json()["data"]] == ["team-a/chat", "team-a/sleepy"]
        assert listed.json()["data"][0]["created"] == 1767323045
        assert listed.json()["data"][0]["owned_by"] == "team-a"
        one = await client.get("/v1/models/team-a/chat", headers=bearer("token-a"))
        assert one.status_code == 200 and one.json()["id"] == "team-a/chat"
        bare = await client.get("/v1/models/chat", headers=bearer("token-b"))
        assert bare.json()["id"] == "team-b/chat", "a bare name is the caller's own namespace's"
        # team-b's models, existing or not, and waking one: 403 with nothing about the model
        for path, body in (
            ("/v1/completions", {"model": "team-b/chat", "prompt": "x"}),
            ("/v1/completions", {"model": "team-b/no-such-model", "prompt": "x"}),
            ("/v1/chat/completions", {"model": "team-b/sleepy", "messages": []}),
        ):
            refused = await client.post(path, json=body, headers=bearer("token-a"))
            assert refused.status_code == 403, refused.text
            assert refused.json() == {
                "error": {"message": "forbidden", "type": "permission_error", "param": None, "code": None}
            }
        other = await client.get("/v1/models/team-b/chat", headers=bearer("token-a"))
        assert other.status_code == 403 and "team-b" not in other.text
        assert woken == [], "a caller without the right woke a model"
        # its own: the model's own answer (Failed: 409), its own Idle model is woken
        mine = await client.post(
            "/v1/completions", json={"model": "chat", "prompt": "x"}, headers=bearer("token-a")
        )
        assert mine.status_code == 409 and "team-a/chat" in mine.json()["error"]["message"]
        await client.post(
            "/v1/completions", json={"model": "sleepy", "prompt": "x"}, headers=bearer("token-a")
        )
        assert woken == ["team-a/sleepy"]
        missing = await client.get("/v1/models/nope", headers=bearer("token-a"))
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


async def test_anonymous_and_unknown_tokens_get_401_and_probes_name_no_model(reviews: FakeReviews) -> None:
    app = app_for(reviews)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        for headers in ({}, bearer("not-a-token"), {"authorization": "Basic eDp5"}):
            for answer in (
                await client.get("/v1/models", headers=headers),
                await client.get("/v1/models/team-a/chat", headers=headers),
                await client.post("/v1/completions", json={"model": "team-a/chat"}, headers=headers),
                await client.get("/metrics", headers=headers),
            ):
                assert answer.status_code == 401, answer.text
                assert answer.headers["www-authenticate"] == "Bearer"
                assert answer.json()["error"]["type"] == "authentication_error"
        # a tenant may not read the metrics (they name every tenant's models)
        assert (await client.get("/metrics", headers=bearer("token-a"))).status_code == 403
        for probe in ("/healthz", "/readyz"):
            answer = await client.get(probe)
            assert answer.status_code == 200 and "chat" not in answer.text


async def test_a_name_from_another_namespace_never_makes_a_tenants_name_ambiguous(
    reviews: FakeReviews,
) -> None:
    """team-b applying `chat` does not break team-a's clients that say `chat` (the old router said 400)."""
    app = app_for(reviews)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        for token, key in (("token-a", "team-a/chat"), ("token-b", "team-b/chat")):
            answer = await client.post(
                "/v1/completions", json={"model": "chat", "prompt": "x"}, headers=bearer(token)
            )
            assert answer.status_code == 409 and key in answer.json()["error"]["message"]


async def test_reviews_are_cached_and_concurrent_misses_share_one_call(reviews: FakeReviews) -> None:
    app = app_for(reviews)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/completions", json={"model": "chat", "prompt": "x"}, headers=bearer("token-a")
                )
                for _ in range(20)
            )
        )
        assert {a.status_code for a in answers} == {409}
    assert (reviews.token_reviews, reviews.access_reviews) == (1, 1)


async def test_an_api_server_that_cannot_review_gets_a_503_not_a_pass(reviews: FakeReviews) -> None:
    reviews.fail = True
    app = app_for(reviews)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        answer = await client.get("/v1/models", headers=bearer("token-a"))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "2"


def test_a_model_is_its_namespace_and_name_or_the_callers_namespace() -> None:
    assert qualify("chat", "team-a") == "team-a/chat"
    assert qualify("team-b/chat", "team-a") == "team-b/chat"
    for bad in ("", "/chat", "team-a/", "a/b/c", "  "):
        assert qualify(bad, "team-a") is None, bad
    assert Caller("system:serviceaccount:team-a:app").namespace == "team-a"
    assert Caller("alice").namespace is None


async def test_a_model_at_its_limit_still_answers_401_and_403_before_429(reviews: FakeReviews) -> None:
    """The short path of a refusal (router/refuse.py) checks what the full one does, in the same order: no
    token is 401 and another tenant's model 403 even while the gate is full; only the caller's own model
    gets the 429, with Retry-After, and without the framework's request handling (its dependencies)."""
    ready = [
        {**model(namespace, "busy", "Ready"), "status": {"phase": "Ready", "endpoint": "http://127.0.0.1:9"}}
        for namespace in ("team-a", "team-b")
    ]
    table = ModelTable(lambda: ready, refresh_seconds=3600)
    table.refresh()
    app = create_app(table, access=KubernetesAccess(reviews, cache_seconds=60))
    admission = app.state.router.admission
    for key in ("team-a/busy", "team-b/busy"):
        admission.gate(key).in_flight = 10_000  # at its limit
    handled: list[str] = []

    async def counted_caller(request: Request) -> Caller:
        handled.append(request.url.path)
        return await caller(request)

    app.dependency_overrides[caller] = counted_caller
    body = {"model": "busy", "prompt": "x"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        anonymous = await client.post("/v1/completions", json=body)
        assert anonymous.status_code == 401, anonymous.text
        other = await client.post(
            "/v1/chat/completions", json={**body, "model": "team-b/busy"}, headers=bearer("token-a")
        )
        assert other.status_code == 403 and other.json()["error"]["message"] == "forbidden"
        broken = await client.post("/v1/completions", content=b"{not json", headers=bearer("token-a"))
        assert broken.status_code == 400, broken.text
        assert len(handled) == 3, "the app answers what is not a refusal, as it always did"
        for path in ("/v1/completions", "/v1/chat/completions"):
            full = await client.post(path, json=body, headers=bearer("token-a"))
            assert full.status_code == 429, full.text
            assert int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["code"] == "rate_limit_exceeded"
            assert "team-a/busy" in full.json()["error"]["message"]
        assert len(handled) == 3, "a refusal went through the framework's request handling"
    metrics = app.state.router.metrics.registry
    assert metrics.get_sample_value("residency_router_refusal_seconds_count") == 2.0
    assert (
        metrics.get_sample_value(
            "residency_router_refused_total", {"model": "team-a/busy", "reason": "admission"}
        )
        == 2.0
    )
