"""Conditions follow Kubernetes conventions and a repeated reconcile changes nothing."""

from __future__ import annotations

from residency_operator.conditions import (
    MESSAGE_MAX_CHARS,
    Verdict,
    desired_status,
    set_condition,
    status_patch,
)

VERDICT = Verdict(
    phase="Pending",
    reason="NoNodes",
    message="no nodes",
    conditions=(("Validated", "True", "ModelValid", "ok"), ("Scheduled", "False", "NoNodes", "no nodes")),
)


def test_transition_time_moves_only_when_status_changes() -> None:
    first = set_condition([], "Ready", "False", "NoNodes", "m", 1, "2026-01-01T00:00:00Z")
    same = set_condition(first, "Ready", "False", "Other", "m2", 2, "2026-01-02T00:00:00Z")
    flipped = set_condition(same, "Ready", "True", "Loaded", "m3", 2, "2026-01-03T00:00:00Z")
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["reason"] == "Other" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"


def test_reconcile_is_idempotent() -> None:
    first = desired_status({}, VERDICT, 3, "2026-01-01T00:00:00Z")
    second = desired_status(first, VERDICT, 3, "2026-01-05T00:00:00Z")
    assert status_patch(first, second) == {}
    assert first["observedGeneration"] == 3
    assert [c["type"] for c in first["conditions"]] == ["Scheduled", "Validated"]


def test_new_generation_is_patched() -> None:
    first = desired_status({}, VERDICT, 3, "2026-01-01T00:00:00Z")
    second = desired_status(first, VERDICT, 4, "2026-01-05T00:00:00Z")
    patch = status_patch(first, second)
    assert set(patch) == {"observedGeneration", "conditions"}
    assert all(c["lastTransitionTime"] == "2026-01-01T00:00:00Z" for c in patch["conditions"])


def test_a_model_that_fails_after_it_ran_no_longer_shows_where_it_ran() -> None:
    """A Ready model whose spec then fails validation: its node, residency, endpoint and the conditions
    of the old placement go (the merge patch removes them); its measured timings stay."""
    ready = Verdict(
        phase="Ready",
        reason="Ready",
        message="serving",
        conditions=(
            ("Validated", "True", "ModelValid", "ok"),
            ("Scheduled", "True", "Placed", "placed on gpu-a-1"),
            ("Loaded", "True", "Loaded", "serving"),
            ("Ready", "True", "Ready", "serving"),
            ("Degraded", "False", "SLOMet", "meets"),
        ),
        extra=(("node", "gpu-a-1"), ("residentPercent", 100), ("endpoint", "http://10.0.0.7:8100")),
    )
    running = {**desired_status({}, ready, 1, "2026-01-01T00:00:00Z"), "timings": {"reloadSeconds": 0.3}}
    failed = Verdict(
        phase="Failed",
        reason="ModelNotFound",
        message="x" * 10_000,
        conditions=(
            ("Validated", "False", "ModelNotFound", "x" * 10_000),
            ("Ready", "False", "ModelNotFound", "gone"),
        ),
    )
    patch = status_patch(running, desired_status(running, failed, 2, "2026-01-02T00:00:00Z"))
    assert patch["node"] is None and patch["residentPercent"] is None and patch["endpoint"] is None
    assert "timings" not in patch
    assert [c["type"] for c in patch["conditions"]] == ["Ready", "Validated"]
    assert all(c["observedGeneration"] == 2 for c in patch["conditions"])
    assert len(patch["message"]) == MESSAGE_MAX_CHARS
    assert all(len(c["message"]) <= MESSAGE_MAX_CHARS for c in patch["conditions"])
