"""The planner's entry point: ``plan(models, nodes, current_placements, profiles, now, config) -> Plan``.

It is a pure function of its inputs (no clock, no randomness, no I/O): the operator calls it on every
reconcile with what it observes, the simulator calls it with simulated state. Small inputs are solved
exactly (MILP); large ones greedily, with the optimality gap against an upper bound reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np

from residency_operator.planner.costs import (
    TransitionCost,
    evict_cost,
    load_cost,
    preempt_cost,
)
from residency_operator.planner.fill import fill_free_memory
from residency_operator.planner.greedy import Assignment, GreedyPlanner
from residency_operator.planner.milp import (
    NodeOptions,
    assignments_from_milp,
    build_node_options,
    count_options,
    lp_upper_bound,
    solve_lexicographic,
)
from residency_operator.planner.options import (
    ClassTables,
    build_class_tables,
    cached_host_bytes,
    node_class_key,
    transition,
    usable_gpu_bytes,
    usable_host_bytes,
)
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.reasons import ReasonContext, percent, slo_text, unschedulable_reason
from residency_operator.planner.types import (
    Action,
    ActionKind,
    CachedModel,
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannedPlacement,
    PlannerConfig,
    SensitivityProfile,
    SolverName,
    Unschedulable,
)

ACTION_ORDER: dict[ActionKind, int] = {
    "evict": 0,
    "preempt": 1,
    "demote": 2,
    "reconfigure": 3,
    "migrate": 4,
    "resume": 5,
    "promote": 6,
    "load": 7,
}
"""Steps that free memory run before steps that take it, so no node is over-committed on the way."""


class PlanningProblem:
    """Normalised inputs shared by both solvers: sorted models and nodes, node classes, option tables."""

    def __init__(
        self,
        models: Iterable[ModelDemand],
        nodes: Iterable[NodeCapacity],
        current_placements: Iterable[CurrentPlacement],
        profiles: Iterable[SensitivityProfile],
        config: PlannerConfig,
    ) -> None:
        by_name: dict[str, ModelDemand] = {}
        for model in models:
            by_name[model.name] = model
        self.models: list[ModelDemand] = [by_name[name] for name in sorted(by_name)]
        self.model_index = {model.name: i for i, model in enumerate(self.models)}
        self.nodes: list[NodeCapacity] = sorted({n.name: n for n in nodes}.values(), key=lambda n: n.name)
        self.node_by_name = {node.name: node for node in self.nodes}
        self.node_index = {node.name: i for i, node in enumerate(self.nodes)}
        self.current: dict[str, CurrentPlacement] = {
            p.model: p for p in sorted(current_placements, key=lambda p: (p.model, p.node))
        }
        profile_list = list(profiles)
        self.predictor = Predictor(profile_list)
        self.config = config
        class_keys: dict[NodeCapacity, int] = {}
        self.class_of_node: list[int] = []
        for node in self.nodes:
            key = node_class_key(node)
            self.class_of_node.append(class_keys.setdefault(key, len(class_keys)))
        self.classes = list(class_keys)
        self.profiled_models = frozenset(p.model for p in profile_list)
        self.tables: ClassTables = build_class_tables(
            self.models, self.classes, self.predictor, config, self.profiled_models
        )
        self._node_options: NodeOptions | None = None

    def node_options(self) -> NodeOptions:
        """Every (model, node, level, mode) option, built once per problem (MILP and LP bound share it)."""
        if self._node_options is None:
            self._node_options = build_node_options(
                self.models,
                self.nodes,
                self.class_of_node,
                self.tables,
                self.current,
                self.predictor,
                self.config,
            )
        return self._node_options


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
    config = config or PlannerConfig()
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
        preempted_by = greedy_result.preempted_by
        objective = sum(a.full_score for a in assignment if a is not None)
        if option_count <= config.bound_max_options:
            options = problem.node_options()
            upper_bound = max(objective, lp_upper_bound(problem.models, problem.nodes, options, config))
        else:
            # Without capacity limits every model would take its best option: a valid, looser bound.
            best = np.where(np.isfinite(greedy.best_target_score), greedy.best_target_score, 0.0)
            # Full value adds at most the excess-throughput term on top of the primary one.
            excess = problem.tables.value - problem.tables.primary_value
            best = best + np.max(np.where(problem.tables.feasible, excess, 0.0), axis=(0, 1, 3))
            for i, a in enumerate(assignment):
                if a is not None and a.full_score > best[i]:
                    best[i] = a.full_score
            upper_bound = float(np.maximum(best, 0.0).sum())
            notes.append("optimality gap is against the capacity-free bound (input too large for the LP)")
        gap = (upper_bound - objective) / upper_bound if upper_bound > 0 else 0.0
    assignment = fill_free_memory(problem, assignment)
    return assemble_plan(
        problem, assignment, preempted_by, solver, upper_bound, gap, now, time.perf_counter() - started, notes
    )


def assemble_plan(
    problem: PlanningProblem,
    assignment: Sequence[Assignment | None],
    preempted_by: dict[int, int],
    solver: SolverName,
    upper_bound: float,
    gap: float,
    now: float,
    solve_seconds: float,
    notes: Sequence[str],
    only_models: Iterable[int] | None = None,
    base: Plan | None = None,
) -> Plan:
    """Build placements, host caches, ordered actions and reasons from per-model assignments.

    With ``only_models`` and ``base`` (the incremental path), only those models are re-described and
    everything else is taken from ``base``.
    """
    models, nodes = problem.models, problem.nodes
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
    free_time = [cap - used for cap, used in zip(time_cap, used_time, strict=True)]
    indices = list(range(len(models))) if only_models is None else sorted(set(only_models))
    placements: dict[str, PlannedPlacement] = {} if base is None else dict(base.placements)
    for i in indices:
        placements.pop(models[i].name, None)
        a = assignment[i]
        if a is not None:
            placements[models[i].name] = describe_placement(problem, i, a)

    # Preempted models keep weights and KV pinned in host memory while it fits, most important first.
    cached: dict[str, CachedModel] = {} if base is None else {c.model: c for c in base.cached}
    for i in indices:
        cached.pop(models[i].name, None)
    for kept in cached.values():
        free_host[problem.node_index[kept.node]] -= kept.host_bytes
    cache_candidates = [
        i
        for i in indices
        if assignment[i] is None
        and models[i].wanted
        and problem.config.keep_preempted_cache
        and (now_placement := problem.current.get(models[i].name)) is not None
        and now_placement.node in problem.node_index
    ]
    cache_candidates.sort(key=lambda i: (-models[i].priority, models[i].name))
    for i in cache_candidates:
        now_placement = problem.current[models[i].name]
        node = problem.node_index[now_placement.node]
        need = cached_host_bytes(models[i], now_placement.kv_cache_bytes)
        if nodes[node].accepts_work and free_host[node] >= need:
            free_host[node] -= need
            cached[models[i].name] = CachedModel(models[i].name, now_placement.node, need)

    # Incrementally, the base plan is taken as applied: only the re-planned models get actions.
    actions: list[Action] = []
    for i in indices:
        actions.extend(model_actions(problem, i, assignment, cached))
    actions.sort(key=lambda a: (ACTION_ORDER[a.kind], -a.priority, a.model))

    unschedulable: dict[str, Unschedulable] = {} if base is None else {u.model: u for u in base.unschedulable}
    reason_context = ReasonContext(nodes, problem.class_of_node, free_gpu, free_host, free_time)
    for i in indices:
        unschedulable.pop(models[i].name, None)
        if assignment[i] is None and models[i].wanted:
            preemptor = preempted_by.get(i)
            was = problem.current.get(models[i].name)
            if preemptor is None and was is not None and was.is_running and was.node in problem.node_index:
                # The exact solver does not say who displaced whom: name the most important newcomer.
                gainers = _gainers_on(problem, problem.node_index[was.node], assignment)
                if gainers and models[gainers[0]].priority > models[i].priority:
                    preemptor = gainers[0]
            preempted_for = (
                (models[preemptor].name, models[preemptor].priority) if preemptor is not None else None
            )
            unschedulable[models[i].name] = unschedulable_reason(
                i, models[i], reason_context, problem.tables, preempted_for
            )
    objective = sum(a.full_score for a in assignment if a is not None)
    return Plan(
        placements=dict(sorted(placements.items())),
        actions=tuple(actions),
        unschedulable=tuple(unschedulable[name] for name in sorted(unschedulable)),
        cached=tuple(cached[name] for name in sorted(cached)),
        solver=solver,
        objective=objective,
        upper_bound=max(upper_bound, objective),
        optimality_gap=max(0.0, gap),
        solve_seconds=solve_seconds,
        planned_at_seconds=now,
        notes=tuple(notes),
    )


def describe_placement(problem: PlanningProblem, model_index: int, a: Assignment) -> PlannedPlacement:
    """The placement with the predictions status shows."""
    model = problem.models[model_index]
    node = problem.nodes[a.node]
    predictor = problem.predictor
    rate = predictor.decode_tokens_per_second(model, node, a.resident_fraction, a.mode)
    slo = model.min_decode_tokens_per_second
    return PlannedPlacement(
        model=model.name,
        node=node.name,
        resident_fraction=a.resident_fraction,
        mode=a.mode,
        gpu_bytes=a.gpu_bytes,
        host_bytes=a.host_bytes,
        # Rounded: the vectorised tables and the scalar predictor may differ in the last bit.
        gpu_busy_fraction=round(a.busy, 9),
        predicted_decode_tokens_per_second=rate,
        predicted_throughput_tokens_per_second=rate * model.max_batch,
        predicted_prefill_tokens_per_second=predictor.prefill_tokens_per_second(
            model, node, a.resident_fraction, a.mode
        ),
        meets_slo=slo is None or rate >= slo - 1e-9,
    )


def _gainers_on(
    problem: PlanningProblem, node_index: int, assignment: Sequence[Assignment | None]
) -> list[int]:
    """Models that get more GPU memory on a node in this plan than they have now (highest priority first)."""
    node_name = problem.nodes[node_index].name
    gainers = []
    for i, a in enumerate(assignment):
        if a is None or a.node != node_index:
            continue
        now = problem.current.get(problem.models[i].name)
        if (
            now is None
            or not now.is_running
            or now.node != node_name
            or a.resident_fraction > now.resident_fraction
        ):
            gainers.append(i)
    gainers.sort(key=lambda i: (-problem.models[i].priority, problem.models[i].name))
    return gainers


def _for_whom(problem: PlanningProblem, node_name: str, assignment: Sequence[Assignment | None]) -> str:
    node_index = problem.node_index.get(node_name)
    if node_index is None:
        return ""
    gainers = _gainers_on(problem, node_index, assignment)[:3]
    if not gainers:
        return ""
    names = ", ".join(f"{problem.models[i].name} (priority {problem.models[i].priority})" for i in gainers)
    return f" to make room for {names}"


def model_actions(
    problem: PlanningProblem,
    model_index: int,
    assignment: Sequence[Assignment | None],
    cached: dict[str, CachedModel],
) -> list[Action]:
    """The steps that take one model from its current state to its planned one."""
    model = problem.models[model_index]
    now = problem.current.get(model.name)
    target = assignment[model_index]
    nodes = problem.node_by_name
    actions: list[Action] = []

    def emit(kind: ActionKind, cost: TransitionCost, reason: str, **fields: object) -> None:
        actions.append(
            Action(
                kind=kind,
                model=model.name,
                reason=reason,
                bytes_moved=cost.bytes_moved,
                predicted_seconds=cost.seconds,
                priority=model.priority,
                **fields,  # type: ignore[arg-type]
            )
        )

    known_node = now is not None and now.node in nodes
    if target is None:
        if now is None:
            return actions
        if not known_node:
            emit(
                "evict",
                evict_cost(),
                f"its node {now.node} is gone",
                from_node=now.node,
                from_resident_fraction=now.resident_fraction,
            )
            return actions
        from_node = nodes[now.node]
        why = _why_not_running(problem, model, from_node, assignment)
        if now.is_running:
            if model.name in cached:
                emit(
                    "preempt",
                    preempt_cost(model, from_node, now.kv_cache_bytes),
                    f"preempt{why}; weights and KV cache stay in host memory",
                    from_node=now.node,
                    from_resident_fraction=now.resident_fraction,
                    mode=now.mode,
                )
            else:
                emit(
                    "evict",
                    evict_cost(),
                    f"evict{why}; no host memory to keep it cached",
                    from_node=now.node,
                    from_resident_fraction=now.resident_fraction,
                    mode=now.mode,
                )
        elif model.name not in cached:
            emit(
                "evict",
                evict_cost(),
                f"drop host cache on {now.node}: host memory is needed",
                from_node=now.node,
            )
        return actions

    to_node = problem.nodes[target.node]
    kind, cost = transition(
        model, now if known_node else None, nodes, to_node, target.resident_fraction, target.mode
    )
    if kind is None:
        return actions
    rate = problem.predictor.decode_tokens_per_second(model, to_node, target.resident_fraction, target.mode)
    prediction = f"predicted {rate:.1f} tok/s, {slo_text(model)}"
    common: dict[str, object] = {
        "to_node": to_node.name,
        "to_resident_fraction": target.resident_fraction,
        "mode": target.mode,
    }
    if now is not None and known_node:
        common["from_node"] = now.node
        common["from_resident_fraction"] = now.resident_fraction
    where = f"on {to_node.name} at {percent(target.resident_fraction)} resident ({target.mode})"
    if kind == "load":
        if now is not None and known_node and now.state == "preempted":
            emit(
                "evict",
                evict_cost(),
                f"drop host cache on {now.node}: loading on {to_node.name} instead",
                from_node=now.node,
            )
            common.pop("from_node", None)
            common["from_resident_fraction"] = 0.0
        emit("load", cost, f"load {where}: {prediction}", **common)
    elif kind == "resume":
        emit("resume", cost, f"resume {where} from the host cache: {prediction}", **common)
    elif kind == "migrate":
        assert now is not None
        from_node = nodes[now.node]
        why = "it is cordoned or disrupting" if not from_node.accepts_work else "a better placement is there"
        emit("migrate", cost, f"migrate {now.node} → {where}: {why}; {prediction}", **common)
    elif kind == "promote":
        assert now is not None
        emit(
            "promote",
            cost,
            f"promote {percent(now.resident_fraction)} → {percent(target.resident_fraction)} "
            f"on {to_node.name}: free memory raises its rate; {prediction}",
            **common,
        )
    elif kind == "demote":
        assert now is not None
        for_whom = _for_whom(problem, now.node, assignment) or " as the memory serves more elsewhere"
        emit(
            "demote",
            cost,
            f"demote {percent(now.resident_fraction)} → {percent(target.resident_fraction)} "
            f"on {to_node.name}{for_whom}; {prediction}",
            **common,
        )
    else:
        emit(
            "reconfigure",
            cost,
            f"run offloaded layers in {target.mode} mode on {to_node.name}: {prediction}",
            **common,
        )
    return actions


def _why_not_running(
    problem: PlanningProblem, model: ModelDemand, node: NodeCapacity, assignment: Sequence[Assignment | None]
) -> str:
    if not model.wanted:
        return ": the model is no longer wanted"
    if not node.accepts_work:
        return f": {node.name} is cordoned or disrupting and no other node has room"
    for_whom = _for_whom(problem, node.name, assignment)
    return for_whom or ": no room meets its SLO"


def load_seconds_estimate(model: ModelDemand, node: NodeCapacity, resident_fraction: float) -> float:
    """Predicted cold-load seconds, for status (``timings.loadSeconds`` before one is measured)."""
    return load_cost(model, node, resident_fraction).seconds
