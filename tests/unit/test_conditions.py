"""Conditions follow Kubernetes conventions and a repeated reconcile changes nothing."""

from __future__ import annotations

from residency_operator.conditions import Verdict, desired_status, set_condition, status_patch

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
