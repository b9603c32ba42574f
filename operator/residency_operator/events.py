"""Events a person reads in `kubectl describe llm`: each lifecycle operation a worker measured, and a
warning when a model decodes far slower than the planner predicted (pure: no Kubernetes import).

The worker records its last operation on the ModelPlacement (``status.lastOperation``); the operator
copies it onto the LLMModel's status and posts one Event when it changes. The copy is what makes this
level-triggered: a restarted operator compares the two and posts nothing twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from residency.api import ConditionStatus
from residency.sizing import memory_text
from residency_operator.conditions import Verdict

OPERATION_REASONS = {
    "Load": "ModelLoaded",
    "Reload": "ModelReloaded",
    "Demote": "ModelDemoted",
    "Promote": "ModelPromoted",
    "Preempt": "ModelPreempted",
    "Resume": "ModelResumed",
}
"""Event reason per operation (distinct from the phase reasons, which say where the model is, not what
it just did)."""

PREDICTION_CONDITION = "DecodeAsPredicted"
BELOW_PREDICTION_REASON = "DecodeBelowPrediction"
BELOW_PREDICTION_RATIO = 0.5
OBSERVED_WINDOW_TEXT = "60 s of decode steps (at least 16)"
"""The stated time: a worker reports the median step of this window (``residency_worker.engine.observed``)."""
"""Observed decode under this share of the prediction is "far below": the planner's view of the node is
wrong (an emulated tier, contention, an uncalibrated profile) and plans built on it are optimistic."""

ModelEvent = tuple[str, str, str]
"""(type, reason, message) of one Event."""


def _percent(fraction: Any) -> str:
    return f"{float(fraction) * 100:.0f}%"


def operation_message(operation: dict[str, Any]) -> str:
    """One line that says what the worker did and what it cost, e.g. ``resumed on gpu-a in 0.031 s
    (reloaded 6.2 MiB at 0.41 GB/s, 60% resident; 1 request continued)``."""
    action = str(operation.get("action"))
    where = f" on {operation['node']}" if operation.get("node") else ""
    took = f" in {float(operation.get('seconds') or 0.0):.3f} s"
    before, after = operation.get("fromFraction"), operation.get("toFraction")
    moved = operation.get("movedBytes")
    gbps = operation.get("gbps")
    copy = ""
    if moved:
        copy = f"{memory_text(moved)}" + (f" at {float(gbps):.2f} GB/s" if gbps else "")
    requests = operation.get("requests")
    details: list[str] = []
    if action in ("Demote", "Promote") and before is not None and after is not None:
        verb = "demoted" if action == "Demote" else "promoted"
        head = f"{verb}{where} from {_percent(before)} to {_percent(after)} resident{took}"
        if abs(float(before) - float(after)) < 0.005:  # a change of execution mode alone
            head = f"changed its execution mode{where} at {_percent(after)} resident{took}"
        if copy:
            details.append(f"moved {copy} to the GPU")
    elif action == "Preempt":
        head = f"preempted{where}{took}"
        details.append(f"KV cache saved: {copy}" if copy else "no KV cache in flight")
        if requests:
            details.append(f"{requests} request(s) parked until it resumes")
        details.append("weights stay in host memory")
    elif action == "Resume":
        head = f"resumed{where}{took}"
        if copy:
            details.append(f"reloaded {copy}")
        if after:
            details.append(f"{_percent(after)} resident")
        if requests:
            details.append(f"{requests} request(s) continued")
    else:  # Load, Reload
        verb = "reloaded after its spec changed" if action == "Reload" else "loaded"
        head = f"{verb}{where}{took}"
        if after:
            details.append(f"{_percent(after)} resident")
        if copy:
            details.append(f"{copy} to the GPU")
    return head + (f" ({'; '.join(details)})" if details else "")


def operation_event(current_status: dict[str, Any], placement: dict[str, Any] | None) -> ModelEvent | None:
    """The Event for the placement's last operation, unless the model's status already shows it."""
    operation = ((placement or {}).get("status") or {}).get("lastOperation")
    if not operation or operation == current_status.get("lastOperation"):
        return None
    reason = OPERATION_REASONS.get(str(operation.get("action")))
    if reason is None:
        return None
    return ("Normal", reason, operation_message(operation))


def with_operation(verdict: Verdict, placement: dict[str, Any] | None) -> Verdict:
    """The verdict carrying the placement's last operation onto the model's status."""
    operation = ((placement or {}).get("status") or {}).get("lastOperation")
    if not operation:
        return verdict
    return dataclasses.replace(verdict, extra=(*verdict.extra, ("lastOperation", operation)))


def with_prediction_check(verdict: Verdict) -> Verdict:
    """A Ready model whose observed decode rate stays far below the prediction gets the condition
    ``DecodeAsPredicted=False`` (and, where it turns so, a Warning Event: :func:`prediction_event`)."""
    if verdict.phase != "Ready":
        return verdict
    extra = dict(verdict.extra)
    seen = extra.get("observed") or {}
    if seen.get("ratioToPrediction") is not None:
        return _with_window_check(verdict, seen)
    predicted = extra.get("predictedDecodeTokensPerSecond")
    observed = seen.get("decodeTokensPerSecond")
    if not predicted or observed is None:
        return verdict
    ratio = float(observed) / float(predicted)
    condition: tuple[str, ConditionStatus, str, str]
    if ratio < BELOW_PREDICTION_RATIO:
        condition = (
            PREDICTION_CONDITION,
            "False",
            BELOW_PREDICTION_REASON,
            f"observed {float(observed):.1f} tok/s is {ratio * 100:.0f}% of the predicted "
            f"{float(predicted):.1f} tok/s: the planner's view of this node is optimistic (an emulated GPU "
            "tier, contention, or no measured sensitivity profile yet), so plans made from it may be too",
        )
    else:
        condition = (
            PREDICTION_CONDITION,
            "True",
            "AsPredicted",
            f"observed {float(observed):.1f} tok/s against {float(predicted):.1f} predicted",
        )
    return dataclasses.replace(verdict, conditions=(*verdict.conditions, condition))


def _with_window_check(verdict: Verdict, seen: dict[str, Any]) -> Verdict:
    """``DecodeAsPredicted`` from the worker's window: its median step against the profile, fit or roofline
    at the same residency, batch and context (what the planner now plans with instead)."""
    ratio = float(seen["ratioToPrediction"])
    window_rate = seen.get("windowDecodeTokensPerSecond")
    batch = seen.get("windowBatch")
    measured = f"{window_rate} tok/s a sequence at batch {batch}" if window_rate is not None else "observed"
    condition: tuple[str, ConditionStatus, str, str]
    if ratio < BELOW_PREDICTION_RATIO:
        condition = (
            PREDICTION_CONDITION,
            "False",
            BELOW_PREDICTION_REASON,
            f"over the worker's last {OBSERVED_WINDOW_TEXT} the median decode step ran {measured}, "
            f"{ratio * 100:.0f}% of what the model's curve predicted there (below "
            f"{BELOW_PREDICTION_RATIO * 100:.0f}%); the planner now plans this model with the observed rate "
            "(predictionSource: observed)",
        )
    else:
        condition = (
            PREDICTION_CONDITION,
            "True",
            "AsPredicted",
            f"over the worker's last {OBSERVED_WINDOW_TEXT} the median decode step ran {measured}, "
            f"{ratio * 100:.0f}% of the curve's prediction",
        )
    return dataclasses.replace(verdict, conditions=(*verdict.conditions, condition))


def prediction_event(current_status: dict[str, Any], verdict: Verdict) -> ModelEvent | None:
    """A Warning when ``DecodeAsPredicted`` turns False (once per spell, not every round)."""
    wanted = next((c for c in verdict.conditions if c[0] == PREDICTION_CONDITION), None)
    if wanted is None or wanted[1] != "False":
        return None
    previous = next(
        (c for c in current_status.get("conditions") or [] if c.get("type") == PREDICTION_CONDITION), None
    )
    if previous is not None and previous.get("status") == "False":
        return None
    return ("Warning", BELOW_PREDICTION_REASON, wanted[3])
