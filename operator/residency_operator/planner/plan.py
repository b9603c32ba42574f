"""The planner's entry point: ``plan(models, nodes, current_placements, profiles, now, config) -> Plan``.

It is a pure function of its inputs (no clock, no randomness, no I/O): the operator calls it on every
reconcile with what it observes, the simulator calls it with simulated state. Small inputs are solved
exactly (MILP); large ones greedily, with the optimality gap against an upper bound reported.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from residency_operator.planner.actions import assemble_plan
from residency_operator.planner.fill import fill_free_memory
from residency_operator.planner.gpus import is_multi_gpu, plan_on_nodes, split_into_units
from residency_operator.planner.greedy import Assignment, GreedyPlanner
from residency_operator.planner.milp import (
    assignments_from_milp,
    count_options,
    lp_upper_bound,
    solve_lexicographic,
)
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.problem import PlanningProblem
from residency_operator.planner.repack import repack
from residency_operator.planner.swapin import serve_waiting
from residency_operator.planner.types import (
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannerConfig,
    SensitivityProfile,
    SolverName,
    Unschedulable,
)

__all__ = ["PlanningProblem", "assemble_plan", "collector_paused", "greedy_solve", "plan"]


def plan(
    models: Iterable[ModelDemand],
    nodes: Iterable[NodeCapacity],
    current_placements: Iterable[CurrentPlacement],
    profiles: Iterable[SensitivityProfile] = (),
    now: float = 0.0,
    config: PlannerConfig | None = None,
) -> Plan:
    """Decide where every model runs, at what GPU residency and mode, and the ordered steps to get there.

    ``models``: every LLMModel (``wanted=False`` for ones to remove). ``nodes``: every GPU node, cordoned
    or not. ``current_placements``: what runs (or is preempted) where now. ``profiles``: measured
    sensitivity curves. ``now``: the caller's clock in seconds, recorded in the plan (never read here, so
    the plan is deterministic). The same inputs always give the same plan.
    """
    with collector_paused():
        config = config or PlannerConfig()
        node_list = list(nodes)
        if not any(is_multi_gpu(n) for n in node_list):
            return _plan(models, node_list, current_placements, profiles, now, config)
        return plan_gpus(list(models), node_list, list(current_placements), list(profiles), now, config)


def plan_gpus(
    models: list[ModelDemand],
    nodes: list[NodeCapacity],
    current_placements: list[CurrentPlacement],
    profiles: list[SensitivityProfile],
    now: float,
    config: PlannerConfig,
) -> Plan:
    """:func:`plan` on a fleet with multi-GPU nodes: the solvers pack GPU sets (planner/gpus.py), and the
    plan names each placement's node and GPUs. A model no node can hold is refused here, with its reason."""
    started = time.perf_counter()
    # Measured curves where there are any; the engine fit is left to the solvers (fitting it twice a round
    # doubled the plan time of a profiled fleet), the split only compares a model's rates on two GPU sets.
    units = split_into_units(models, nodes, current_placements, Predictor(profiles), config)
    refused = {u.model for u in units.too_large}
    solvable = [dataclasses.replace(m, wanted=False) if m.name in refused else m for m in models]
    planned = _plan(solvable, units.units, units.current, profiles, now, config)
    result = plan_on_nodes(planned, units)
    return dataclasses.replace(result, solve_seconds=time.perf_counter() - started)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while planning: a large plan allocates many small, short-lived
    objects, and each full collection it would trigger walks the whole heap (a tenth of a second or more);
    whatever cycles a plan leaves behind are collected after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _plan(
    models: Iterable[ModelDemand],
    nodes: Iterable[NodeCapacity],
    current_placements: Iterable[CurrentPlacement],
    profiles: Iterable[SensitivityProfile],
    now: float,
    config: PlannerConfig,
) -> Plan:
    started = time.perf_counter()
    problem = PlanningProblem(models, nodes, current_placements, profiles, config)
    notes: list[str] = []
    solver: SolverName = "greedy"
    assignment: list[Assignment | None] | None = None
    preempted_by: dict[int, int] = {}
    upper_bound = 0.0
    gap = 0.0
    option_count = count_options(problem.tables, problem.class_of_node, problem.nodes)
    use_milp = config.solver == "milp" or (
        config.solver == "auto" and option_count <= config.milp_max_options
    )
    if use_milp:
        options = problem.node_options()
        result = solve_lexicographic(problem.models, problem.nodes, options, config)
        if result.solved:
            solver = "milp"
            assignment = assignments_from_milp(options, result, len(problem.models))
            gap = result.gap
            upper_bound = result.objective * (1.0 + gap) if result.objective > 0 else result.objective
        else:
            notes.append(f"MILP gave no solution ({result.message}); used the greedy")
    if assignment is None:
        _, assignment, preempted_by, upper_bound, gap = greedy_solve(problem, option_count, notes)
        # Where single moves left busy models out, a few small neighbourhoods are re-solved exactly.
        assignment = repack(problem, assignment, notes, PlanningProblem)
    assignment = fill_free_memory(problem, assignment)
    assignment, gave_way = serve_waiting(problem, assignment)
    if gave_way:
        notes.append(
            f"{len(gave_way)} idle model(s) preempted so that {len(set(gave_way.values()))} model(s) with "
            "requests waiting can run"
        )
    yielded = sum(1 for m in problem.models if m.yielded_priority)
    if yielded:
        notes.append(f"{yielded} idle model(s) yield their priority to busy models (planner/demand.py)")
    planned = assemble_plan(
        problem, assignment, preempted_by, solver, upper_bound, gap, now, time.perf_counter() - started, notes
    )
    return with_gave_way_reasons(problem, planned, gave_way) if gave_way else planned


