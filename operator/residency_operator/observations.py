"""What workers observed of the models they run, turned into planner inputs.

A placement's ``status.observedStep`` is the median decode step of its worker's last window (batch, context,
seconds, and the residency and mode it ran at). On the node's GPU type the planner scales the model's
predicted curve so it passes through that point (``Predictor.observed_ratio``): a profile measured on a
quiet node, or a fit to other models, corrected by what this model really does here.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from residency_operator.planner import ModelDemand, ObservedPoint


def observed_point(placement: dict[str, Any] | None, gpu_types: dict[str, str]) -> ObservedPoint | None:
    """The placement's ``status.observedStep`` as the planner's ObservedPoint, on its node's GPU type (None
    without one, on a node no profile describes, or written malformed by an older worker)."""
    if placement is None:
        return None
    seen = (placement.get("status") or {}).get("observedStep")
    gpu_type = gpu_types.get((placement.get("spec") or {}).get("nodeName", ""))
    if not seen or gpu_type is None:
        return None
    try:
        point = ObservedPoint(
            gpu_type=gpu_type,
            resident_fraction=min(1.0, max(0.0, float(seen["residentFraction"]))),
            mode="cpu" if seen["executionMode"] == "cpu" else "stream",
            batch=max(1, int(seen["batch"])),
            sequence_tokens=max(1, int(seen["sequenceTokens"])),
            step_seconds=float(seen["stepSeconds"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    return point if point.step_seconds > 0 and math.isfinite(point.step_seconds) else None


def with_observed_point(
    model: ModelDemand, placement: dict[str, Any] | None, gpu_types: dict[str, str]
) -> ModelDemand:
    """The model with its worker's observed decode steps (see ``Predictor.observed_ratio``)."""
    point = observed_point(placement, gpu_types)
    return model if point is None else replace(model, observed=point)
