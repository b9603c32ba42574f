"""A 429 (the API server's fairness queues are full; nothing was done) is asked again after the time the
server names, bounded; any other refusal, and a 429 that does not end, still raises."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from residency.kubeapi import MAX_RETRY_AFTER_SECONDS, RETRIES_429, TimeoutApiClient, retry_after_seconds
from residency_operator.kube import Kube


class Answer:
    """An HTTP answer as the kubernetes client's exceptions read it."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status, self.reason, self.data = status, "Too Many Requests", b"{}"
        self._headers = headers or {}

    def getheaders(self) -> dict[str, str]:
        return self._headers


def scripted(monkeypatch: pytest.MonkeyPatch, answers: list[Answer]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> str:
        calls.append(kwargs)
        answer = answers.pop(0)
        if answer.status >= 400:
            raise ApiException(http_resp=answer)
        return "created"

    monkeypatch.setattr(client.ApiClient, "request", request)
    return calls


def test_a_429_is_asked_again_after_its_retry_after_and_the_write_goes_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = scripted(monkeypatch, [Answer(429, {"Retry-After": "1"}), Answer(429), Answer(201)])
    waits: list[float] = []
    api = TimeoutApiClient(retries_429=RETRIES_429, sleep=waits.append)
    assert api.request("POST", "https://api/apis/x") == "created"
    assert len(calls) == 3 and api.throttled == 2
    assert all(0.5 <= w <= 1.0 for w in waits)  # Retry-After 1 s (and 1 s without one), with jitter
    assert all(c["_request_timeout"] == api.timeout_seconds for c in calls)


def test_a_long_retry_after_is_capped_and_a_429_that_does_not_end_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted(monkeypatch, [Answer(429, {"Retry-After": "13"}) for _ in range(4)])
    waits: list[float] = []
    api = TimeoutApiClient(retries_429=3, sleep=waits.append)
    with pytest.raises(ApiException) as refused:
        api.request("PUT", "https://api/apis/x")
    assert refused.value.status == 429
    assert len(waits) == 3 and all(w <= MAX_RETRY_AFTER_SECONDS for w in waits)


def test_other_refusals_raise_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for status in (403, 409, 422, 500):
        calls = scripted(monkeypatch, [Answer(status), Answer(201)])
        api = TimeoutApiClient(
            retries_429=RETRIES_429, sleep=lambda s: pytest.fail("no wait for a refusal that is not a 429")
        )
        with pytest.raises(ApiException):
            api.request("POST", "https://api/apis/x")
        assert len(calls) == 1


def test_a_retry_after_that_is_not_a_number_waits_a_second() -> None:
    assert 0.5 <= retry_after_seconds(ApiException(http_resp=Answer(429, {"Retry-After": "soon"}))) <= 1.0
    assert retry_after_seconds(ApiException(http_resp=Answer(429, {"Retry-After": "-4"}))) == 0.0


def test_only_the_operators_writer_asks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node agent (and an informer) that is refused waits for its own next period: a thousand of them
    asking again within seconds would keep the API server's queues full."""
    calls = scripted(monkeypatch, [Answer(429), Answer(201)])
    with pytest.raises(ApiException):
        TimeoutApiClient(sleep=lambda s: pytest.fail("an agent does not wait here")).request("PUT", "u")
    assert len(calls) == 1
    monkeypatch.setattr("kubernetes.config.load_kube_config", lambda *a, **k: None)
    writer = Kube().custom.api_client
    assert isinstance(writer, TimeoutApiClient) and writer.retries_429 == RETRIES_429