def with_gave_way_reasons(problem: PlanningProblem, planned: Plan, gave_way: dict[int, int]) -> Plan:
    """The plan with the reason of every idle model that gave way to a waiting one saying so."""
    models = problem.models
    why: dict[str, Unschedulable] = {}
    for victim, waiting in gave_way.items():
        name = models[victim].name
        now = problem.current.get(name)
        where = f" on {now.node}" if now is not None else ""
        kept = any(c.model == name for c in planned.cached)
        why[name] = Unschedulable(
            name,
            "PreemptedWhileIdle",
            f"idle, so it gave way to {models[waiting].name} ({models[waiting].waiting_requests} request(s) "
            + "waiting); "
            + (f"weights stay in host memory{where} and " if kept else "")
            + "its next request brings it back",
        )
    actions = tuple(
        dataclasses.replace(a, reason=f"preempt: {why[a.model].message}")
        if a.kind in ("preempt", "evict") and a.model in why
        else a
        for a in planned.actions
    )
    return dataclasses.replace(
        planned, actions=actions, unschedulable=tuple(why.get(u.model, u) for u in planned.unschedulable)
    )


def greedy_solve(
    problem: PlanningProblem, option_count: int, notes: list[str]
) -> tuple[GreedyPlanner, list[Assignment | None], dict[int, int], float, float]:
    """The greedy's assignment, who preempted whom, and an upper bound on the objective with the gap to
    it (the LP relaxation where the problem is small enough, else a capacity-free bound)."""
    config = problem.config
    greedy = GreedyPlanner(
        problem.models,
        problem.nodes,
        problem.class_of_node,
        problem.tables,
        problem.current,
        problem.predictor,
        config,
    )
    greedy_result = greedy.solve()
    assignment = greedy_result.assignment
    objective = sum(a.full_score for a in assignment if a is not None)
    if option_count <= config.bound_max_options:
        options = problem.node_options()
        upper_bound = max(objective, lp_upper_bound(problem.models, problem.nodes, options, config))
    else:
        # Without capacity limits every model would take its best option: a valid, looser bound.
        best = np.where(np.isfinite(greedy.best_target_score), greedy.best_target_score, 0.0)
        # Full value adds at most the excess-throughput term on top of the primary one, and that term
        # never exceeds its weight times the availability value (see options.excess_value).
        best = best + np.where(
            greedy.has_option,
            config.excess_throughput_weight * config.availability_value_tokens_per_second,
            0.0,
        )
        for i, a in enumerate(assignment):
            if a is not None and a.full_score > best[i]:
                best[i] = a.full_score
        upper_bound = float(np.maximum(best, 0.0).sum())
        notes.append("optimality gap is against the capacity-free bound (input too large for the LP)")
    gap = (upper_bound - objective) / upper_bound if upper_bound > 0 else 0.0
    return greedy, assignment, greedy_result.preempted_by, upper_bound, gap
