"""The router's table of LLMModels, listed from the API server in the background, and its wake requests."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("residency.router")

Waker = Callable[[str, int], None]


class ModelTable:
    """LLMModels as last listed from the API server (refreshed in the background)."""

    def __init__(
        self,
        lister: Callable[[], list[dict[str, Any]]],
        refresh_seconds: float = 1.0,
        waker: Waker | None = None,
        min_forced_refresh_seconds: float = 0.25,
    ) -> None:
        self._lister = lister
        self._waker = waker
        self._woken: dict[str, float] = {}
        self._waking = threading.Lock()
        self.refresh_seconds = refresh_seconds
        self.models: dict[str, dict[str, Any]] = {}
        self.refreshed_at = 0.0
        self.min_forced_refresh_seconds = min_forced_refresh_seconds
        self._forced_at = -1e9
        self._refreshing = threading.Lock()
        self._stop = threading.Event()

    def refresh(self) -> None:
        listed_at = time.monotonic()  # what the listing can know about: the API server as of now
        items = self._lister()
        self.models = {f"{m['metadata']['namespace']}/{m['metadata']['name']}": m for m in items}
        self.refreshed_at = listed_at

    def ensure_listed_since(self, since: float) -> None:
        """Lists again unless a listing started after `since` (a request's arrival) already finished.

        A model applied a moment ago is not in the periodic table yet; before the router answers 404
        for it, it asks the API server. Concurrent misses share one listing (the lock), and forced
        listings are at least `min_forced_refresh_seconds` apart, so a flood of unknown names costs
        the API server a bounded rate of lists. A failed listing keeps the table (the 404 stands).
        """
        with self._refreshing:
            if self.refreshed_at >= since:
                return
            wait_seconds = self._forced_at + self.min_forced_refresh_seconds - time.monotonic()
            if wait_seconds > 0:
                time.sleep(wait_seconds)
            self._forced_at = time.monotonic()
            try:
                self.refresh()
            except Exception as exc:
                log.warning("could not list models (%s); answering from the last table", type(exc).__name__)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # API server away: keep routing with the last table
                log.warning("could not list models (%s); keeping the last table", exc.__class__.__name__)
            self._stop.wait(self.refresh_seconds)

    def stop(self) -> None:
        self._stop.set()

    def wake(self, key: str, waiting: int = 1) -> None:
        """Tell the operator that a model which is not running is asked for, and by how many requests this
        router holds for it (see router/kubeapi.py: a ConfigMap of the router's, never the LLMModel): an
        Idle one resumes, another may take the room of idle models, and the planner values it by what
        waits. At most every 2 s per model."""
        with self._waking:  # requests wait in threads: one of them wakes, the others see it did
            if self._waker is None or time.monotonic() - self._woken.get(key, -10.0) < 2.0:
                return
            self._woken[key] = time.monotonic()
        try:
            self._waker(key, max(1, waiting))
        except Exception as exc:  # the API server may be away: the request keeps waiting and retries
            log.warning("could not wake %s: %s", key, exc.__class__.__name__)
