"""A Kubernetes API client whose calls cannot hang, and that waits out the API server's "too many requests".

The kubernetes client waits forever by default. One stuck connection would then freeze a planning
round, the router's model table or a worker's heartbeat for good; with a timeout it raises, the caller
logs it and its loop tries again.

An API server under load refuses requests with 429 (its Priority and Fairness queues for this client are
full; nothing was done) and says when to come back (Retry-After). client-go retries those itself; the
Python client raises, which failed a whole planning round for one refused write (2026-12-07: the round
after an operator restart, while kopf patched a wave's finalizers). A client made with ``retries_429``
asks again after the time the server names (at most :data:`MAX_RETRY_AFTER_SECONDS`), that many times.

Only the operator's writers do (:class:`residency_operator.kube.Kube`: 8 at a time, so a retry never adds
load, it only stands for the round that would have failed and run again). Not the node agents: a fleet
of agents that all ask again within two seconds of a 429, where the server said 13, keeps its queues full
(a 1000-node run with every client retrying: 863 hollow-agent threads runnable at once, the API server at
70 requests/s, every node's Lease late). An agent whose request is refused waits for its next period.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

CONNECT_SECONDS = 5.0
READ_SECONDS = 60.0
RETRIES_429 = 5
"""How many times the operator's writers ask again after a 429 (:class:`TimeoutApiClient`: none unless
asked for)."""
MAX_RETRY_AFTER_SECONDS = 2.0
"""The API server's Retry-After is a hint (it said 13 s to a 1000-request burst): a write of a planning
round waits at most this long, with jitter, before it asks again."""


def retry_after_seconds(exc: ApiException, cap: float = MAX_RETRY_AFTER_SECONDS) -> float:
    """How long to wait before asking again after a 429: its Retry-After (1 s without one), at most ``cap``,
    from half of that to all of it (clients refused together do not come back together)."""
    headers = exc.headers or {}
    try:
        wanted = float(headers.get("Retry-After") or 1.0)
    except (TypeError, ValueError):
        wanted = 1.0
    wait = min(max(wanted, 0.0), cap)
    return wait * random.uniform(0.5, 1.0)


class TimeoutApiClient(client.ApiClient):  # type: ignore[misc]
    """`client.ApiClient` that gives every call without its own `_request_timeout` a default one, and asks
    again after a 429 ``retries_429`` times (none by default; see the module's doc)."""

    def __init__(
        self,
        connect_seconds: float = CONNECT_SECONDS,
        read_seconds: float = READ_SECONDS,
        retries_429: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self.timeout_seconds = (connect_seconds, read_seconds)
        self.retries_429 = retries_429
        self._sleep = sleep
        self.throttled = 0
        """429 answers waited out so far."""

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.timeout_seconds
        for attempt in range(self.retries_429 + 1):
            try:
                return super().request(method, url, *args, **kwargs)
            except ApiException as exc:
                if exc.status != 429 or attempt == self.retries_429:
                    raise
                self.throttled += 1
                self._sleep(retry_after_seconds(exc))
        raise AssertionError("unreachable")  # pragma: no cover
