"""The decode steps a model really ran, over a sliding window: the observed point the planner refines its
curve with (``ModelPlacementStatus.observedStep``).

Each decode step adds (batch, mean context tokens, seconds of the forward pass). Pacing sleeps are not in
it (they are time the model chose not to run), nor prefill steps. The summary is the median step at the
window's most common batch size, so one slow step (a page fault, a neighbour's copy) moves nothing.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass

OBSERVED_WINDOW_SECONDS = 60.0
"""How far back the observed point looks: the 'stated time' a rate must stay below its prediction before
the operator warns (a median over this window)."""
MIN_OBSERVED_STEPS = 16
"""Fewer decode steps in the window say nothing: no point is reported."""
MAX_WINDOW_STEPS = 4096
"""Steps kept at most (a fast model runs hundreds a second; the median of the newest is enough)."""


@dataclass(frozen=True, slots=True)
class ObservedStep:
    """The median decode step of a window, at its most common batch size."""

    batch: int
    sequence_tokens: int
    """Mean context (prompt + generated) tokens of the decoding sequences in those steps."""
    step_seconds: float
    steps: int
    window_seconds: float
    resident_fraction: float
    """The residency the steps ran at (the newest step's; older steps at another residency are left out)."""
    mode: str
    """How the offloaded layers decoded: ``stream`` or ``cpu``."""

    @property
    def decode_tokens_per_second(self) -> float:
        """Per-sequence decode rate of the median step."""
        return 1.0 / self.step_seconds


class StepWindow:
    """Decode steps of one model over the last :data:`OBSERVED_WINDOW_SECONDS` (runner thread writes,
    any thread reads a summary)."""

    def __init__(self, window_seconds: float = OBSERVED_WINDOW_SECONDS) -> None:
        self.window_seconds = window_seconds
        self._steps: deque[tuple[float, int, float, float, float, str]] = deque(maxlen=MAX_WINDOW_STEPS)

    def record(
        self,
        batch: int,
        mean_context_tokens: float,
        seconds: float,
        resident_fraction: float,
        mode: str,
        now: float | None = None,
    ) -> None:
        """One decode step: its batch, mean context, forward seconds and the placement it ran at."""
        if batch < 1 or seconds <= 0:
            return
        at = time.monotonic() if now is None else now
        self._steps.append((at, batch, mean_context_tokens, seconds, round(resident_fraction, 4), mode))

    def summary(self, now: float | None = None) -> ObservedStep | None:
        """The window's median step at its most common batch, or None with under
        :data:`MIN_OBSERVED_STEPS` steps in the window."""
        now = time.monotonic() if now is None else now
        steps = list(self._steps)
        if not steps:
            return None
        placement = steps[-1][4:6]  # only steps at the newest residency and mode describe the model now
        recent = [s for s in steps if now - s[0] <= self.window_seconds and s[4:6] == placement]
        if len(recent) < MIN_OBSERVED_STEPS:
            return None
        batch = Counter(s[1] for s in recent).most_common(1)[0][0]
        at_batch = [s for s in recent if s[1] == batch]
        if len(at_batch) < MIN_OBSERVED_STEPS:
            return None
        return ObservedStep(
            batch=batch,
            sequence_tokens=max(1, round(statistics.fmean(s[2] for s in at_batch))),
            step_seconds=statistics.median(s[3] for s in at_batch),
            steps=len(at_batch),
            window_seconds=max(1e-3, min(self.window_seconds, now - at_batch[0][0])),
            resident_fraction=placement[0],
            mode=placement[1],
        )


def observed_step_due(
    reported: dict[str, object] | None, observed: ObservedStep, since_seconds: float | None
) -> bool:
    """Whether a new observed point is worth a status write: none reported yet, another batch size, a step
    time 20 % away from the reported one, or a window's time since the last report."""
    if reported is None or since_seconds is None:
        return True
    if reported.get("batch") != observed.batch or reported.get("executionMode") != observed.mode:
        return True
    if reported.get("residentFraction") != round(observed.resident_fraction, 4):
        return True
    previous = reported.get("stepSeconds")
    if not isinstance(previous, (int, float)) or previous <= 0:
        return True
    if abs(observed.step_seconds - previous) / previous > 0.2:
        return True
    return since_seconds >= observed.window_seconds


def observed_step_wire(observed: ObservedStep) -> dict[str, object]:
    """``ModelPlacementStatus.observedStep`` as written (with the residency and mode it was measured at)."""
    return {
        "batch": observed.batch,
        "sequenceTokens": observed.sequence_tokens,
        "stepSeconds": round(observed.step_seconds, 6),
        "steps": observed.steps,
        "windowSeconds": round(observed.window_seconds, 1),
        "residentFraction": round(observed.resident_fraction, 4),
        "executionMode": observed.mode,
    }
