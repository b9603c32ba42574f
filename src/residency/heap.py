"""Garbage-collector pauses of a serving process (the router, a worker): what causes them, and the remedy.

A full collection walks every object the process holds, and stops the process while it does: 0.16 s for the
router's ~100k objects after its imports, 0.3-0.4 s for a worker's ~300k (torch, transformers), measured on
the 2-core test machine, and longer on a contended CPU. Under load, the objects of requests in flight outlive
the young generations, so full collections come every few seconds; each is a stall of the event loop that
every request in flight waits out (its first token included).

`freeze_heap` collects once and moves every object alive into the permanent generation (`gc.freeze`): the
imports, the app and a loaded model's Python objects are never walked again, and a full collection walks
only what was made since. `GcPauses` times each collection (`gc.callbacks`) for a metric.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

PauseObserver = Callable[[int, float], None]
"""Called with (generation, seconds) after each collection."""


def freeze_heap() -> None:
    """Collects the garbage there is now, then exempts every object still alive from later collections
    (call it once the process has started, and again after it made many long-lived objects: a model load)."""
    gc.collect()
    gc.freeze()


class GcPauses:
    """This process's collection pauses, recorded by the collector's callback (which takes no lock: a lock
    taken inside a collection could be the one the interrupted code holds) and handed on when drained."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, float]] = deque(maxlen=100_000)
        self._started_at = 0.0

    def install(self) -> GcPauses:
        gc.callbacks.append(self._on_collection)
        return self

    def uninstall(self) -> None:
        gc.callbacks.remove(self._on_collection)

    def drain(self, observe: PauseObserver) -> None:
        """Calls `observe(generation, seconds)` for each pause recorded since the last drain."""
        while self._pending:
            observe(*self._pending.popleft())

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
        else:
            self._pending.append((int(info.get("generation", 0)), time.perf_counter() - self._started_at))


class GcPauseMetric:
    """A serving process's ``residency_gc_pause_seconds`` histogram, fed by its collector's pauses once the
    process installs the callback (an app built in a test does not: the callback is process-wide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "residency_gc_pause_seconds",
            "Pauses of this process's garbage collector, by generation (a full one stalls every request)",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.pauses: GcPauses | None = None

    def install(self) -> None:
        self.pauses = GcPauses().install()

    def drain(self) -> None:
        """Moves the pauses recorded since the last scrape into the histogram."""
        if self.pauses is not None:
            self.pauses.drain(
                lambda generation, seconds: self.histogram.labels(str(generation)).observe(seconds)
            )
