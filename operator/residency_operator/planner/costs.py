"""Predicted cost (seconds and bytes moved) of each transition the planner can ask for.

The study found preemption cost dominated by reloading model state, not by moving the KV cache; this
model makes that explicit: preempting moves only KV bytes over the link, resuming moves the resident
weights back (from the host cache) and a cold load reads everything from storage first. Measured
timings win over estimates: a model's last observed reload replaces the resume estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from residency_operator.planner.types import GB, ModelDemand, NodeCapacity

RESUME_OVERHEAD_SHARE = 0.25
"""Resuming reuses allocations and compiled state, so it pays a quarter of a cold load's fixed cost."""
RECONFIGURE_SECONDS = 0.05
"""Switching the execution mode of offloaded layers moves no bytes; it only rebuilds the layer plan."""


@dataclass(frozen=True, slots=True)
class TransitionCost:
    """Predicted duration and bytes of one transition; the model serves nothing while it runs."""

    seconds: float
    bytes_moved: int

    def __add__(self, other: TransitionCost) -> TransitionCost:
        return TransitionCost(self.seconds + other.seconds, self.bytes_moved + other.bytes_moved)


ZERO_COST = TransitionCost(0.0, 0)


def _resident_bytes(model: ModelDemand, resident_fraction: float) -> int:
    return round(min(1.0, max(0.0, resident_fraction)) * model.weight_bytes)


def load_cost(model: ModelDemand, node: NodeCapacity, resident_fraction: float) -> TransitionCost:
    """Cold load: read all weights from storage, copy the resident share to the GPU, start up."""
    storage_gbps = model.storage_read_gbps or node.storage_read_gbps
    resident_bytes = _resident_bytes(model, resident_fraction)
    seconds = (
        model.weight_bytes / (storage_gbps * GB)
        + resident_bytes / (node.host_to_device_gbps * GB)
        + node.load_overhead_seconds
    )
    return TransitionCost(seconds, model.weight_bytes + resident_bytes)


def resume_cost(
    model: ModelDemand, node: NodeCapacity, resident_fraction: float, kv_cache_bytes: int = 0
) -> TransitionCost:
    """Resume from the host cache: copy resident weights and the saved KV cache back to the GPU."""
    resident_bytes = _resident_bytes(model, resident_fraction)
    moved_bytes = resident_bytes + kv_cache_bytes
    if model.last_reload_seconds is not None and model.last_reload_seconds > 0:
        # A measured reload already includes everything this node really does; trust it.
        return TransitionCost(model.last_reload_seconds, moved_bytes)
    seconds = (
        moved_bytes / (node.host_to_device_gbps * GB) + RESUME_OVERHEAD_SHARE * node.load_overhead_seconds
    )
    return TransitionCost(seconds, moved_bytes)


def preempt_cost(
    model: ModelDemand, node: NodeCapacity, kv_cache_bytes: int, overhead_seconds: float = 0.05
) -> TransitionCost:
    """Preempt: save the KV cache to host memory over the link; weights are dropped, not copied."""
    seconds = kv_cache_bytes / (node.effective_device_to_host_gbps * GB) + overhead_seconds
    return TransitionCost(seconds, kv_cache_bytes)


def promote_cost(
    model: ModelDemand, node: NodeCapacity, from_fraction: float, to_fraction: float
) -> TransitionCost:
    """Promote: copy the newly resident share of the weights host → device."""
    moved_bytes = max(0, _resident_bytes(model, to_fraction) - _resident_bytes(model, from_fraction))
    return TransitionCost(moved_bytes / (node.host_to_device_gbps * GB), moved_bytes)


def demote_cost(
    model: ModelDemand, node: NodeCapacity, from_fraction: float, to_fraction: float
) -> TransitionCost:
    """Demote: copy the share leaving the GPU device → host (the host keeps the offloaded weights)."""
    moved_bytes = max(0, _resident_bytes(model, from_fraction) - _resident_bytes(model, to_fraction))
    return TransitionCost(moved_bytes / (node.effective_device_to_host_gbps * GB), moved_bytes)


def migrate_cost(
    model: ModelDemand,
    from_node: NodeCapacity,
    to_node: NodeCapacity,
    to_fraction: float,
    kv_cache_bytes: int = 0,
) -> TransitionCost:
    """Migrate: unload where it runs (saving KV) and cold-load on the other node."""
    return preempt_cost(model, from_node, kv_cache_bytes) + load_cost(model, to_node, to_fraction)


def reconfigure_cost() -> TransitionCost:
    """Change of execution mode at the same residency."""
    return TransitionCost(RECONFIGURE_SECONDS, 0)


def amortised_cost_tokens_per_second(
    cost: TransitionCost, value_tokens_per_second: float, horizon_seconds: float
) -> float:
    """Throughput lost to a transition, spread over the planning horizon (same unit as the objective).

    While the transition runs the model serves nothing, so it forgoes ``seconds x value`` tokens.
    """
    if horizon_seconds <= 0:
        return 0.0
    return value_tokens_per_second * cost.seconds / horizon_seconds


def evict_cost() -> TransitionCost:
    """Evict: free the memory; nothing is copied (the model reloads from storage next time)."""
    return ZERO_COST
