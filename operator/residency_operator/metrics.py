"""Prometheus metrics of the operator: what an external autoscaler or KEDA can act on."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

from residency_operator.planner import Plan
from residency_operator.state import Inputs


class OperatorMetrics:
    """Gauges refreshed after every planning round."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.models = Gauge("residency_models", "LLMModels by phase", ["phase"], registry=self.registry)
        self.waiting = Gauge(
            "residency_models_waiting_for_capacity",
            "Models waiting for a new GPU node",
            registry=self.registry,
        )
        self.unplaceable = Gauge(
            "residency_unplaceable_gpu_bytes",
            "GPU bytes requested by models that fit no node (fully resident)",
            registry=self.registry,
        )
        self.reclaimable = Gauge(
            "residency_node_reclaimable_gpu_bytes",
            "GPU bytes on a node held by preemptible models (could be freed for higher priorities)",
            ["node"],
            registry=self.registry,
        )
        self.gpu_bytes = Gauge(
            "residency_node_planned_gpu_bytes",
            "GPU bytes the plan uses per node",
            ["node"],
            registry=self.registry,
        )
        self.events_dropped = Gauge(
            "residency_events_dropped",
            "Events dropped since the operator started because the API server took them slower than "
            "they came (best effort; statuses are never dropped)",
            registry=self.registry,
        )
        self.plan_seconds = Histogram(
            "residency_plan_seconds", "Duration of a planning round", registry=self.registry
        )

    def observe_round(
        self,
        seconds: float,
        phases: dict[str, int],
        waiting: dict[str, tuple[dict[str, Any], int]],
        result: Plan,
        inputs: Inputs,
    ) -> None:
        self.plan_seconds.observe(seconds)
        self.models.clear()
        for phase, count in phases.items():
            self.models.labels(phase).set(count)
        self.waiting.set(len(waiting))
        self.unplaceable.set(sum(gpu_bytes for _, gpu_bytes in waiting.values()))
        preemptible = {d.name for d in inputs.demands if d.preemptible}
        used: dict[str, int] = {n.name: 0 for n in inputs.nodes}
        reclaimable: dict[str, int] = {n.name: 0 for n in inputs.nodes}
        for key, placed in result.placements.items():
            used[placed.node] = used.get(placed.node, 0) + placed.gpu_bytes
            if key in preemptible:
                reclaimable[placed.node] = reclaimable.get(placed.node, 0) + placed.gpu_bytes
        self.gpu_bytes.clear()
        self.reclaimable.clear()
        for node, value in used.items():
            self.gpu_bytes.labels(node).set(value)
            self.reclaimable.labels(node).set(reclaimable.get(node, 0))
