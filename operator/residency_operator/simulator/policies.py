"""Placement policies the simulator compares: residency (ours) and the baselines in use today.

- ``residency``: the production planner (:func:`residency_operator.planner.plan`), re-run periodically
  and whenever requests wait for a model that is not running.
- the baselines (``lru-evict``, ``sleep-swap``, ``uniform-offload``, ``binpack``): see
  :mod:`residency_operator.simulator.baselines`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from residency_operator.planner.options import cached_host_bytes, with_host_set_aside
from residency_operator.planner.plan import plan
from residency_operator.planner.types import Plan, PlannerConfig, SensitivityProfile, waiting_demand
from residency_operator.simulator.baselines import (
    BinpackPolicy,
    LruEvictPolicy,
    SleepSwapPolicy,
    UniformOffloadPolicy,
)
from residency_operator.simulator.engine import Simulation
from residency_operator.simulator.runtime import ModelRuntime

SIMULATION_PLANNER_CONFIG = PlannerConfig(
    amortisation_horizon_seconds=300.0, solver="greedy", bound_max_options=0
)


def apply_plan(sim: Simulation, planned: Plan) -> None:
    """Carry out a plan's actions in order on the simulated cluster."""
    for action in planned.actions:
        if action.kind == "evict":
            sim.evict(action.model)
        elif action.kind == "preempt":
            sim.preempt(action.model, keep_cache=True)
        else:
            placement = planned.placements[action.model]
            where = sim.topology.unit_name(placement.node, [g.index for g in placement.gpus])
            sim.place(action.model, where, placement.resident_fraction, placement.mode)


class ResidencyPolicy:
    """The production planner, fed the simulator's observed demand and placements."""

    name = "residency"
    paces_decode = True

    def __init__(
        self,
        config: PlannerConfig | None = None,
        replan_interval_seconds: float = 15.0,
        reactive_interval_seconds: float = 2.0,
    ) -> None:
        # Simulations re-plan hundreds of times: the greedy solver, and no LP bound, keep that fast.
        self.config = config or SIMULATION_PLANNER_CONFIG
        self.replan_interval_seconds = replan_interval_seconds
        self.reactive_interval_seconds = reactive_interval_seconds
        self._last_plan_seconds = -1e9
        self._waiting_at_last_plan: frozenset[str] = frozenset()
        self._idle: frozenset[str] = frozenset()
        self.plans: list[Plan] = []
        self.profiles: tuple[SensitivityProfile, ...] = ()
        """Measured curves the planner is given (what the workers' background profiler would publish)."""

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Re-plan on schedule, or sooner when requests wait for a model that is not running."""
        # Requests waiting for a model that is not running call for a plan now, unless the last plan
        # already saw exactly these models waiting (it could not place them; replanning won't either).
        waiting = frozenset(name for name, r in sim.models.items() if r.queue and r.node is None)
        due = now_seconds - self._last_plan_seconds >= self.replan_interval_seconds
        reactive = (
            bool(waiting - self._waiting_at_last_plan)
            and now_seconds - self._last_plan_seconds >= self.reactive_interval_seconds
        )
        if not (due or reactive):
            return
        self._last_plan_seconds = now_seconds
        self._waiting_at_last_plan = waiting
        # spec.idle, as the operator applies it (state.idle_reason): a model quiet for its afterSeconds is
        # released outside the plan, its weights kept in host memory, which the plan sets aside.
        self._idle = scaled_to_zero(sim, now_seconds, self._idle)
        set_aside: dict[str, int] = {}
        for name in sorted(self._idle):
            runtime = sim.models[name]
            if runtime.node is not None:
                sim.preempt(name, keep_cache=True)
            if runtime.cached_node is not None:
                machine = sim.topology.unit(runtime.cached_node).machine
                set_aside[machine] = set_aside.get(machine, 0) + cached_host_bytes(runtime.demand, 0)
        # Before any time has passed nothing has been observed: demand is unknown (``None``, as the operator
        # reports it without metrics), not zero; planning for zero demand would pack every model at the
        # lowest residency that meets its SLO alone, and the first traffic would undo it.
        observed = now_seconds > 0
        # Demand as the operator learns it (state.planner_inputs): the traffic a model's worker reports while
        # it runs or is being loaded to run; for a model that does not run (no worker sees its requests),
        # its waiting requests at its SLO (state.waiting_demand). Requests waiting for a model: what the
        # router holds while it is not running (or still loading), what the worker's engine queues beyond
        # its free batch slots while it runs.
        demands = []
        for name, runtime in sorted(sim.models.items()):
            if name in self._idle:
                continue
            queued = requests_waiting(runtime, now_seconds)
            running = runtime.node is not None
            spec = runtime.spec.demand(
                sim.observed_demand_tokens_per_second(name) if observed and running else None,
                *(sim.observed_prompts(name) if running else (None, None)),
            )
            # what its worker last reported of its decode steps (status.observedStep), as the operator reads
            spec = dataclasses.replace(spec, waiting_requests=queued, observed=sim.observed_step(name))
            if observed and not running:
                spec = dataclasses.replace(spec, demand_decode_tokens_per_second=waiting_demand(spec))
            demands.append(spec)
        current = [c for c in sim.current_placements() if c.model not in self._idle]
        nodes = with_host_set_aside(sim.machines, set_aside)
        planned = plan(demands, nodes, current, self.profiles, now_seconds, self.config)
        self.plans.append(planned)
        apply_plan(sim, planned)


def scaled_to_zero(sim: Simulation, now_seconds: float, idle: frozenset[str]) -> frozenset[str]:
    """Models that ``spec.idle`` keeps released now: running ones quiet for their ``idle_after_seconds``,
    and ones already released whose weights are still cached, until a request arrives for them."""
    result = set()
    for name, runtime in sim.models.items():
        after_seconds = runtime.spec.idle_after_seconds
        if after_seconds is None or runtime.queue or runtime.active:
            continue
        still_released = name in idle and runtime.node is None and runtime.cached_node is not None
        quiet_seconds = now_seconds - max(runtime.last_used_seconds, runtime.last_active_seconds)
        if still_released or (runtime.node is not None and quiet_seconds >= after_seconds):
            result.add(name)
    return frozenset(result)


def requests_waiting(runtime: ModelRuntime, now_seconds: float) -> int:
    """Requests waiting for a model as the operator learns of them (see ``state.waiting_requests``)."""
    if runtime.node is None or runtime.busy_until_seconds > now_seconds:
        return len(runtime.queue)
    return max(0, len(runtime.queue) - (runtime.demand.max_batch - len(runtime.active)))


class NoSplitResidencyPolicy(ResidencyPolicy):
    """Residency with every model on one GPU, the rest of a large one offloaded to host memory
    (``PlannerConfig.allow_gpu_splits=False``): what splitting across a node's GPUs is measured against."""

    name = "residency-no-split"

    def __init__(self, config: PlannerConfig | None = None) -> None:
        super().__init__(dataclasses.replace(config or SIMULATION_PLANNER_CONFIG, allow_gpu_splits=False))


POLICIES: dict[str, Callable[[], object]] = {
    "residency": ResidencyPolicy,
    "lru-evict": LruEvictPolicy,
    "sleep-swap": SleepSwapPolicy,
    "uniform-offload": UniformOffloadPolicy,
    "binpack": BinpackPolicy,
}
BASELINES = ("lru-evict", "sleep-swap", "uniform-offload", "binpack")
VARIANTS = ("residency-no-split",)
"""Ablations of residency itself, run by name (``--policy``): reported beside it, never counted as a
baseline, and not part of ``all``."""
