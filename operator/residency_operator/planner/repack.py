"""Repack several models at once: where the greedy's single moves left busy models out, re-solve a small
neighbourhood exactly.

The greedy admits one model at a time and makes room by demoting or preempting on one node; it never moves
two models so that a third fits (a 9 GiB model left out beside 5 GiB free on one node and 6 GiB on another,
where moving a 3 GiB model across would do). After the greedy, this pass takes the most important busy
models it left out, a neighbourhood of the few nodes with the most room they could use (free GPU memory
plus what models of no higher priority hold there), and every model placed on those nodes, and solves
that sub-problem with the exact lexicographic MILP (``planner/milp.py``: the same tiers, the same
``preemptible: false`` and incumbency rules). Its answer replaces the greedy's on the neighbourhood only
where it runs a left-out model and no priority tier is worse off. The sub-problem is small (at most
``REPACK_MAX_MODELS`` models on ``REPACK_NODES`` nodes), and a plan tries at most ``REPACK_ROUNDS``
neighbourhoods; fleets of more than ``PlannerConfig.repack_max_models`` models skip it (the scale goal:
10 000 models planned in under a second).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from residency_operator.planner.greedy_state import Assignment
from residency_operator.planner.milp import assignments_from_milp, solve_lexicographic
from residency_operator.planner.options import BoolArray, usable_gpu_bytes
from residency_operator.planner.types import (
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    PlannerConfig,
    SensitivityProfile,
)

if TYPE_CHECKING:
    from residency_operator.planner.problem import PlanningProblem

REPACK_NODES = 2
"""Nodes in one neighbourhood."""
REPACK_ROUNDS = 2
"""Neighbourhoods tried per plan (each around the most important busy model still left out)."""
REPACK_MAX_MODELS = 12
"""Largest sub-problem solved exactly (models placed on the neighbourhood plus the left-out ones)."""
REPACK_LEFT_OUT = 3
"""Left-out models offered to one neighbourhood."""
TIER_TOLERANCE = 1e-6
REPACK_NODE_LIMIT = 50
"""Branch-and-bound nodes per MILP stage of a neighbourhood: bounds the work deterministically."""
REPACK_TIME_LIMIT_SECONDS = 0.25
"""And a time limit per stage, as a guard (the node limit is what normally ends a search)."""

ProblemFactory = Callable[
    [
        Iterable[ModelDemand],
        Iterable[NodeCapacity],
        Iterable[CurrentPlacement],
        Iterable[SensitivityProfile],
        PlannerConfig,
    ],
    "PlanningProblem",
]
"""How a sub-problem is built (``PlanningProblem`` itself, passed in so this stage does not import
the entry point that calls it)."""


def is_busy(model: ModelDemand) -> bool:
    """Requests wait for it, or its demand is unknown or above zero (an idle model is not worth a repack)."""
    demand = model.demand_decode_tokens_per_second
    return model.waiting_requests > 0 or demand is None or demand > 0


def repack(
    problem: PlanningProblem,
    assignment: list[Assignment | None],
    notes: list[str],
    make_problem: ProblemFactory,
) -> list[Assignment | None]:
    """The assignment with up to ``REPACK_ROUNDS`` neighbourhoods re-solved exactly (see the module)."""
    models = problem.models
    if len(models) > problem.config.repack_max_models or problem.config.repack_rounds <= 0:
        return assignment
    result = list(assignment)
    tables = problem.tables
    feasible_class: BoolArray = np.asarray(tables.feasible.any(axis=(1, 3)), dtype=bool)  # [class, model]
    left_out = sorted(
        (
            i
            for i, a in enumerate(result)
            if a is None and models[i].wanted and is_busy(models[i]) and feasible_class[:, i].any()
        ),
        key=lambda i: (
            -models[i].priority,
            -(models[i].demand_decode_tokens_per_second or 0.0),
            models[i].name,
        ),
    )
    tried: set[int] = set()
    repacked = 0
    for _ in range(min(REPACK_ROUNDS, problem.config.repack_rounds)):
        anchor = next((i for i in left_out if i not in tried and result[i] is None), None)
        if anchor is None:
            break
        tried.add(anchor)
        nodes = neighbourhood(problem, result, anchor, feasible_class)
        if not nodes or not room_could_suffice(problem, result, anchor, nodes):
            continue
        placed = [i for i, a in enumerate(result) if a is not None and a.node in nodes]
        room = REPACK_MAX_MODELS - len(placed)
        if room <= 0:
            continue
        node_classes = {problem.class_of_node[n] for n in nodes}
        candidates = [
            i for i in left_out if result[i] is None and any(feasible_class[c, i] for c in node_classes)
        ][: min(room, REPACK_LEFT_OUT)]
        if anchor not in candidates:
            continue
        better = solve_neighbourhood(problem, result, nodes, placed, candidates, make_problem)
        if better is not None:
            for i, a in better.items():
                result[i] = a
            repacked += 1
    if repacked:
        notes.append(
            f"repacked {repacked} neighbourhood(s) of {REPACK_NODES} nodes exactly (planner/repack.py)"
        )
    return result


def neighbourhood(
    problem: PlanningProblem, assignment: Sequence[Assignment | None], anchor: int, feasible_class: BoolArray
) -> list[int]:
    """The ``REPACK_NODES`` accepting nodes where the anchor could run with the most room it could use: free
    GPU memory plus the GPU memory of preemptible models of no higher priority placed there."""
    models, nodes = problem.models, problem.nodes
    priority = models[anchor].priority
    free = [usable_gpu_bytes(n) for n in nodes]
    reclaimable = [0] * len(nodes)
    for i, a in enumerate(assignment):
        if a is None:
            continue
        free[a.node] -= a.gpu_bytes
        if models[i].preemptible and models[i].priority <= priority:
            reclaimable[a.node] += a.gpu_bytes
    eligible = [
        n
        for n, node in enumerate(nodes)
        if node.accepts_work and feasible_class[problem.class_of_node[n], anchor]
    ]
    eligible.sort(key=lambda n: (-(max(0, free[n]) + reclaimable[n]), n))
    return sorted(eligible[:REPACK_NODES])


def room_could_suffice(
    problem: PlanningProblem, assignment: Sequence[Assignment | None], anchor: int, nodes: list[int]
) -> bool:
    """Whether the neighbourhood's free GPU memory and what preemptible models of no higher priority hold
    there add up to the anchor's smallest placement (else no repack can place it: the MILP is skipped)."""
    models, tables = problem.models, problem.tables
    priority = models[anchor].priority
    room = 0
    for n in nodes:
        room += usable_gpu_bytes(problem.nodes[n])
    for i, a in enumerate(assignment):
        if (
            a is not None
            and a.node in nodes
            and not (models[i].preemptible and models[i].priority <= priority)
        ):
            room -= a.gpu_bytes
    feasible = tables.feasible[:, :, anchor, :].any(axis=0)  # [mode, level]
    needs = tables.gpu_bytes[:, anchor, :][feasible]
    return bool(needs.size) and int(needs.min()) <= room


