"""Pure routing decisions: which LLMModel a request names and what to do with it now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["forward", "hold", "reject"]
HOLD_PHASES = frozenset({"Pending", "Scheduled", "Loading", "Preempted", "Idle", "WaitingForCapacity"})
WAKE_PHASES = frozenset({"Idle", "Preempted", "WaitingForCapacity", "Unschedulable"})
"""Phases of a model that is not running: a request for it tells the operator that it is wanted now (an Idle
model resumes; the others may take the GPU memory of idle models, see planner/swapin.py)."""


@dataclass(frozen=True)
class Route:
    """Where a request for one model goes now."""

    decision: Decision
    key: str | None = None
    endpoint: str | None = None
    status_code: int = 200
    message: str = ""
    phase: str = ""


def resolve(models: dict[str, dict[str, Any]], requested: str) -> Route:
    """Route for the `model` field of a request: `namespace/name`, or a name unique across namespaces."""
    if "/" in requested:
        candidates = [requested] if requested in models else []
    else:
        candidates = sorted(k for k in models if k.split("/", 1)[1] == requested)
    if not candidates:
        return Route("reject", status_code=404, message=f"model {requested!r} does not exist")
    if len(candidates) > 1:
        return Route(
            "reject",
            status_code=400,
            message=f"model {requested!r} is ambiguous: use one of {', '.join(candidates)}",
        )
    key = candidates[0]
    status = models[key].get("status") or {}
    phase = status.get("phase", "Pending")
    if phase == "Ready" and status.get("endpoint"):
        return Route("forward", key=key, endpoint=str(status["endpoint"]))
    if phase in HOLD_PHASES:
        return Route(
            "hold",
            key=key,
            status_code=503,
            message=f"model {key} is {phase}: {status.get('message', '')}",
            phase=phase,
        )
    return Route(
        "reject",
        key=key,
        status_code=409 if phase == "Failed" else 503,
        message=f"model {key} is {phase} ({status.get('reason', '')}): {status.get('message', '')}",
        phase=phase,
    )
