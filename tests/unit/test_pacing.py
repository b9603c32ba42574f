"""The GPU pacer: who waits, how long, and what wakes a held model."""

from __future__ import annotations

import threading
import time

import pytest

from residency_worker.engine.pacing import PACE_HEADROOM, GpuPacer, pace_interval_seconds


def test_pace_interval_is_the_slo_with_headroom() -> None:
    assert pace_interval_seconds(20.0) == pytest.approx(1 / (PACE_HEADROOM * 20.0))
    assert pace_interval_seconds(None) is None
    assert pace_interval_seconds(0.0) is None


def test_nobody_waits_without_a_hungry_neighbour() -> None:
    pacer = GpuPacer()
    pacer.set_hungry("a", True)  # its own hunger is no reason for it to wait
    start = time.monotonic()
    assert pacer.hold("a", start + 5.0) == 0.0
    assert not pacer.others_hungry("a") and pacer.others_hungry("b")


def test_a_model_waits_for_its_step_while_a_neighbour_is_hungry() -> None:
    pacer = GpuPacer()
    pacer.set_hungry("b", True)
    start = time.monotonic()
    held = pacer.hold("a", start + 0.3)
    assert 0.25 <= held < 2.0
    assert time.monotonic() - start >= 0.29


def test_a_held_model_is_woken_when_its_neighbour_stops_being_hungry() -> None:
    pacer = GpuPacer()
    pacer.set_hungry("b", True)
    threading.Timer(0.1, pacer.set_hungry, ("b", False)).start()
    assert pacer.hold("a", time.monotonic() + 10.0) < 2.0


def test_an_admin_command_interrupts_a_hold() -> None:
    pacer = GpuPacer()
    pacer.set_hungry("b", True)
    start = time.monotonic()
    assert pacer.hold("a", start + 10.0, interrupted=lambda: time.monotonic() - start > 0.1) < 2.0
