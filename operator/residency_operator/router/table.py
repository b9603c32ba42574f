"""Pure routing decisions: which LLMModel a request names and what to do with it now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["forward", "hold", "reject"]
HOLD_PHASES = frozenset({"Pending", "Scheduled", "Loading", "Preempted", "Idle"})
"""Phases that end by themselves soon: a request waits (up to the hold deadline). A model waiting for capacity
or unschedulable is answered 503 at once, with the reason from its status."""
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


def qualify(requested: str, namespace: str) -> str | None:
    """The model key a request names: `namespace/name` as written, or a bare `name` in the caller's own
    `namespace` (never looked up across namespaces: another tenant's model cannot make a name ambiguous).
    None when the name is malformed."""
    name_space, slash, name = requested.partition("/")
    if not slash:
        return f"{namespace}/{requested}" if requested.strip() else None
    if not name_space or not name or "/" in name:
        return None
    return requested


def resolve(models: dict[str, dict[str, Any]], key: str) -> Route:
    """Route for the model `key` (`namespace/name`, see `qualify`)."""
    if key not in models:
        return Route("reject", status_code=404, message=f"model {key!r} does not exist")
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
