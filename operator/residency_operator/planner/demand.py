"""Priority orders demand, not memory: a model nobody calls yields its priority to busy models.

Priorities are strict tiers in the solvers: a model of a higher tier is placed, and kept, before any
model of a lower one. Applied to memory alone that lets idle high-priority models hold GPU memory that
busy lower-priority models wait for. So, before solving, every *idle* model — its demand is known and
(close to) zero, and no request waits for it — is moved below every tier: it keeps its place while
nobody needs the room (running models are seated first), but any busy model may take that room
(preempting it when it is preemptible, its weights kept in host memory while they fit; demoting it
within its SLO when it is not). The moment a request waits for it, or its measured demand returns, it is
planned at its declared priority again and takes its room back as before, preempting lower tiers.

What ``preemptible: false`` guarantees here (docs/planner.md): while busy, such a model is never preempted,
evicted or moved by the planner for another model. While idle it is planned like any idle model
(``host_copy_kept``): it may be demoted or give up all of its GPU memory (quiet for the worker's idle
interval only, to a model whose requests wait: ``planner/swapin.py``), but never host memory — its
weights and KV cache keep a place in its node's pinned host memory that the plan sets aside before solving
(``PlanningProblem``) and hands back to it first (``actions.assemble_plan``), so it is never evicted and its
next request brings it back by a resume at link speed, at its declared priority. Where its node's host
memory cannot hold that copy beside what runs there, or while a busy pinned model of a lower declared
priority waits for a place (placed, that one would never give the room back), it keeps its GPU and is only
demoted within its ``offload.maxFraction`` and SLO (as with ``PlannerConfig.idle_pinned_models_leave_gpu``
off); once it has left, its node is closed to such a model (``NodeCapacity.closed_to``).

Unknown demand (``None``: no metrics yet) is never idle: the planner does not guess. Nor is a model that
has never been loaded (``has_served`` False): a freshly applied model is placed at its priority, as a user
who applies it expects, and yields only once it has served and nobody calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from residency_operator.planner.types import ModelDemand, PlannerConfig


def is_idle(model: ModelDemand, config: PlannerConfig) -> bool:
    """It has served, no request waits for it and its known demand is at most
    ``config.idle_demand_tokens_per_second``."""
    demand = model.demand_decode_tokens_per_second
    return (
        model.wanted
        and model.has_served
        and model.waiting_requests == 0
        and demand is not None
        and demand <= config.idle_demand_tokens_per_second
    )


def idle_priority_offset(models: Sequence[ModelDemand]) -> int:
    """How far an idle model's priority drops: more than the span of declared priorities, so that every
    idle model ranks below every busy one and idle ones keep their order among themselves. Rounded up to
    a power of ten with room for the span to double: priorities are only compared, so any offset past
    the span plans the same, and a priority change within that room keeps it (the incremental planner
    re-plans everything when a change outgrows its offset; at 10 000 models, seconds)."""
    if not models:
        return 1
    priorities = [m.priority for m in models]
    span = max(priorities) - min(priorities) + 1
    offset = 10
    while offset < 2 * span:
        offset *= 10
    return offset


def yield_if_idle(
    model: ModelDemand, offset: int, config: PlannerConfig, may_leave_gpu: bool = True
) -> ModelDemand:
    """The model as the solvers see it: its priority lowered by ``offset`` while it is idle, and a
    ``preemptible: false`` one planned as preemptible with its host copy kept (see above) unless
    ``may_leave_gpu`` is False (a caller that cannot set its host memory aside)."""
    if not config.idle_models_yield or model.yielded_priority or not is_idle(model, config):
        return model
    yielded = replace(model, priority=model.priority - offset, yielded_priority=offset)
    if (
        not model.preemptible
        and may_leave_gpu
        and config.idle_pinned_models_leave_gpu
        and config.keep_preempted_cache
    ):
        return replace(yielded, preemptible=True, host_copy_kept=True)
    return yielded


def keeps_gpu(model: ModelDemand) -> ModelDemand:
    """An idle pinned model that may not leave the GPU after all (its host copy has no room): planned
    ``preemptible: false`` again, its priority still yielded."""
    return replace(model, preemptible=False, host_copy_kept=False) if model.host_copy_kept else model


def yield_idle(models: Sequence[ModelDemand], config: PlannerConfig) -> tuple[list[ModelDemand], int]:
    """Every model as the solvers see it, and the offset idle ones were moved down by."""
    offset = idle_priority_offset(models)
    return [yield_if_idle(m, offset, config) for m in models], offset
