"""Events for each lifecycle operation a worker measured, and for decode far below the prediction."""

from __future__ import annotations

from typing import Any

import pytest

from residency.sizing import memory_text
from residency_operator.conditions import Verdict, desired_status
from residency_operator.events import (
    OPERATION_REASONS,
    operation_event,
    operation_message,
    prediction_event,
    with_operation,
    with_prediction_check,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (512, "512 B"),
        (8 * 2**20, "8.0 MiB"),
        (700_000, "684 KiB"),
        (24.5 * 2**30, "24.5 GiB"),
        (640 * 2**30, "640 GiB"),
    ],
)
def test_memory_text_picks_the_unit_that_fits(value: float, text: str) -> None:
    assert memory_text(value) == text


def placement(operation: dict[str, Any] | None) -> dict[str, Any]:
    return {"spec": {"nodeName": "gpu-a"}, "status": {"state": "Loaded", "lastOperation": operation}}


RESUME = {
    "action": "Resume",
    "seconds": 0.0213,
    "node": "gpu-a",
    "toFraction": 0.85,
    "movedBytes": 7 * 2**20,
    "gbps": 0.33,
    "requests": 1,
    "time": "2026-12-01T12:00:00Z",
}


def test_each_action_has_an_event_with_its_measured_seconds() -> None:
    for action, reason in OPERATION_REASONS.items():
        operation = {**RESUME, "action": action, "fromFraction": 1.0, "toFraction": 0.6}
        event = operation_event({}, placement(operation))
        assert event is not None and event[0] == "Normal" and event[1] == reason
        assert "in 0.021 s" in event[2] and "gpu-a" in event[2]
    assert operation_message(RESUME) == (
        "resumed on gpu-a in 0.021 s (reloaded 7.0 MiB at 0.33 GB/s; 85% resident; 1 request(s) continued)"
    )
    demote = operation_message({**RESUME, "action": "Demote", "fromFraction": 1.0, "toFraction": 0.6})
    assert demote.startswith("demoted on gpu-a from 100% to 60% resident in 0.021 s")
    preempt = operation_message({"action": "Preempt", "seconds": 0.004, "node": "gpu-a", "requests": 2})
    assert "no KV cache in flight" in preempt and "2 request(s) parked" in preempt


def test_an_operation_is_announced_once() -> None:
    """The model's status keeps the operation it announced: the next round (or a restarted operator)
    posts nothing for it, a new one is posted."""
    verdict = with_operation(Verdict("Ready", "Ready", "serving", ()), placement(RESUME))
    status = desired_status({}, verdict, 1, "2026-12-01T12:00:01Z")
    assert status["lastOperation"] == RESUME
    assert operation_event(status, placement(RESUME)) is None
    later = {**RESUME, "time": "2026-12-01T12:05:00Z", "action": "Preempt"}
    assert operation_event(status, placement(later)) is not None
    assert operation_event({}, placement(None)) is None
    assert operation_event({}, None) is None


def ready(predicted: float | None, observed: float | None) -> Verdict:
    extra: tuple[tuple[str, Any], ...] = (("predictedDecodeTokensPerSecond", predicted),)
    if observed is not None:
        extra += (("observed", {"decodeTokensPerSecond": observed}),)
    return Verdict("Ready", "Ready", "serving", (("Ready", "True", "Ready", "serving"),), extra)


def test_decode_far_below_prediction_is_a_condition_and_one_warning() -> None:
    slow = with_prediction_check(ready(5348.0, 277.0))
    condition = next(c for c in slow.conditions if c[0] == "DecodeAsPredicted")
    assert condition[1:3] == ("False", "DecodeBelowPrediction")
    assert "observed 277.0 tok/s is 5% of the predicted 5348.0 tok/s" in condition[3]
    event = prediction_event({}, slow)
    assert event is not None and event[:2] == ("Warning", "DecodeBelowPrediction")
    # written once: while it stays low, no new Warning each round
    status = desired_status({}, slow, 1, "2026-12-01T12:00:00Z")
    assert prediction_event(status, with_prediction_check(ready(5348.0, 250.0))) is None
    # near the prediction: True and no Warning; no prediction or no observation: no condition
    fine = with_prediction_check(ready(100.0, 80.0))
    assert next(c for c in fine.conditions if c[0] == "DecodeAsPredicted")[1] == "True"
    assert prediction_event(status, fine) is None
    assert with_prediction_check(ready(None, 80.0)).conditions == ready(None, 80.0).conditions
    assert with_prediction_check(ready(100.0, None)).conditions == ready(100.0, None).conditions
    waiting = Verdict("Pending", "NoNodes", "", (), (("predictedDecodeTokensPerSecond", 100.0),))
    assert with_prediction_check(waiting) == waiting
