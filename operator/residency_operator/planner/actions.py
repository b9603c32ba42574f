"""The plan's ordered steps: from the solvers' assignment to placements, reasons and actions (steps that
free memory before steps that take it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from residency_operator.planner.costs import (
    TransitionCost,
    evict_cost,
    load_cost,
    preempt_cost,
)
from residency_operator.planner.fill import NodeRoom, node_room
from residency_operator.planner.greedy_state import Assignment
from residency_operator.planner.options import (
    cached_host_bytes,
    transition,
)
from residency_operator.planner.ordering import footprint_now, footprint_planned, order_by_room
from residency_operator.planner.problem import PlanningProblem
from residency_operator.planner.reasons import ReasonContext, percent, slo_text, unschedulable_reasons
from residency_operator.planner.types import (
    Action,
    ActionKind,
    CachedModel,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannedPlacement,
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
    room: NodeRoom | None = None,
    objective: float | None = None,
    models_on_node: Sequence[set[int]] | None = None,
) -> Plan:
    """Build placements, host caches, ordered actions and reasons from per-model assignments.

    With ``only_models`` and ``base`` (the incremental path), only those models are re-described and
    everything else is taken from ``base``. The incremental caller also passes what it keeps current
    anyway — each node's free room, the objective, the models on each node — so that nothing here
    costs time in proportion to the number of models.
    """
    models, nodes = problem.models, problem.nodes
    if room is None:
        room = node_room(problem, assignment)
    free_gpu, free_host, free_time = list(room[0]), list(room[1]), list(room[2])
    indices = list(range(len(models))) if only_models is None else sorted(set(only_models))
    placements: dict[str, PlannedPlacement] = {} if base is None else dict(base.placements)
    added = False
    for i in indices:
        a = assignment[i]
        if a is None:
            placements.pop(models[i].name, None)
        else:
            added = added or models[i].name not in placements
            placements[models[i].name] = describe_placement(problem, i, a)
    if base is None or added:
        placements = dict(sorted(placements.items()))

    # Preempted models keep weights and KV pinned in host memory while it fits, most important first.
    cached: dict[str, CachedModel] = {} if base is None else {c.model: c for c in base.cached}
    for i in indices:
        cached.pop(models[i].name, None)
    for kept in cached.values():
        free_host[problem.node_index[kept.node]] -= kept.host_bytes
    # A pinned model's host copy had its room set aside before solving (``PlanningProblem``): it is kept
    # first, out of that room, so such a model never leaves host memory.
    for name, (node_name, aside) in problem.host_set_aside.items():
        if assignment[problem.model_index[name]] is None:
            free_host[problem.node_index[node_name]] += aside
    cache_candidates = [
        i
        for i in indices
        if assignment[i] is None
        and models[i].wanted
        and problem.config.keep_preempted_cache
        and (now_placement := problem.current.get(models[i].name)) is not None
        and now_placement.node in problem.node_index
    ]
    cache_candidates.sort(
        key=lambda i: (models[i].name not in problem.host_set_aside, -models[i].priority, models[i].name)
    )
    for i in cache_candidates:
        now_placement = problem.current[models[i].name]
        node = problem.node_index[now_placement.node]
        need = cached_host_bytes(models[i], now_placement.kv_cache_bytes)
        if nodes[node].accepts_work and free_host[node] >= need:
            free_host[node] -= need
            cached[models[i].name] = CachedModel(models[i].name, now_placement.node, need)

    # Incrementally, the base plan is taken as applied: only the re-planned models get actions.
    gainers = Gainers(problem, assignment, models_on_node)
    actions: list[Action] = []
    for i in indices:
        actions.extend(model_actions(problem, i, assignment, cached, gainers, placements.get(models[i].name)))
    actions.sort(key=lambda a: (ACTION_ORDER[a.kind], -a.priority, a.model))
    acting = {a.model for a in actions}

    def drop_cache(name: str) -> list[Action]:
        """The model's actions once it keeps no host cache (evicted: no step over-commits host memory)."""
        kept = cached.pop(name)
        free_host[problem.node_index[kept.node]] += kept.host_bytes
        return model_actions(problem, problem.model_index[name], assignment, cached, gainers, None)

    actions, _ = order_by_room(
        actions,
        {
            name: footprint_now(
                models[problem.model_index[name]], problem.current.get(name), problem.node_index
            )
            for name in acting
        },
        {
            name: footprint_planned(placements.get(name), cached.get(name), problem.node_index)
            for name in acting
        },
        nodes,
        free_gpu,
        free_host,
        caches=CacheView(cached, problem.node_index),
        drop_cache=drop_cache,
    )

    unschedulable: dict[str, Unschedulable] = {} if base is None else {u.model: u for u in base.unschedulable}
    cases: list[tuple[int, ModelDemand, tuple[str, int] | None]] = []
    for i in indices:
        if assignment[i] is not None or not models[i].wanted:
            unschedulable.pop(models[i].name, None)
        else:
            preemptor = preempted_by.get(i)
            was = problem.current.get(models[i].name)
            if preemptor is None and was is not None and was.is_running and was.node in problem.node_index:
                # The exact solver does not say who displaced whom: name the most important newcomer.
                on_node = gainers.on(problem.node_index[was.node])
                if on_node and models[on_node[0]].priority > models[i].priority:
                    preemptor = on_node[0]
            preempted_for = (
                (models[preemptor].name, models[preemptor].declared_priority)
                if preemptor is not None
                else None
            )
            cases.append((i, models[i], preempted_for))
    unschedulable_added = base is None
    if cases:
        reason_context = ReasonContext(nodes, problem.class_of_node, free_gpu, free_host, free_time)
        for reason in unschedulable_reasons(cases, reason_context, problem.tables):
            unschedulable_added = unschedulable_added or reason.model not in unschedulable
            unschedulable[reason.model] = reason
    if objective is None:
        objective = sum(a.full_score for a in assignment if a is not None)
    return Plan(
        placements=placements,
        actions=tuple(actions),
        # Sorted by model; a base plan's order holds while no model was added.
        unschedulable=tuple(
            unschedulable[name] for name in (sorted(unschedulable) if unschedulable_added else unschedulable)
        ),
        cached=tuple(cached[name] for name in sorted(cached)),
        solver=solver,
        objective=objective,
        upper_bound=max(upper_bound, objective),
        optimality_gap=max(0.0, gap),
        solve_seconds=solve_seconds,
        planned_at_seconds=now,
        notes=tuple(notes),
    )


