"""A last pass over a solved plan: a model with requests waiting gets the GPU memory of idle models.

The solvers plan for the demand of the last minute, as if every model needed its place all the time.
When the models together need more memory than the fleet has, some are left out, and a request for one
of them would wait until it times out, while models that hold memory sit idle between their requests.
Serving systems that load whole models on demand (ModelMesh, Ollama) win exactly there: they unload an
idle model and load the one that is asked for. This pass does the same with what residency has over
them: the idle model's weights stay pinned in host memory (its resume is a host-to-GPU copy, not a read
from storage), and the waiting model may come back partly resident if that is what fits.

Only idle models give way (their current placement is on the node and they served no traffic lately),
the lowest priority and least valuable first and no more than the room needs; of any priority (an idle
model's memory goes to whoever is busy: priority orders demand, not memory; it comes back at its own
priority with its next request, resumed from host memory) unless
``PlannerConfig.idle_gives_way_to_any_priority`` is off (then none of higher priority than the waiting
model); a ``preemptible: false`` one only with its host copy's room set aside (``host_copy_kept``, see
``PlanningProblem``), never one that has requests waiting itself, and only where each can keep its weights
in host memory. The waiting model must meet its SLO at
the residency it gets, the node's GPU time must hold its demand beside the models that stay, and nothing
is swapped onto a node where a running model has requests queued (a burst: its recent average understates
what it needs now). A node where the waiting model's weights are already cached is preferred (a resume,
not a read from storage).
Deterministic: models and nodes in name order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from residency_operator.planner.fill import node_room
from residency_operator.planner.greedy_state import Assignment
from residency_operator.planner.options import MODES, cached_host_bytes

if TYPE_CHECKING:
    from residency_operator.planner.problem import PlanningProblem


NODES_COMPARED = 8
NODES_TRIED = 64
"""A waiting model is placed on the best of the first :data:`NODES_COMPARED` nodes where it fits, trying
at most :data:`NODES_TRIED` (the one holding its cached weights first, then the roomiest): enough to
choose well, and the pass stays cheap on a fleet of thousands of nodes."""


def serve_waiting(
    problem: PlanningProblem, assignment: Sequence[Assignment | None]
) -> tuple[list[Assignment | None], dict[int, int]]:
    """The assignment with waiting, unplaced models swapped in for idle ones, and who gave way to whom
    (victim index → waiting model index)."""
    models, nodes = problem.models, problem.nodes
    result = list(assignment)
    waiting = [
        i
        for i, model in enumerate(models)
        if model.wanted and model.waiting_requests > 0 and result[i] is None
    ]
    gave_way: dict[int, int] = {}
    if not waiting or not any(node.accepts_work for node in nodes):
        return result, gave_way
    room = node_room(problem, result)
    free_gpu, free_host, free_time = list(room[0]), list(room[1]), list(room[2])
    # GPU time the placed models use per node, and the most they may use (the tightest SLO among them):
    # a waiting model must leave the others their SLO, and the others must leave it its own.
    used_time = [0.0] * len(nodes)
    for placed in result:
        if placed is not None:
            used_time[placed.node] += placed.busy
    time_cap = [used + free for used, free in zip(used_time, free_time, strict=True)]
    # A model that gives way must be able to come back cheaply: its weights stay pinned in host memory,
    # beside the caches that every other model left without a place may keep on its node (free_host
    # counts no caches; the plan hands them out most important first).
    for name, now_placement in problem.current.items():
        index = problem.model_index.get(name)
        node_index = problem.node_index.get(now_placement.node)
        if index is not None and node_index is not None and result[index] is None and models[index].wanted:
            free_host[node_index] -= cached_host_bytes(models[index], now_placement.kv_cache_bytes)
    waiting.sort(key=lambda i: (-models[i].priority, models[i].name))
    # A node where a running model has requests queued has no GPU time to give, whatever its recent
    # average says (a burst): nothing is swapped onto it.
    saturated = [False] * len(nodes)
    for j, placed in enumerate(result):
        now_j = problem.current.get(models[j].name)
        if (
            placed is not None
            and models[j].waiting_requests > 0
            and now_j is not None
            and now_j.is_running
            and now_j.node == nodes[placed.node].name
        ):
            saturated[placed.node] = True
    # Idle models that may give way, per node (least valuable first), and the GPU bytes they hold: a node
    # is tried only where free memory and all of its idle models could hold the waiting model.
    idle_on: list[list[int]] = [[] for _ in nodes]
    for j, placed in enumerate(result):
        if placed is not None and _may_give_way(problem, j, nodes[placed.node].name):
            idle_on[placed.node].append(j)
    for members in idle_on:
        members.sort(key=lambda j: (models[j].priority, _value(result[j]), models[j].name))
    # GPU bytes idle models of at most a given priority hold, per node (for each priority asked for)
    reclaimable: dict[int, np.ndarray] = {}

    def reclaimable_up_to(priority: int) -> np.ndarray:
        if priority not in reclaimable:
            reclaimable[priority] = np.array(
                [
                    sum(_gpu(result[j]) for j in members if models[j].priority <= priority)
                    for members in idle_on
                ],
                dtype=np.float64,
            )
        return reclaimable[priority]

    free_gpu_array = np.array(free_gpu, dtype=np.float64)
    open_nodes = np.array([node.accepts_work for node in nodes], dtype=bool) & ~np.array(
        saturated, dtype=bool
    )
    class_of_node = np.array(problem.class_of_node, dtype=np.intp)
    tables = problem.tables
    highest = max(m.priority for m in models) if problem.config.idle_gives_way_to_any_priority else None
    for i in waiting:
        model = models[i]
        up_to = model.priority if highest is None else highest  # idle models of at most this give way
        now = problem.current.get(model.name)
        cached_on = problem.node_index.get(now.node) if now is not None else None
        # the least GPU memory an option that meets the SLO needs, per kind of node: a node is tried only
        # where its free memory and all its idle models could hold that
        needs = np.where(tables.feasible[:, :, i, :], tables.gpu_bytes[None, :, i, :], np.inf)
        least_by_class = needs.reshape(needs.shape[0], -1).min(axis=1)
        roomy = free_gpu_array + reclaimable_up_to(up_to)
        possible = np.flatnonzero(open_nodes & (roomy >= least_by_class[class_of_node]))
        # the node holding its cached weights first (a resume), then the roomiest: the first few that
        # fit decide (the pass stays cheap on a large fleet)
        order = sorted(possible.tolist(), key=lambda n: (n != cached_on, -roomy[n], n))
        best: tuple[tuple[object, ...], int, Assignment, list[int]] | None = None
        fitted = 0
        for n in order[:NODES_TRIED]:
            if fitted >= NODES_COMPARED:
                break
            node_class = problem.class_of_node[n]
            idle = [j for j in idle_on[n] if models[j].priority <= up_to]
            placed_here = _first_fit(
                problem, i, n, node_class, idle, result, free_gpu, free_host, free_time, used_time
            )
            if placed_here is None:
                continue
            fitted += 1
            candidate, victims = placed_here
            key = (
                n != cached_on,
                len(victims),
                -candidate.resident_fraction,
                sum(_value(result[j]) for j in victims),
                nodes[n].name,
            )
            if best is None or key < best[0]:
                best = (key, n, candidate, victims)
        if best is None:
            continue
        _, n, candidate, victims = best
        if now is not None and now.node == nodes[n].name:
            free_host[n] += cached_host_bytes(model, now.kv_cache_bytes)  # back where its cache is
        for j in victims:
            placed = result[j]
            assert placed is not None
            idle_on[n].remove(j)
            for priority, per_node in reclaimable.items():
                if models[j].priority <= priority:
                    per_node[n] -= placed.gpu_bytes
            free_gpu[n] += placed.gpu_bytes
            free_gpu_array[n] += placed.gpu_bytes
            free_host[n] += placed.host_bytes - _cache_bytes(problem, j)
            used_time[n] -= placed.busy
            result[j] = None
            gave_way[j] = i
        result[i] = candidate
        free_gpu[n] -= candidate.gpu_bytes
        free_gpu_array[n] -= candidate.gpu_bytes
        free_host[n] -= candidate.host_bytes
        used_time[n] += candidate.busy
        # (the victims' own limits no longer bind, but the cap is kept: conservative)
        time_cap[n] = min(time_cap[n], candidate.busy + candidate.tolerance)
        free_time[n] = time_cap[n] - used_time[n]
    return result, gave_way


def _may_give_way(problem: PlanningProblem, j: int, node_name: str) -> bool:
    """Whether model ``j``, placed on ``node_name``, may be preempted for a waiting model (of its own
    priority or higher: the caller checks that)."""
    victim = problem.models[j]
    if not (victim.preemptible or victim.host_copy_kept) or victim.waiting_requests > 0:
        return False
    now = problem.current.get(victim.name)
    return now is not None and now.state == "idle" and now.node == node_name


def _cache_bytes(problem: PlanningProblem, j: int) -> int:
    model = problem.models[j]
    now = problem.current.get(model.name)
    return cached_host_bytes(model, 0 if now is None else now.kv_cache_bytes)


def _gpu(placed: Assignment | None) -> int:
    return 0 if placed is None else placed.gpu_bytes


def _value(placed: Assignment | None) -> float:
    return 0.0 if placed is None else placed.value


def _first_fit(
    problem: PlanningProblem,
    i: int,
    n: int,
    node_class: int,
    idle: list[int],
    result: list[Assignment | None],
    free_gpu: Sequence[int],
    free_host: Sequence[int],
    free_time: Sequence[float],
    used_time: Sequence[float],
) -> tuple[Assignment, list[int]] | None:
    """The highest residency (then the fewest idle models to displace, least valuable first) at which
    model ``i`` meets its SLO on node ``n``, or ``None``."""
    tables = problem.tables
    model = problem.models[i]
    now = problem.current.get(model.name)
    # resumed here, the model's own host cache becomes its offloaded copy: that host memory frees
    own_cache = (
        cached_host_bytes(model, now.kv_cache_bytes)
        if now is not None and now.node == problem.nodes[n].name
        else 0
    )
    best: tuple[tuple[object, ...], Assignment, list[int]] | None = None
    for level_index in range(len(tables.levels) - 1, -1, -1):
        level = float(tables.levels[level_index])
        for mode_index, mode in enumerate(MODES):
            if not tables.feasible[node_class, mode_index, i, level_index]:
                continue
            need_gpu = int(tables.gpu_bytes[mode_index, i, level_index])
            need_host = int(tables.host_bytes[i, level_index])
            need_time = float(tables.busy_fraction[node_class, mode_index, i, level_index])
            tolerance = float(tables.tolerance[node_class, mode_index, i, level_index])
            gpu, host, time_left = free_gpu[n], free_host[n] + own_cache, free_time[n]
            others = used_time[n]  # what the models that stay use of the GPU's time
            victims: list[int] = []
            for j in idle:
                if gpu >= need_gpu and time_left >= need_time and others <= tolerance + 1e-9:
                    break
                placed = result[j]
                assert placed is not None
                victims.append(j)
                gpu += placed.gpu_bytes
                host += placed.host_bytes - _cache_bytes(problem, j)
                time_left += placed.busy
                others -= placed.busy
            if gpu < need_gpu or host < need_host or time_left < need_time or others > tolerance + 1e-9:
                continue
            value = float(tables.primary_value[node_class, mode_index, i, level_index])
            full_value = float(tables.value[node_class, mode_index, i, level_index])
            candidate = Assignment(
                node=n,
                resident_fraction=level,
                mode=mode,
                gpu_bytes=need_gpu,
                host_bytes=need_host,
                busy=need_time,
                tolerance=tolerance,
                value=value,
                score=value,
                full_value=full_value,
                full_score=full_value,
                incumbent=now is not None
                and now.node == problem.nodes[n].name
                and now.is_running
                and abs(now.resident_fraction - level) < 1e-9,
            )
            key = (len(victims), -level, -value)
            if best is None or key < best[0]:
                best = (key, candidate, victims)
        if best is not None and not best[2]:
            break  # the highest level that needs nobody to give way
    return None if best is None else (best[1], best[2])
