"""What a placement is worth: the objective value of serving a model's demand, the GPU time it needs,
and how much of that time it can share with other models before it misses its SLO."""

from __future__ import annotations

from typing import Any

import numpy as np

from residency_operator.planner.types import GIB, ModelDemand, PlannerConfig


def served_values(
    model: ModelDemand,
    throughput_tokens_per_second: float,
    gpu_bytes: int,
    time_share: float,
    config: PlannerConfig,
    host_bytes: int = 0,
    capacity_tokens_per_second: float = float("inf"),
) -> tuple[float, float]:
    """(primary, full) objective value of running a placement.

    Primary: availability + throughput up to demand - memory tie-break; priorities are compared on it.
    Full: primary + a little for throughput beyond demand, which only spends memory nobody else needs.
    ``capacity_tokens_per_second``: what the placement can serve in the GPU time it may have (see
    :func:`time_capacity`).
    """
    demand = model.demand_decode_tokens_per_second
    served = (
        throughput_tokens_per_second
        if demand is None
        else min(throughput_tokens_per_second, config.demand_headroom * demand, capacity_tokens_per_second)
    )
    primary = (
        config.availability_value_tokens_per_second
        + served
        - config.memory_penalty_per_gib * gpu_bytes / GIB
        - config.offload_penalty_per_gib * host_bytes / GIB
        - config.gpu_time_penalty * time_share
    )
    return primary, primary + excess_value(throughput_tokens_per_second, served, config)


def excess_value(throughput: Any, served: Any, config: PlannerConfig) -> Any:
    """Value of capacity beyond demand: the share of capacity left spare, scaled to a fraction of the
    availability value, so it breaks ties (lower latency) without ever outweighing served demand."""
    spare = np.maximum(0.0, throughput - served)
    # Saturating in spare capacity (relative to the capacity already used or one token/s).
    spare_share = spare / (spare + np.maximum(1.0, served))
    return config.excess_throughput_weight * config.availability_value_tokens_per_second * spare_share


def sharing_tolerance(
    decode_tokens_per_second: Any, slo_tokens_per_second: Any, prefill_share: Any = 0.0
) -> Any:
    """Share of a GPU's time other models may take before this one's decode rate drops below its SLO.

    Models on one GPU take turns, so a model predicted at rate R alone runs at R x (1 - others' share);
    its own prefills (``prefill_share`` of the time) take their turn too.
    """
    if slo_tokens_per_second is None:
        return 1.0
    rate = np.maximum(decode_tokens_per_second, 1e-12)
    return np.clip(1.0 - np.asarray(slo_tokens_per_second) / rate - prefill_share, 0.0, 1.0)


def prefill_share(prompt_tokens_per_second: Any, prefill_tokens_per_second: Any) -> Any:
    """Share of the GPU's time a model's prefills take (prompt tokens/s over the prefill rate)."""
    return np.clip(
        np.asarray(prompt_tokens_per_second) / np.maximum(prefill_tokens_per_second, 1e-12), 0.0, 1.0
    )


def meets_slo_with_prefill(rate: Any, slo: Any, share: Any) -> Any:
    """Whether the decode rate left once the model's own prefills took their share still meets the SLO."""
    return rate * (1.0 - share) >= slo - 1e-9


def time_capacity(demand_tokens_per_second: Any, needed_time_share: Any, max_busy: float) -> Any:
    """Tokens/s a placement can serve within ``max_busy`` of its GPU's time, when its demand needs
    ``needed_time_share`` of it (decode and prefill, uncapped; may exceed the whole GPU): the demand
    scaled by the time there is over the time it needs. The share needed grows less than linearly with
    demand (deeper batches), so this is a lower bound of what the GPU could serve. Without it an
    overloaded small GPU, whose full batch is fast enough but whose demand needs more than all of its
    time (requests queue and miss their SLOs), would look as good as a fast one. Unbounded where the
    demand is unknown or zero."""
    needed = np.asarray(needed_time_share, dtype=np.float64)
    demand = np.asarray(demand_tokens_per_second, dtype=np.float64)
    known = np.isfinite(demand) & (needed > 0)
    scaled = np.where(known, demand, 0.0) * max_busy / np.maximum(needed, 1e-12)
    return np.where(known, scaled, np.inf)


BATCHING_SAFETY = 2.0
"""Poisson arrivals never batch perfectly: reserve this multiple of the ideal batched share."""


def gpu_busy_fraction(
    demand_tokens_per_second: Any,
    single_step_seconds: Any,
    full_step_seconds: Any,
    max_batch: Any,
    cap: float,
    slo_tokens_per_second: Any = 0.0,
) -> Any:
    """Share of a GPU's time a model needs to serve its demand (models on one GPU take turns).

    Alone, a model serving λ tokens/s has N = λ·step(1) sequences in flight and keeps the GPU busy
    1 - exp(-N) of the time (Little's law, Poisson arrivals). Sharing, it can batch deeper: at batch b
    each sequence gets λ/b tokens/s, so the SLO allows b* = λ/SLO (at most the max batch), and the
    share needed is λ·step(b*)/b*. The estimate is the smaller of the solo figure and
    ``BATCHING_SAFETY`` times the batched one. Unknown demand (infinite) counts as zero. Capped at
    ``cap`` so a model whose demand fills a whole GPU can still run alone.
    """
    known = np.isfinite(demand_tokens_per_second)
    demand = np.where(known, demand_tokens_per_second, 0.0)
    alone = 1.0 - np.exp(-demand * single_step_seconds)
    slo = np.asarray(slo_tokens_per_second, dtype=np.float64)
    batch = np.where(slo > 0, demand / np.maximum(slo, 1e-12), max_batch)
    batch = np.clip(batch, 1.0, max_batch)
    slope = (full_step_seconds - single_step_seconds) / np.maximum(1.0, max_batch - 1.0)
    batched = demand * (single_step_seconds + slope * (batch - 1.0)) / batch
    return np.minimum(cap, np.minimum(alone, BATCHING_SAFETY * batched))