class CacheView(Mapping[str, tuple[int, int]]):
    """The plan's host caches as the step order reads them (name -> (node index, host bytes)), without
    copying them: the order looks at them only where no step fits."""

    def __init__(self, cached: dict[str, CachedModel], node_index: Mapping[str, int]) -> None:
        self._cached = cached
        self._node_index = node_index

    def __getitem__(self, name: str) -> tuple[int, int]:
        kept = self._cached[name]
        return self._node_index[kept.node], kept.host_bytes

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._cached))

    def __len__(self) -> int:
        return len(self._cached)


def describe_placement(problem: PlanningProblem, model_index: int, a: Assignment) -> PlannedPlacement:
    """The placement with the predictions status shows."""
    model = problem.models[model_index]
    rate, prefill = problem.rates(model, a.node, a.resident_fraction, a.mode)
    slo = model.min_decode_tokens_per_second
    return PlannedPlacement(
        model=model.name,
        node=problem.nodes[a.node].name,
        resident_fraction=a.resident_fraction,
        mode=a.mode,
        gpu_bytes=a.gpu_bytes,
        host_bytes=a.host_bytes,
        # Rounded: the vectorised tables and the scalar predictor may differ in the last bit.
        gpu_busy_fraction=round(a.busy, 9),
        predicted_decode_tokens_per_second=rate,
        predicted_throughput_tokens_per_second=rate * model.max_batch,
        predicted_prefill_tokens_per_second=prefill,
        meets_slo=slo is None or rate >= slo - 1e-9,
        prediction_source=problem.predictor.source(model, problem.nodes[a.node], a.mode),
        observed_ratio=problem.predictor.observed_ratio(model, problem.nodes[a.node]),
    )


