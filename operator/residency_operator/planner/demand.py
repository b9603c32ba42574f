"""Priority orders demand, not memory: a model nobody calls yields its priority to busy models.

Priorities are strict tiers in the solvers: a model of a higher tier is placed, and kept, before any
model of a lower one. Applied to memory alone that lets idle high-priority models hold GPU memory that
busy lower-priority models wait for. So, before solving, every *idle* model — its demand is known and
(close to) zero, and no request waits for it — is moved below every tier: it keeps its place while
nobody needs the room (running models are seated first), but any busy model may take that room
(preempting it when it is preemptible, its weights kept in host memory while they fit; demoting it
within its SLO when it is not). The moment a request waits for it, or its measured demand returns, it is
planned at its declared priority again and takes its room back as before, preempting lower tiers.

What ``preemptible: false`` guarantees here (docs/planner.md): such a model is never preempted or evicted
by the planner for another model, busy or idle, and never loses its KV cache to one; while idle it may be
demoted, never below the residency its ``offload.maxFraction`` allows nor below one that still meets its
decode SLO, so it serves its next request at once, at its SLO, and the next plan promotes it back. (Only
its node shrinking below what it holds, or the node being cordoned, moves it, as before.)

Unknown demand (``None``: no metrics yet) is never idle: the planner does not guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from residency_operator.planner.types import ModelDemand, PlannerConfig


def is_idle(model: ModelDemand, config: PlannerConfig) -> bool:
    """No request waits for it and its known demand is at most ``config.idle_demand_tokens_per_second``."""
    demand = model.demand_decode_tokens_per_second
    return (
        model.wanted
        and model.waiting_requests == 0
        and demand is not None
        and demand <= config.idle_demand_tokens_per_second
    )


def idle_priority_offset(models: Sequence[ModelDemand]) -> int:
    """How far an idle model's priority drops: one more than the span of declared priorities, so that
    every idle model ranks below every busy one and idle ones keep their order among themselves."""
    if not models:
        return 1
    priorities = [m.priority for m in models]
    return max(priorities) - min(priorities) + 1


def yield_if_idle(model: ModelDemand, offset: int, config: PlannerConfig) -> ModelDemand:
    """The model as the solvers see it: its priority lowered by ``offset`` while it is idle (see above)."""
    if not config.idle_models_yield or model.yielded_priority or not is_idle(model, config):
        return model
    return replace(model, priority=model.priority - offset, yielded_priority=offset)


def yield_idle(models: Sequence[ModelDemand], config: PlannerConfig) -> tuple[list[ModelDemand], int]:
    """Every model as the solvers see it, and the offset idle ones were moved down by."""
    offset = idle_priority_offset(models)
    return [yield_if_idle(m, offset, config) for m in models], offset
