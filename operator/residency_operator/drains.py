"""An Event on a cordoned or disrupted node once residency has moved every model off it, with the time
the drain took."""

from __future__ import annotations

import logging
import time
from typing import Any

from residency_operator.kube import Kube
from residency_operator.state import ClusterState, Inputs

log = logging.getLogger("residency.controller")


class DrainReports:
    """Remembers when each node began draining; posts its Drained Event once."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.since: dict[str, float] = {}  # node -> when it was first seen cordoned/disrupting (-1: reported)

    def report(self, state: ClusterState, inputs: Inputs, desired: dict[str, dict[str, Any]]) -> None:
        """An Event on a cordoned or disrupted node once its models have moved off, with the drain time."""
        draining = {n.name for n in inputs.nodes if n.cordoned or n.disrupting}
        for node in list(self.since):
            if node not in draining:
                del self.since[node]
        now = time.monotonic()
        for node in sorted(draining):
            since = self.since.setdefault(node, now)
            if since < 0:
                continue  # already reported
            held = [p for p in [*state.placements, *desired.values()] if p["spec"]["nodeName"] == node]
            profile = next((p for p in state.node_profiles if p["spec"]["nodeName"] == node), None)
            # drained once no placement names it and its worker reports its GPU memory freed
            still_resident = int(((profile or {}).get("status") or {}).get("residentBytes") or 0)
            if held or still_resident:
                continue
            body = next((n for n in state.nodes if n["metadata"]["name"] == node), None)
            if body is not None:
                seconds = now - since
                self.kube.post_event(
                    body,
                    "Normal",
                    "Drained",
                    f"residency moved every model off {node} in {seconds:.1f} s",
                    kind="Node",
                    api_version="v1",
                )
                log.info("node %s drained in %.1f s", node, seconds)
            self.since[node] = -1.0
