"""Events are posted in the background, as client-go's event recorder posts them: a round hands an Event
over and goes on, so a slow API server delays the Events, never the placements and statuses behind them.

An Event is best effort (the model's status carries the truth): when the queue is full, as during a wave
of thousands of loads on a saturated API server, a new Event is dropped and counted, never waited for.
One thread posts them one at a time, through the operator's write limiter, so Events take at most one of
the operator's writes in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("residency.events")

QUEUE_EVENTS = 1000
"""Events waiting to be posted before new ones are dropped (client-go's broadcaster holds as many)."""

PostEvent = Callable[..., None]


class EventRecorder:
    """Posts Events from a queue on a thread of its own; :meth:`record` never blocks."""

    def __init__(self, post: PostEvent, capacity: int = QUEUE_EVENTS) -> None:
        self._post = post
        self._queue: queue.Queue[tuple[tuple[Any, ...], dict[str, Any]]] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.posted = 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        """Queue one Event (the arguments of ``post``); dropped and counted when the queue is full."""
        self._start()
        try:
            self._queue.put_nowait((args, kwargs))
        except queue.Full:
            with self._lock:
                self.dropped += 1
                dropped = self.dropped
            if dropped == 1 or dropped % 1000 == 0:
                log.warning(
                    "%d Events dropped: the API server takes them slower than the fleet makes them "
                    "(each model's status still says what happened)",
                    dropped,
                )

    def flush(self, timeout_seconds: float = 5.0) -> bool:
        """Wait until every queued Event was posted (or ``timeout_seconds``); whether the queue drained."""
        if self._thread is None:
            return True
        done = threading.Event()

        def drain() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        return done.wait(timeout_seconds)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="residency-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            args, kwargs = self._queue.get()
            try:
                self._post(*args, **kwargs)
                self.posted += 1
            except Exception:  # best effort: one Event that failed must not stop the others
                log.exception("could not post an Event")
            finally:
                self._queue.task_done()
