"""A last pass over a solved plan: free GPU memory nobody was given raises residency where it costs nothing.

The solvers weigh GPU bytes as a tie-breaker, so where offloading predicts no loss (an emulated tier, or a
memory-light model) they may leave a model partly offloaded on a node with room to spare. Users expect a
model that fits to be fully resident; this pass promotes placed models, most important first, to the
highest residency level that fits in their node's free memory without lowering their predicted value.

``node_room`` (what an assignment leaves free on every node) lives here too: this pass, the take-turns
pass (``swapin``) and the plan's description all read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from residency_operator.planner.greedy_state import Assignment
from residency_operator.planner.options import MODES, usable_gpu_bytes, usable_host_bytes

if TYPE_CHECKING:
    from residency_operator.planner.problem import PlanningProblem

_VALUE_TOLERANCE = 1e-9

NodeRoom = tuple[Sequence[int], Sequence[int], Sequence[float]]
"""Per node: free GPU bytes, free host bytes (before host caches) and free GPU time share."""


def node_room(problem: PlanningProblem, assignment: Sequence[Assignment | None]) -> NodeRoom:
    """What an assignment leaves free on every node."""
    nodes = problem.nodes
    free_gpu = [usable_gpu_bytes(node) for node in nodes]
    free_host = [usable_host_bytes(node) for node in nodes]
    time_cap = [problem.config.max_gpu_busy_fraction] * len(nodes)
    used_time = [0.0] * len(nodes)
    for a in assignment:
        if a is not None:
            free_gpu[a.node] -= a.gpu_bytes
            free_host[a.node] -= a.host_bytes
            used_time[a.node] += a.busy
            time_cap[a.node] = min(time_cap[a.node], a.busy + a.tolerance)
    return free_gpu, free_host, [cap - used for cap, used in zip(time_cap, used_time, strict=True)]


def fill_free_memory(
    problem: PlanningProblem,
    assignment: Sequence[Assignment | None],
    only: Iterable[int] | None = None,
    used_gpu: Sequence[int] | None = None,
) -> list[Assignment | None]:
    """The assignment with partly offloaded models promoted into free GPU memory (deterministic).

    ``only`` limits the pass to some models (the incremental planner's touched ones); ``used_gpu``, GPU
    bytes the assignment uses per node, saves summing it when the caller keeps it current.
    """
    tables = problem.tables
    result = list(assignment)
    if used_gpu is None:
        used = [0] * len(problem.nodes)
        for placed in result:
            if placed is not None:
                used[placed.node] += placed.gpu_bytes
    else:
        used = list(used_gpu)
    used_gpu = used
    candidates = range(len(result)) if only is None else only
    order = sorted(
        (i for i in candidates if (placed := result[i]) is not None and placed.resident_fraction < 1.0),
        key=lambda i: (-problem.models[i].priority, problem.models[i].name),
    )
    for i in order:
        placed = result[i]
        assert placed is not None
        node_class = problem.class_of_node[placed.node]
        mode_index = MODES.index(placed.mode)
        free_bytes = usable_gpu_bytes(problem.nodes[placed.node]) - used_gpu[placed.node]
        for level_index in range(len(tables.levels) - 1, -1, -1):
            level = float(tables.levels[level_index])
            if level <= placed.resident_fraction + 1e-9:
                break
            if not tables.feasible[node_class, mode_index, i, level_index]:
                continue
            value = float(tables.primary_value[node_class, mode_index, i, level_index])
            if value < placed.value - _VALUE_TOLERANCE * max(1.0, abs(placed.value)):
                continue
            gpu_bytes = int(tables.gpu_bytes[mode_index, i, level_index])
            if gpu_bytes - placed.gpu_bytes > free_bytes:
                continue
            full_value = float(tables.value[node_class, mode_index, i, level_index])
            result[i] = Assignment(
                node=placed.node,
                resident_fraction=level,
                mode=placed.mode,
                gpu_bytes=gpu_bytes,
                host_bytes=int(tables.host_bytes[i, level_index]),
                busy=float(tables.busy_fraction[node_class, mode_index, i, level_index]),
                tolerance=float(tables.tolerance[node_class, mode_index, i, level_index]),
                value=value,
                score=placed.score + (value - placed.value),
                full_value=full_value,
                full_score=placed.full_score + (full_value - placed.full_value),
                incumbent=placed.incumbent and level == placed.resident_fraction,
            )
            used_gpu[placed.node] += gpu_bytes - placed.gpu_bytes
            break
    return result
