"""When a worker tries again a placement it refused."""

from __future__ import annotations

import time

from residency_worker.agent import _Failure


def test_a_refusal_for_room_is_retried_once_room_frees_or_after_a_while() -> None:
    failure = _Failure(3, "PlacementDoesNotFit", "no room", 1000, 4000, time.monotonic())
    assert not failure.retry_now(1000, 4000, retry_seconds=60)  # nothing changed yet
    assert not failure.retry_now(1500, 4000, retry_seconds=60)  # others took more
    assert failure.retry_now(900, 4000, retry_seconds=60)  # another model shrank or left
    assert failure.retry_now(1000, 5000, retry_seconds=60)  # the node's budget grew
    assert failure.retry_now(1000, 4000, retry_seconds=0)  # and in any case every retry_seconds


def test_other_failures_wait_for_a_new_spec() -> None:
    failure = _Failure(3, "WeightsCorrupt", "bad shard", 1000, 4000, time.monotonic() - 3600)
    assert not failure.retry_now(0, 10**9, retry_seconds=0)