def solve_neighbourhood(
    problem: PlanningProblem,
    assignment: Sequence[Assignment | None],
    nodes: list[int],
    placed: list[int],
    candidates: list[int],
    make_problem: ProblemFactory,
) -> dict[int, Assignment | None] | None:
    """The exact answer on the neighbourhood where it runs a left-out model and loses no tier; else None."""
    members = sorted(set(placed) | set(candidates))
    sub_models = [problem.models[i] for i in members]
    sub_nodes = [problem.nodes[n] for n in nodes]
    names = {n.name for n in sub_nodes}
    current = [problem.current[m.name] for m in sub_models if m.name in problem.current]
    current = [c for c in current if c.node in names]
    config = dataclasses.replace(
        problem.config,
        solver="milp",
        repack_rounds=0,
        milp_time_limit_seconds=min(problem.config.milp_time_limit_seconds, REPACK_TIME_LIMIT_SECONDS),
    )
    sub = make_problem(sub_models, sub_nodes, current, problem.profiles, config)
    options = sub.node_options()
    outcome = solve_lexicographic(sub.models, sub.nodes, options, config, node_limit=REPACK_NODE_LIMIT)
    if not outcome.solved:
        return None
    exact = assignments_from_milp(options, outcome, len(sub.models))
    # The sub-problem sorts models and nodes by name, as the full one does: map its indices back.
    global_model = [problem.model_index[m.name] for m in sub.models]
    global_node = [problem.node_index[n.name] for n in sub.nodes]
    proposal: dict[int, Assignment | None] = {}
    for k, a in enumerate(exact):
        proposal[global_model[k]] = None if a is None else dataclasses.replace(a, node=global_node[a.node])
    if not any(proposal[i] is not None for i in candidates):
        return None
    if not no_tier_worse(problem.models, {i: assignment[i] for i in members}, proposal):
        return None
    return proposal


def no_tier_worse(
    models: Sequence[ModelDemand],
    before: dict[int, Assignment | None],
    after: dict[int, Assignment | None],
) -> bool:
    """Tier by tier, highest first: ``after`` is better at the first tier where they differ, or equal."""
    tiers = sorted({models[i].priority for i in before}, reverse=True)
    for tier in tiers:
        old = sum(a.score for i, a in before.items() if a is not None and models[i].priority == tier)
        new = sum(a.score for i, a in after.items() if a is not None and models[i].priority == tier)
        tolerance = TIER_TOLERANCE * max(1.0, abs(old))
        if new > old + tolerance:
            return True
        if new < old - tolerance:
            return False
    return True