class Gainers:
    """Per node, the models that get more GPU memory there in this plan than they have now (highest
    priority first): who a demotion or preemption on that node makes room for. Computed once per plan."""

    def __init__(
        self,
        problem: PlanningProblem,
        assignment: Sequence[Assignment | None],
        models_on_node: Sequence[set[int]] | None = None,
    ) -> None:
        self.problem = problem
        self.assignment = assignment
        self.models_on_node = models_on_node
        self._by_node: dict[int, list[int]] = {}
        self._indexed = False

    def _gains(self, i: int, a: Assignment) -> bool:
        problem = self.problem
        now = problem.current.get(problem.models[i].name)
        return (
            now is None
            or not now.is_running
            or now.node != problem.nodes[a.node].name
            or a.resident_fraction > now.resident_fraction
        )

    def _sorted(self, members: list[int]) -> list[int]:
        models = self.problem.models
        return sorted(members, key=lambda i: (-models[i].priority, models[i].name))

    def on(self, node_index: int) -> list[int]:
        """Gainers on one node."""
        if self.models_on_node is not None:
            # The caller knows which models are on each node: look at those only.
            found = self._by_node.get(node_index)
            if found is None:
                found = self._sorted(
                    [
                        i
                        for i in self.models_on_node[node_index]
                        if (a := self.assignment[i]) is not None
                        and a.node == node_index
                        and self._gains(i, a)
                    ]
                )
                self._by_node[node_index] = found
            return found
        if not self._indexed:
            by_node: dict[int, list[int]] = {}
            for i, a in enumerate(self.assignment):
                if a is not None and self._gains(i, a):
                    by_node.setdefault(a.node, []).append(i)
            self._by_node = {node: self._sorted(members) for node, members in by_node.items()}
            self._indexed = True
        return self._by_node.get(node_index, [])

    def for_whom(self, node_name: str, at_least_priority: int | None = None) -> str:
        """`` to make room for a (priority 100), b (priority 50)`` or nothing. ``at_least_priority``: name
        only gainers of that priority or higher (a model is never preempted for a lower one, so a lower
        gainer is not why)."""
        node_index = self.problem.node_index.get(node_name)
        if node_index is None:
            return ""
        gainers = [
            i
            for i in self.on(node_index)
            if at_least_priority is None or self.problem.models[i].priority >= at_least_priority
        ][:3]
        if not gainers:
            return ""
        models = self.problem.models
        names = ", ".join(f"{models[i].name} (priority {models[i].declared_priority})" for i in gainers)
        return f" to make room for {names}"


def model_actions(
    problem: PlanningProblem,
    model_index: int,
    assignment: Sequence[Assignment | None],
    cached: dict[str, CachedModel],
    gainers: Gainers | None = None,
    placement: PlannedPlacement | None = None,
) -> list[Action]:
    """The steps that take one model from its current state to its planned one (``placement``: its
    described target, to reuse the predicted rate)."""
    model = problem.models[model_index]
    now = problem.current.get(model.name)
    target = assignment[model_index]
    if now is None:
        # The common cases at scale, without the general machinery: nothing to do, or a cold load.
        if target is None:
            return []
        to_node = problem.nodes[target.node]
        cost = load_cost(model, to_node, target.resident_fraction)
        rate = (
            placement.predicted_decode_tokens_per_second
            if placement is not None
            else problem.predictor.decode_tokens_per_second(
                model, to_node, target.resident_fraction, target.mode
            )
        )
        return [
            Action(
                kind="load",
                model=model.name,
                reason=f"load on {to_node.name} at {percent(target.resident_fraction)} resident "
                f"({target.mode}): predicted {rate:.1f} tok/s, {slo_text(model)}",
                to_node=to_node.name,
                to_resident_fraction=target.resident_fraction,
                mode=target.mode,
                bytes_moved=cost.bytes_moved,
                predicted_seconds=cost.seconds,
                priority=model.priority,
            )
        ]
    gainers = gainers or Gainers(problem, assignment)
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
        why = _why_not_running(model, from_node, gainers)
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
    rate = (
        placement.predicted_decode_tokens_per_second
        if placement is not None
        else problem.predictor.decode_tokens_per_second(model, to_node, target.resident_fraction, target.mode)
    )
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
        for_whom = gainers.for_whom(now.node) or " as the memory serves more elsewhere"
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


def _why_not_running(model: ModelDemand, node: NodeCapacity, gainers: Gainers) -> str:
    if not model.wanted:
        return ": the model is no longer wanted"
    if not node.accepts_work:
        return f": {node.name} is cordoned or disrupting and no other node has room"
    for_whom = gainers.for_whom(node.name, at_least_priority=model.priority)
    return for_whom or ": no room meets its SLO"


def load_seconds_estimate(model: ModelDemand, node: NodeCapacity, resident_fraction: float) -> float:
    """Predicted cold-load seconds, for status (``timings.loadSeconds`` before one is measured)."""
    return load_cost(model, node, resident_fraction).seconds
