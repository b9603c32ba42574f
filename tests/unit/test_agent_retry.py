"""When a worker tries again a placement it refused."""

from __future__ import annotations

from residency_worker.agent import _Failure


def test_a_refusal_for_room_is_retried_once_room_frees() -> None:
    failure = _Failure(3, "PlacementDoesNotFit", "no room", 1000, 4000)
    assert not failure.retry_now(1000, 4000)  # nothing changed: a retry would read the weights for nothing
    assert not failure.retry_now(1500, 4000)  # others took more
    assert failure.retry_now(900, 4000)  # another model shrank or left
    assert failure.retry_now(1000, 5000)  # the node's budget grew


def test_other_failures_wait_for_a_new_spec() -> None:
    failure = _Failure(3, "WeightsCorrupt", "bad shard", 1000, 4000)
    assert not failure.retry_now(0, 10**9)
