"""A placement state worth reporting only if it lasts: the worker writes ``Loading`` on its placement only
once a load has taken longer than a moment, so that a quick load is one status write (``Loaded``), not two.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("residency.worker")


class LateStatus:
    """Calls ``write`` after ``after_seconds`` unless :meth:`settle` came first.

    ``settle`` waits for a write already in flight, so a report made after it (the load's outcome) always
    reaches the API server after the ``Loading`` it follows, never before it.
    """

    def __init__(self, write: Callable[[], None], after_seconds: float) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._settled = False
        self.written = False
        if after_seconds <= 0:
            self._fire()
            self._timer: threading.Timer | None = None
            return
        self._timer = threading.Timer(after_seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._settled:
                return
            try:
                self._write()
                self.written = True
            except Exception:  # the outcome's own report follows; this one only said "still working"
                log.warning("could not report a load in progress", exc_info=True)

    def settle(self) -> None:
        """The step ended: no late write from now on (one in flight has finished when this returns)."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._settled = True
