"""Placement policies the simulator compares: residency (ours) and the baselines in use today.

- ``residency``: the production planner (:func:`residency_operator.planner.plan`), re-run periodically
  and whenever requests wait for a model that is not running.
- ``lru-evict``: whole models, loaded on first request; when a model does not fit, the least recently
  used idle models on a node are evicted (ModelMesh / Ollama behaviour).
- ``uniform-offload``: every model is loaded, all with the same resident fraction, chosen as high as
  memory allows (what a static offload setting gives).
- ``binpack``: whole models, placed once first-fit in priority order; the rest queue forever.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from residency_operator.planner.options import (
    cached_host_bytes,
    gpu_bytes_needed,
    host_bytes_needed,
    usable_gpu_bytes,
    with_host_set_aside,
)
from residency_operator.planner.plan import plan
from residency_operator.planner.types import Plan, PlannerConfig, waiting_demand
from residency_operator.simulator.engine import ModelRuntime, Simulation

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
            sim.place(action.model, placement.node, placement.resident_fraction, placement.mode)


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
                set_aside[runtime.cached_node] = set_aside.get(runtime.cached_node, 0) + cached_host_bytes(
                    runtime.demand, 0
                )
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
            spec = dataclasses.replace(spec, waiting_requests=queued)
            if observed and not running:
                spec = dataclasses.replace(spec, demand_decode_tokens_per_second=waiting_demand(spec))
            demands.append(spec)
        current = [c for c in sim.current_placements() if c.model not in self._idle]
        nodes = with_host_set_aside(sim.nodes, set_aside)
        planned = plan(demands, nodes, current, (), now_seconds, self.config)
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


class LruEvictPolicy:
    """Whole models on demand; evict least recently used idle models to make room."""

    name = "lru-evict"

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Load every model with waiting requests, oldest request first, evicting LRU idle models."""
        waiting = sorted(
            (r for r in sim.models.values() if r.queue and r.node is None),
            key=lambda r: (r.queue[0].arrival_seconds, r.spec.name),
        )
        for runtime in waiting:
            need_gpu = gpu_bytes_needed(runtime.demand, 1.0, "stream")
            target = self._node_with_room(sim, need_gpu)
            if target is None:
                target = self._evict_for(sim, runtime, need_gpu)
            if target is not None:
                sim.place(runtime.spec.name, target, 1.0, "stream")

    @staticmethod
    def _node_with_room(sim: Simulation, need_gpu: int) -> str | None:
        for node in sim.nodes:
            if node.accepts_work and sim.free_bytes(node.name)[0] >= need_gpu:
                return node.name
        return None

    @staticmethod
    def _evict_for(sim: Simulation, runtime: ModelRuntime, need_gpu: int) -> str | None:
        best: tuple[float, str, list[ModelRuntime]] | None = None
        for node in sim.nodes:
            if not node.accepts_work or usable_gpu_bytes(node) < need_gpu:
                continue
            free_gpu = sim.free_bytes(node.name)[0]
            idle = sorted(
                (r for r in sim.models.values() if r.node == node.name and not r.active and not r.queue),
                key=lambda r: (r.last_used_seconds, r.spec.name),
            )
            victims: list[ModelRuntime] = []
            for victim in idle:
                if free_gpu >= need_gpu:
                    break
                victims.append(victim)
                free_gpu += gpu_bytes_needed(victim.demand, victim.resident_fraction, victim.mode)
            if free_gpu < need_gpu:
                continue
            newest_victim_use = max((v.last_used_seconds for v in victims), default=-1.0)
            if best is None or (newest_victim_use, node.name) < (best[0], best[1]):
                best = (newest_victim_use, node.name, victims)
        if best is None:
            return None
        for victim in best[2]:
            sim.evict(victim.spec.name)
        return best[1]


UNIFORM_LEVELS = tuple(step / 20 for step in range(1, 21))
"""Resident fractions uniform-offload chooses among (5% steps)."""


class UniformOffloadPolicy:
    """All models loaded at one cluster-wide resident fraction, as high as memory allows."""

    name = "uniform-offload"

    def __init__(self, levels: tuple[float, ...] = UNIFORM_LEVELS) -> None:
        self.levels = levels
        self._placed = False

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Place everything once, at the start."""
        if self._placed:
            return
        self._placed = True
        nodes = [n for n in sim.nodes if n.accepts_work]
        if not nodes:
            # Every node cordoned: nothing can be placed, so every request waits and is dropped, which is
            # what the other policies report on such a cluster too (a comparison, not a crash).
            return
        runtimes = sorted(sim.models.values(), key=lambda r: (-r.demand.weight_bytes, r.spec.name))
        while runtimes:
            assignment = self._spread(sim, runtimes, nodes)
            fraction = self._uniform_fraction(sim, assignment)
            if fraction is not None:
                for node_name, members in assignment.items():
                    for runtime in members:
                        level = max(fraction, runtime.demand.min_resident_fraction)
                        sim.place(runtime.spec.name, node_name, level, "stream")
                return
            # Nothing fits even fully offloaded: leave out the least important, largest model.
            runtimes.remove(
                min(runtimes, key=lambda r: (r.spec.priority, -r.demand.weight_bytes, r.spec.name))
            )

    @staticmethod
    def _spread(sim: Simulation, runtimes: list[ModelRuntime], nodes: list) -> dict[str, list[ModelRuntime]]:  # type: ignore[type-arg]
        """Largest model first onto the node with the most GPU memory per byte already assigned."""
        assigned_bytes = {n.name: 0 for n in nodes}
        assignment: dict[str, list[ModelRuntime]] = {n.name: [] for n in nodes}
        for runtime in runtimes:
            node = max(
                nodes,
                key=lambda n: (
                    usable_gpu_bytes(n) / (1 + assigned_bytes[n.name] + runtime.demand.weight_bytes),
                    n.name,
                ),
            )
            assigned_bytes[node.name] += runtime.demand.weight_bytes
            assignment[node.name].append(runtime)
        return assignment

    def _uniform_fraction(self, sim: Simulation, assignment: dict[str, list[ModelRuntime]]) -> float | None:
        for fraction in sorted(self.levels, reverse=True):
            fits = True
            for node_name, members in assignment.items():
                node = sim.node_by_name[node_name]
                gpu = sum(
                    gpu_bytes_needed(r.demand, max(fraction, r.demand.min_resident_fraction), "stream")
                    for r in members
                )
                host = sum(
                    host_bytes_needed(r.demand, max(fraction, r.demand.min_resident_fraction))
                    for r in members
                )
                if gpu > usable_gpu_bytes(node) or host > node.host_memory_bytes - node.reserved_host_bytes:
                    fits = False
                    break
            if fits:
                return fraction
        return None


class BinpackPolicy:
    """Whole models, first-fit once in priority order; the rest never run."""

    name = "binpack"

    def __init__(self) -> None:
        self._placed = False

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Place once, at the start."""
        if self._placed:
            return
        self._placed = True
        for runtime in sorted(sim.models.values(), key=lambda r: (-r.spec.priority, r.spec.name)):
            need = gpu_bytes_needed(runtime.demand, 1.0, "stream")
            for node in sim.nodes:
                if node.accepts_work and sim.free_bytes(node.name)[0] >= need:
                    sim.place(runtime.spec.name, node.name, 1.0, "stream")
                    break


POLICIES: dict[str, Callable[[], object]] = {
    "residency": ResidencyPolicy,
    "lru-evict": LruEvictPolicy,
    "uniform-offload": UniformOffloadPolicy,
    "binpack": BinpackPolicy,
}
BASELINES = ("lru-evict", "uniform-offload", "binpack")
