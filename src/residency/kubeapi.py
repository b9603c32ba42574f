"""A Kubernetes API client whose calls cannot hang: each gets a connect and a read timeout.

The kubernetes client waits forever by default. One stuck connection would then freeze a planning
round, the router's model table or a worker's heartbeat for good; with a timeout it raises, the caller
logs it and its loop tries again.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

CONNECT_SECONDS = 5.0
READ_SECONDS = 60.0


class TimeoutApiClient(client.ApiClient):  # type: ignore[misc]
    """`client.ApiClient` that gives every call without its own `_request_timeout` a default one."""

    def __init__(self, connect_seconds: float = CONNECT_SECONDS, read_seconds: float = READ_SECONDS) -> None:
        super().__init__()
        self.timeout_seconds = (connect_seconds, read_seconds)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.timeout_seconds
        return super().request(method, url, *args, **kwargs)
