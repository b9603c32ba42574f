"""What one planning round did, and the order in which it reports it: the round's report, the status
writes it queues, and the API's refusals it records (for logs, metrics and tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from residency_operator.conditions import Verdict

StatusJob = tuple[str, dict[str, Any], Any, dict[str, Any], dict[str, Any], list[tuple[str, str, str]]]
"""One model's status write: key, body, verdict, current status, patch, and the Events it brings."""
WARNING_PHASES = frozenset({"Failed", "Unschedulable", "Preempted"})
PROGRESS_REASONS = frozenset({"Placed", "Loading", "Resuming", "Ready"})
"""Phase reasons of the ordinary way to Ready (Scheduled, Loading, Ready): no Event of their own. The
status shows each step, and the worker's measured operation (ModelLoaded, ModelResumed, ...) is the Event
that says the model arrived; an Event per step was three writes per model, a third of a wave's writes."""
REJECTED_STATUSES = frozenset({400, 403, 422})
"""API answers that refuse one object (invalid, forbidden) rather than say the API server is unwell."""


def rejection_message(exc: ApiException) -> str:
    """The API server's own message for a refused write (its Status body), else the HTTP reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return str(message or f"HTTP {exc.status} {exc.reason}")[:1024]


@dataclass
class RoundReport:
    """What one planning round did (for logs and tests)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    statuses: int = 0
    solver: str = ""
    seconds: float = 0.0
    rejected: dict[str, str] = field(default_factory=dict)
    """Objects the API server refused (placement or model key -> its message); the round went on."""
    deferred: int = 0
    """Status writes left to the next round (a change was waiting and the status budget was spent)."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Where the round's time went: reading the cache into planner inputs, planning, writing placements,
    computing and writing statuses."""

    def timings(self) -> str:
        return ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.phase_seconds.items())


def status_rank(verdict: Verdict) -> int:
    """Order of status writes: what needs attention, then Ready, then the ordinary steps to Ready."""
    if verdict.reason not in PROGRESS_REASONS:
        return 0
    return 1 if verdict.phase == "Ready" else 2


def short_list(names: list[str], shown: int = 10) -> str:
    """A list of names for a log line, the first few of a long one and how many more."""
    if len(names) <= shown:
        return str(names)
    return f"{names[:shown]} and {len(names) - shown} more"
