"""Events go out in the background: a round hands them over without waiting for a slow API server, a full
queue drops new Events (counted) instead of blocking, and the queue drains in order."""

from __future__ import annotations

import threading
import time
from typing import Any

from residency_operator.recorder import EventRecorder


class SlowApi:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.posted: list[str] = []

    def post(self, body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        self.release.wait(30)
        self.posted.append(reason)


def test_recording_does_not_wait_for_a_slow_api_server_and_posts_in_order() -> None:
    api = SlowApi()
    recorder = EventRecorder(api.post)
    started = time.monotonic()
    for i in range(50):
        recorder.record({"metadata": {"name": "m"}}, "Normal", f"R{i}", "loaded")
    assert time.monotonic() - started < 1.0, "recording waited for the API server"
    assert api.posted == []
    api.release.set()
    assert recorder.flush(10.0)
    assert api.posted == [f"R{i}" for i in range(50)]
    assert recorder.posted == 50 and recorder.dropped == 0


def test_a_full_queue_drops_new_events_and_counts_them() -> None:
    api = SlowApi()
    recorder = EventRecorder(api.post, capacity=5)
    for i in range(20):
        recorder.record({"metadata": {"name": "m"}}, "Normal", f"R{i}", "loaded")
    # one Event may already be in the poster's hands; the queue holds 5 more; the rest are dropped
    assert 14 <= recorder.dropped <= 15
    api.release.set()
    assert recorder.flush(10.0)
    assert len(api.posted) + recorder.dropped == 20
    numbers = [int(reason[1:]) for reason in api.posted]
    assert numbers == sorted(numbers), "kept in order"
    assert numbers[:5] == [0, 1, 2, 3, 4], "what was queued first is kept; what came to a full queue is not"


def test_one_failing_event_does_not_stop_the_others() -> None:
    posted: list[str] = []

    def post(body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        if reason == "bad":
            raise RuntimeError("refused")
        posted.append(reason)

    recorder = EventRecorder(post)
    for reason in ("a", "bad", "b"):
        recorder.record({}, "Normal", reason, "")
    assert recorder.flush(10.0)
    assert posted == ["a", "b"]
