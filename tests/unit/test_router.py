"""The router's answer for a model its periodic table has not listed yet."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx

from residency_operator.router.app import ModelTable, create_app

BODY = {"model": "team/fresh", "prompt": "hi", "max_tokens": 1}


class Lister:
    """The API server as the router sees it: `team/fresh` appears after the first listing."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> list[dict[str, Any]]:
        with self.lock:
            self.calls += 1
            if self.calls == 1:
                return []
        status = {"phase": "Failed", "reason": "ConfigInvalid", "message": "bad config"}
        return [{"metadata": {"namespace": "team", "name": "fresh"}, "status": status}]


async def test_a_model_applied_after_the_last_listing_is_looked_up_before_a_404() -> None:
    lister = Lister()
    table = ModelTable(lister, refresh_seconds=3600)
    table.refresh()  # the periodic listing: before the model was applied
    app = create_app(table, hold_seconds=0.5)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        answers = await asyncio.gather(*(client.post("/v1/completions", json=BODY) for _ in range(20)))
        # the model exists (it failed validation): its own answer, never "does not exist"
        assert {a.status_code for a in answers} == {409}, answers[0].text
        assert "ConfigInvalid" in answers[0].json()["error"]["message"]
        assert lister.calls == 2, "twenty concurrent misses share one listing"
        missing = await client.post("/v1/completions", json={**BODY, "model": "team/nope"})
        assert missing.status_code == 404 and "does not exist" in missing.json()["error"]["message"]
        assert lister.calls == 3


async def test_forced_listings_are_rate_limited() -> None:
    lister = Lister()
    table = ModelTable(lister, refresh_seconds=3600, min_forced_refresh_seconds=0.2)
    table.refresh()
    app = create_app(table, hold_seconds=0.5)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        started = loop.time()
        for _ in range(4):
            answer = await client.post("/v1/completions", json={**BODY, "model": "team/nope"})
            assert answer.status_code == 404
        elapsed = loop.time() - started
    assert lister.calls == 5
    assert elapsed >= 0.55, f"4 forced listings 0.2 s apart took only {elapsed:.2f} s"


def test_a_failed_lookup_keeps_the_table() -> None:
    def broken() -> list[dict[str, Any]]:
        raise ConnectionError("API server away")

    table = ModelTable(broken)
    table.models = {"team/kept": {"metadata": {"namespace": "team", "name": "kept"}}}
    table.ensure_listed_since(1.0)
    assert list(table.models) == ["team/kept"]


async def test_a_request_for_a_model_that_is_not_running_tells_the_operator_it_is_wanted() -> None:
    phases = {"held": "Preempted", "refused": "Unschedulable", "broken": "Failed", "coming": "Loading"}
    models = [
        {"metadata": {"namespace": "team", "name": name}, "status": {"phase": phase, "reason": "R"}}
        for name, phase in phases.items()
    ]
    woken: list[str] = []
    table = ModelTable(lambda: models, refresh_seconds=3600, waker=lambda key, _waiting: woken.append(key))
    table.refresh()
    app = create_app(table, hold_seconds=0.3)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        answers = {
            name: await client.post("/v1/completions", json={**BODY, "model": f"team/{name}"})
            for name in phases
        }
    assert {name: a.status_code for name, a in answers.items()} == {
        "held": 503,
        "refused": 503,
        "broken": 409,
        "coming": 503,
    }
    assert answers["refused"].headers["retry-after"] == "5" and "retry-after" not in answers["broken"].headers
    assert "asked the operator for room" in answers["refused"].json()["error"]["message"]
    # held for 0.3 s with a wake at most every 2 s: once each; a failed or loading model is not woken
    assert sorted(woken) == ["team/held", "team/refused"]


async def test_the_wake_says_how_many_requests_the_router_holds_for_the_model() -> None:
    """The planner values a model that is not running by the requests waiting for it: three held at once
    are told as three (the first wake of a burst may see only the first), and they are not counted once
    they have gone."""
    models = [{"metadata": {"namespace": "team", "name": "held"}, "status": {"phase": "Preempted"}}]
    woken: list[tuple[str, int]] = []
    table = ModelTable(lambda: models, refresh_seconds=3600, waker=lambda key, n: woken.append((key, n)))
    table.refresh()
    app = create_app(table, hold_seconds=3.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        answers = await asyncio.gather(
            *(client.post("/v1/completions", json={**BODY, "model": "team/held"}) for _ in range(3))
        )
        assert [a.status_code for a in answers] == [503, 503, 503]
        # held 3 s with a wake at most every 2 s: at most twice; the one 2 s in sees all three
        assert 1 <= len(woken) <= 2 and woken[-1] == ("team/held", 3)
        table._woken.clear()  # the next request may wake at once
        count = len(woken)
        await client.post("/v1/completions", json={**BODY, "model": "team/held"})
    assert woken[count] == ("team/held", 1)


async def test_every_v1_route_needs_the_clients_token() -> None:
    """The model list names every tenant's models: it is as private as a completion."""
    lister = Lister()
    table = ModelTable(lister, refresh_seconds=3600)
    table.refresh()
    table.refresh()  # now lists team/fresh
    app = create_app(table, hold_seconds=0.1, token="client-secret")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            assert (await client.get("/v1/models", headers=headers)).status_code == 401
            assert (await client.post("/v1/completions", json=BODY, headers=headers)).status_code == 401
        # the scheme's case does not matter (RFC 7235)
        listed = await client.get("/v1/models", headers={"authorization": "bearer client-secret"})
        assert listed.status_code == 200
        assert [m["id"] for m in listed.json()["data"]] == ["team/fresh"]
        assert (await client.get("/healthz")).status_code == 200  # probes carry no token
