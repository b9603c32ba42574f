"""Sharing one GPU's time between the models on it, by their SLOs.

Every model has its own batch loop, and left alone each loop decodes as fast as the GPU lets it: models on
one GPU then split its time about equally, whatever each needs. A model far ahead of its SLO keeps taking
steps that a neighbour with requests waiting for a batch slot could have used — the neighbour's queue grows
while the fast model's extra speed is worth nothing to anyone.

The pacer fixes that. A model is *hungry* while it has requests waiting for a batch slot. While any other
model on the GPU is hungry, a model with an SLO decodes at most at :data:`PACE_HEADROOM` times its SLO:
before a step it waits until the step is due (``1 / (headroom * SLO)`` after its previous one), or until
nobody else is hungry. Nobody waits when no neighbour is hungry, so a GPU is never left idle for the sake of
pacing; a hungry model never waits; and a model without an SLO never waits. The planner sizes each model's
share of a GPU's time by the steps its demand needs at its SLO; pacing is what makes that true on a shared
GPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

PACE_HEADROOM = 1.25
"""A paced model still decodes this much faster than its SLO, so it meets it with room for a slow step."""

HOLD_SLICE_SECONDS = 0.05
"""A held model re-checks this often whether it has an admin command to run (preempt, unload)."""


class GpuPacer:
    """The hungry models of one GPU and the waits of the others; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cv = threading.Condition()
        self._hungry: set[str] = set()

    def set_hungry(self, owner: str, hungry: bool) -> None:
        """Records whether ``owner`` has requests waiting for a batch slot; a model no longer hungry wakes
        the models held for it."""
        with self._cv:
            if hungry:
                self._hungry.add(owner)
            elif owner in self._hungry:
                self._hungry.discard(owner)
                self._cv.notify_all()

    def others_hungry(self, owner: str) -> bool:
        with self._cv:
            return bool(self._hungry - {owner})

    def hold(self, owner: str, due: float, interrupted: Callable[[], bool] = lambda: False) -> float:
        """Waits until the clock reads ``due`` while another model is hungry (at once when none is, or when
        ``interrupted()`` turns true); returns the seconds it waited."""
        start = self._clock()
        waited = False
        with self._cv:
            while True:
                now = self._clock()
                if now >= due or not (self._hungry - {owner}) or interrupted():
                    return now - start if waited else 0.0
                waited = True
                self._cv.wait(min(due - now, HOLD_SLICE_SECONDS))


def pace_interval_seconds(min_decode_tokens_per_second: float | None) -> float | None:
    """Seconds between two decode steps of a paced model (``None``: the model has no SLO, never paced)."""
    if min_decode_tokens_per_second is None or min_decode_tokens_per_second <= 0:
        return None
    return 1.0 / (PACE_HEADROOM * min_decode_tokens_per_second)


def hold_all(
    pacers: Sequence[GpuPacer],
    owner: str,
    due: float,
    interrupted: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """:meth:`GpuPacer.hold` for a model split over several GPUs: it waits while a neighbour on any of them is
    hungry (re-checked every slice); one GPU's pacer waits exactly as :meth:`GpuPacer.hold`."""
    if len(pacers) == 1:
        return pacers[0].hold(owner, due, interrupted=interrupted)
    start = clock()
    waited = False
    while True:
        now = clock()
        if now >= due or not any(pacer.others_hungry(owner) for pacer in pacers) or interrupted():
            return now - start if waited else 0.0
        waited = True
        time.sleep(min(due - now, HOLD_SLICE_SECONDS / 5))
