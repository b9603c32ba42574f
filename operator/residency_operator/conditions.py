"""Pure builders of Kubernetes-convention conditions and of the LLMModel status a reconcile wants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from residency.api import Condition, ConditionStatus, Phase


def now_rfc3339() -> str:
    """Current UTC time as the API server writes it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MESSAGE_MAX_CHARS = 4096
"""The longest message a condition or status carries (the CRD schema's limit)."""


def clip_message(message: str) -> str:
    """``message`` cut to :data:`MESSAGE_MAX_CHARS` (a path or an API answer may be longer)."""
    return message if len(message) <= MESSAGE_MAX_CHARS else message[: MESSAGE_MAX_CHARS - 1] + "…"


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """A new condition list with `type_` set; lastTransitionTime moves only when status changes."""
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = now
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    condition = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=clip_message(message),
        observed_generation=observed_generation,
    ).to_wire()
    condition["lastTransitionTime"] = transition
    others = [c for c in conditions if c.get("type") != type_]
    return sorted([*others, condition], key=lambda c: str(c.get("type")))


@dataclass(frozen=True)
class Verdict:
    """What one reconcile concluded about a model, before it is written as status."""

    phase: Phase
    reason: str
    message: str
    conditions: tuple[tuple[str, ConditionStatus, str, str], ...]
    extra: tuple[tuple[str, Any], ...] = ()


PLACEMENT_FIELDS = (
    "node",
    "residentFraction",
    "residentPercent",
    "executionMode",
    "predictedDecodeTokensPerSecond",
    "predictionSource",
    "endpoint",
    "observed",
    "gpuSet",
    "gpus",
)
"""Status fields that describe where and how the model runs now: a verdict that does not give one (the
model failed validation, lost its node, waits) clears it rather than leave the last placement's."""
MODEL_CONDITIONS = frozenset(
    {"Validated", "Scheduled", "Preempted", "Loaded", "Ready", "Degraded", "DecodeAsPredicted"}
)
"""Condition types the operator writes on an LLMModel; those a verdict does not set no longer apply."""


def desired_status(
    current: dict[str, Any], verdict: Verdict, generation: int | None, now: str
) -> dict[str, Any]:
    """The full status a verdict asks for, keeping transition times and fields other writers own.

    Placement fields and operator conditions the verdict leaves out are cleared (``None``: the merge
    patch removes them), so that a model that failed after it ran does not still show its old node."""
    status = dict(current)
    named = {type_ for type_, *_ in verdict.conditions}
    conditions: list[dict[str, Any]] = [
        c
        for c in current.get("conditions") or []
        if c.get("type") not in MODEL_CONDITIONS or c.get("type") in named
    ]
    for type_, cond_status, reason, message in verdict.conditions:
        conditions = set_condition(conditions, type_, cond_status, reason, message, generation, now)
    status.update(
        {
            "phase": verdict.phase,
            "reason": verdict.reason,
            "message": clip_message(verdict.message),
            "observedGeneration": generation,
            "conditions": conditions,
        }
    )
    status.update(dict.fromkeys(PLACEMENT_FIELDS))
    status.update(dict(verdict.extra))
    return status


def status_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The merge patch from current to desired status (empty when nothing changes)."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if current.get(key) != value:
            patch[key] = value
    return patch
