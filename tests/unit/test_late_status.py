"""A worker reports ``Loading`` only for a load that lasts; a late report never lands after the outcome."""

from __future__ import annotations

import threading
import time

from residency_worker.ack import LateStatus


def test_a_quick_step_writes_nothing() -> None:
    writes: list[str] = []
    late = LateStatus(lambda: writes.append("Loading"), after_seconds=5.0)
    late.settle()
    time.sleep(0.05)
    assert writes == [] and not late.written


def test_a_slow_step_is_reported_once_and_before_settle_returns() -> None:
    writes: list[str] = []
    started = threading.Event()

    def write() -> None:
        started.set()
        time.sleep(0.2)  # the write is still in flight when the step ends
        writes.append("Loading")

    late = LateStatus(write, after_seconds=0.01)
    assert started.wait(5.0)
    late.settle()
    writes.append("Loaded")  # the outcome, reported after settle
    assert writes == ["Loading", "Loaded"] and late.written


def test_zero_delay_writes_at_once_and_a_failed_write_is_not_raised() -> None:
    writes: list[str] = []
    LateStatus(lambda: writes.append("Loading"), after_seconds=0.0).settle()
    assert writes == ["Loading"]

    def broken() -> None:
        raise ConnectionError("API server restarting")

    late = LateStatus(broken, after_seconds=0.0)
    late.settle()
    assert not late.written
