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
