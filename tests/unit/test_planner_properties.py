"""Property tests of ``plan()``: every plan respects capacity, the spec and priorities, and is stable."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residency_operator.planner import (
    GIB,
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannerConfig,
    plan,
)
from residency_operator.planner.options import (
    cached_host_bytes,
    evaluate_option,
    gpu_bytes_needed,
    host_bytes_needed,
    usable_gpu_bytes,
    usable_host_bytes,
)
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.problem import PlanningProblem

SOLVERS = ("milp", "greedy")
PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # CI draws the same examples on every run, so that a landing does not hang on a random draw; a local
    # run draws new ones each time, and is where rare failures are found (and then fixed or recorded).
    derandomize=os.environ.get("CI") == "true",
)


@st.composite
def nodes_strategy(draw: st.DrawFn) -> list[NodeCapacity]:
    count = draw(st.integers(1, 3))
    nodes = []
    for i in range(count):
        nodes.append(
            NodeCapacity(
                name=f"node-{i}",
                gpu_type=draw(st.sampled_from(["H100", "L4"])),
                gpu_memory_bytes=draw(st.sampled_from([16, 24, 48, 80])) * GIB,
                host_memory_bytes=draw(st.sampled_from([16, 64, 256])) * GIB,
                host_to_device_gbps=draw(st.sampled_from([6.0, 25.0, 50.0])),
                hbm_gbps=draw(st.sampled_from([300.0, 2000.0])),
                host_memory_gbps=draw(st.sampled_from([25.0, 100.0])),
                cordoned=draw(st.booleans()) if i > 0 else False,
                disrupting=draw(st.sampled_from([False, False, False, True])) if i > 0 else False,
            )
        )
    return nodes


@st.composite
def models_strategy(draw: st.DrawFn) -> list[ModelDemand]:
    count = draw(st.integers(1, 6))
    models = []
    for i in range(count):
        models.append(
            ModelDemand(
                name=f"ns/model-{i}",
                weight_bytes=int(draw(st.sampled_from([1, 3, 8, 16, 30])) * 1e9),
                kv_bytes_per_token=draw(st.sampled_from([0, 32768, 131072])),
                max_sequence_length=2048,
                max_batch=draw(st.sampled_from([1, 4])),
                priority=draw(st.sampled_from([0, 10, 100])),
                preemptible=draw(st.booleans()),
                min_decode_tokens_per_second=draw(st.sampled_from([None, 5.0, 20.0])),
                max_offload_fraction=draw(st.sampled_from([0.0, 0.5, 0.9])),
                demand_decode_tokens_per_second=draw(st.sampled_from([None, 0.0, 10.0, 100.0])),
                allowed_modes=draw(st.sampled_from([("stream", "cpu"), ("stream",)])),
            )
        )
    return models


def assert_plan_valid(
    planned: Plan,
    models: list[ModelDemand],
    nodes: list[NodeCapacity],
    config: PlannerConfig,
    busy_limit: float | None = None,
    *,
    current: Sequence[CurrentPlacement],
) -> None:
    """Capacity, spec and placement rules every plan must keep.

    ``busy_limit``: the share of a GPU's time its models may be predicted to keep it busy; the planning
    target by default. Models already running may use all of it (the planner moves them only when their
    estimated demand exceeds the whole GPU), so plans made over a running cluster are checked with 1.0.
    ``current``: what ran when the plan was made (which idle ``preemptible: false`` models may leave the
    GPU depends on it: ``as_planned``).
    """
    busy_limit = config.max_gpu_busy_fraction if busy_limit is None else busy_limit
    # The exact solver never falls back to the greedy on these small inputs (a fallback would hide its
    # infeasible formulations from every other check here).
    assert config.solver != "milp" or planned.solver == "milp", planned.notes
    by_model = as_planned(models, nodes, current, config)
    by_node = {n.name: n for n in nodes}
    predictor = Predictor()
    gpu_used: dict[str, int] = defaultdict(int)
    host_used: dict[str, int] = defaultdict(int)
    busy_used: dict[str, float] = defaultdict(float)
    for placement in planned.placements.values():
        model = by_model[placement.model]
        node = by_node[placement.node]
        assert node.accepts_work, f"{placement.model} placed on cordoned/disrupting {node.name}"
        assert model.wanted
        assert placement.resident_fraction >= model.min_resident_fraction - 1e-9, "offload.maxFraction broken"
        assert placement.mode in model.allowed_modes
        option = evaluate_option(predictor, model, node, placement.resident_fraction, placement.mode, config)
        # only a running preemptible:false model stays below its SLO (its node's rate fell), never a new one
        assert option.meets_slo or not model.preemptible, f"{placement.model} placed below its SLO"
        assert placement.gpu_bytes == option.gpu_bytes
        gpu_used[node.name] += option.gpu_bytes
        host_used[node.name] += option.host_bytes
        busy_used[node.name] += option.busy_fraction
    busy_of = {
        p.model: evaluate_option(
            predictor, by_model[p.model], by_node[p.node], p.resident_fraction, p.mode, config
        ).busy_fraction
        for p in planned.placements.values()
    }
    for placement in planned.placements.values():
        model = by_model[placement.model]
        node = by_node[placement.node]
        mine = evaluate_option(predictor, model, node, placement.resident_fraction, placement.mode, config)
        # A pinned (preemptible: false) model's time may crowd a model of higher priority, which the planner
        # keeps rather than preempt for a lower priority; a pinned model's SLO never bars a higher one; and
        # two pinned models of one priority that crowd each other (a demand grew) both stay: neither may be
        # preempted or moved for GPU time, so no plan could keep both SLOs.
        others = sum(
            busy_of[other.model]
            for other in planned.placements.values()
            if other.node == placement.node
            and other.model != placement.model
            and not (
                not by_model[other.model].preemptible
                and (
                    by_model[other.model].priority < model.priority
                    or (not model.preemptible and by_model[other.model].priority == model.priority)
                )
            )
            and not (not model.preemptible and by_model[other.model].priority > model.priority)
        )
        assert others <= mine.tolerance + 1e-6, f"{placement.model} would miss its SLO sharing {node.name}"
    for cached in planned.cached:
        assert cached.model not in planned.placements
        host_used[cached.node] += cached.host_bytes
    for node in nodes:
        assert gpu_used[node.name] <= usable_gpu_bytes(node), f"GPU over-committed on {node.name}"
        assert host_used[node.name] <= usable_host_bytes(node), f"host over-committed on {node.name}"
        # Pinned models, and models of a higher priority than a pinned one beside them, stay whatever
        # their time (an estimate): the rest of the node's models fit in its time.
        pinned_here = [
            by_model[p.model].priority
            for p in planned.placements.values()
            if p.node == node.name and not by_model[p.model].preemptible
        ]
        lowest_pinned = min(pinned_here, default=None)
        free_to_go = sum(
            busy_of[p.model]
            for p in planned.placements.values()
            if p.node == node.name
            and by_model[p.model].preemptible
            and (lowest_pinned is None or by_model[p.model].priority <= lowest_pinned)
        )
        assert free_to_go <= busy_limit + 1e-6, f"GPU time over-committed on {node.name}"
    placed_or_reasoned = set(planned.placements) | {u.model for u in planned.unschedulable}
    assert placed_or_reasoned == {m.name for m in models if m.wanted}
    for unschedulable in planned.unschedulable:
        assert unschedulable.message and unschedulable.reason[0].isupper()


def as_planned(
    models: list[ModelDemand],
    nodes: list[NodeCapacity],
    current: Sequence[CurrentPlacement],
    config: PlannerConfig,
) -> dict[str, ModelDemand]:
    """The models as the solvers see them (``PlanningProblem``): backlog counted, idle ones' priorities
    yielded, and an idle ``preemptible: false`` one planned as preemptible with its host copy kept only where
    it runs and its node's host memory holds that copy; where it cannot (or it does not run yet) it keeps
    its GPU and is planned pinned, at its yielded priority (docs/planner.md, guarantee 2). Taken from the
    planner rather than restated here: a restatement that missed that last case judged such a model by the
    rules of a preemptible one (issue 26)."""
    problem = PlanningProblem(models, nodes, current, (), config)
    return {m.name: m for m in problem.models}


def idle_by_contract(model: ModelDemand, config: PlannerConfig) -> bool:
    """Idle as docs/planner.md defines it: it has served, no request waits for it, and its demand is known
    and at most the idle threshold (unknown demand is never idle)."""
    demand = model.demand_decode_tokens_per_second
    return (
        model.has_served
        and model.waiting_requests == 0
        and demand is not None
        and demand <= config.idle_demand_tokens_per_second
    )


def applied(planned: Plan) -> list[CurrentPlacement]:
    """The cluster state after a plan has been carried out."""
    state = [
        CurrentPlacement(p.model, p.node, p.resident_fraction, p.mode, "loaded")
        for p in planned.placements.values()
    ]
    state += [CurrentPlacement(c.model, c.node, 0.0, "stream", "preempted") for c in planned.cached]
    return state


@PROPERTY_SETTINGS
@given(models=models_strategy(), nodes=nodes_strategy(), solver=st.sampled_from(SOLVERS))
def test_plan_never_overcommits_and_respects_spec(
    models: list[ModelDemand], nodes: list[NodeCapacity], solver: str
) -> None:
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    planned = plan(models, nodes, [], config=config)
    assert_plan_valid(planned, models, nodes, config, current=[])
    assert 0.0 <= planned.optimality_gap <= 1.0
    assert planned.objective <= planned.upper_bound + 1e-6


def assert_every_step_fits(
    planned: Plan, models: list[ModelDemand], nodes: list[NodeCapacity], current: list[CurrentPlacement]
) -> None:
    """Carried out in order, no action takes GPU or host memory an earlier one has not freed (a step that
    adds nothing to a node never counts against it, so a cluster that starts over-full may still act)."""
    by_model = {m.name: m for m in models}
    by_node = {n.name: n for n in nodes}
    cached = {c.model: c for c in planned.cached}
    held: dict[str, list[tuple[str, int, int]]] = {}
    for c in current:
        model = by_model[c.model]
        if c.is_running:
            held[c.model] = [
                (
                    c.node,
                    gpu_bytes_needed(model, c.resident_fraction, c.mode),
                    host_bytes_needed(model, c.resident_fraction),
                )
            ]
        elif c.state == "preempted":
            held[c.model] = [(c.node, 0, cached_host_bytes(model, c.kv_cache_bytes))]

    def used(node: str) -> tuple[int, int]:
        parts = [(g, h) for pieces in held.values() for n, g, h in pieces if n == node]
        return sum(g for g, _ in parts), sum(h for _, h in parts)

    moved: set[str] = set()
    for k, action in enumerate(planned.actions):
        if action.model in moved:
            continue  # a model's later steps complete the move its first one made
        before = {n.name: used(n.name) for n in nodes}
        placement, kept = planned.placements.get(action.model), cached.get(action.model)
        if action.kind == "evict" and any(a.model == action.model for a in planned.actions[k + 1 :]):
            held[action.model] = []  # it leaves first; a later step places it
        else:
            moved.add(action.model)
            held[action.model] = [
                *([(placement.node, placement.gpu_bytes, placement.host_bytes)] if placement else []),
                *([(kept.node, 0, kept.host_bytes)] if kept else []),
            ]
        for name, (gpu_before, host_before) in before.items():
            gpu, host = used(name)
            assert gpu <= gpu_before or gpu <= usable_gpu_bytes(by_node[name]), (
                f"after {action.kind} {action.model}: GPU over-committed on {name}"
            )
            assert host <= host_before or host <= usable_host_bytes(by_node[name]), (
                f"after {action.kind} {action.model}: host over-committed on {name}"
            )


@PROPERTY_SETTINGS
@given(models=models_strategy(), nodes=nodes_strategy(), solver=st.sampled_from(SOLVERS), seed=st.randoms())
def test_plan_is_deterministic_and_order_independent(
    models: list[ModelDemand], nodes: list[NodeCapacity], solver: str, seed: object
) -> None:
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    first = plan(models, nodes, [], config=config)
    shuffled_models, shuffled_nodes = list(models), list(nodes)
    seed.shuffle(shuffled_models)  # type: ignore[attr-defined]
    seed.shuffle(shuffled_nodes)  # type: ignore[attr-defined]
    second = plan(shuffled_models, shuffled_nodes, [], config=config)
    assert first.placements == second.placements
    assert first.actions == second.actions
    assert first.unschedulable == second.unschedulable


@PROPERTY_SETTINGS
@given(models=models_strategy(), nodes=nodes_strategy(), solver=st.sampled_from(SOLVERS))
def test_optimal_state_is_a_fixed_point(
    models: list[ModelDemand], nodes: list[NodeCapacity], solver: str
) -> None:
    """Re-planning right after a plan was carried out asks for nothing (idempotent, no thrashing)."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    first = plan(models, nodes, [], config=config)
    second = plan(models, nodes, applied(first), config=config)
    assert second.actions == (), [(a.kind, a.model, a.reason) for a in second.actions]
    assert second.placements == first.placements


@PROPERTY_SETTINGS
@given(
    models=models_strategy(),
    newcomers=models_strategy(),
    nodes=nodes_strategy(),
    solver=st.sampled_from(SOLVERS),
)
def test_no_priority_inversion_and_non_preemptible_kept(
    models: list[ModelDemand], newcomers: list[ModelDemand], nodes: list[NodeCapacity], solver: str
) -> None:
    """When new models arrive, a running model is only preempted if models of at least its priority need
    its room, and a non-preemptible running model is never preempted."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    first = plan(models, nodes, [], config=config)
    arrivals = [dataclasses.replace(m, name=m.name.replace("ns/", "new/")) for m in newcomers]
    everyone = models + arrivals
    second = plan(everyone, nodes, applied(first), config=config)
    assert_plan_valid(second, everyone, nodes, config, current=applied(first))
    assert_every_step_fits(second, everyone, nodes, applied(first))
    # Priorities as the planner orders them: an idle model yields to busy ones (planner/demand.py).
    by_model = as_planned(everyone, nodes, applied(first), config)
    declared = {m.name: m for m in everyone}
    by_node = {n.name: n for n in nodes}
    predictor = Predictor()
    cached = {c.model: c.node for c in second.cached}
    for name, before in first.placements.items():
        if name in second.placements:
            continue
        model = by_model[name]
        assert model.preemptible, f"non-preemptible {name} was preempted"
        # A preemptible:false model leaves the GPU only while idle, and never host memory (docs/planner.md);
        # stated from the spec here, not from the planner's view above.
        if not declared[name].preemptible:
            assert idle_by_contract(declared[name], config), f"busy pinned {name} was preempted"
            assert cached.get(name) == before.node, f"pinned {name} lost its host copy"
            # ... and not to a pinned model of a lower priority: placed, that one is never moved to give the
            # room back when this one's demand returns (guarantee 3 would break)
            below = [
                p.model
                for p in second.placements.values()
                if p.node == before.node
                and not declared[p.model].preemptible
                and declared[p.model].priority < declared[name].priority
                and ((was := first.placements.get(p.model)) is None or was.node != p.node)
            ]
            assert not below, f"pinned {name} left its GPU to pinned {below} of a lower priority"
        node = by_node[before.node]
        # Room its own node keeps for models of at least its priority, and for the non-preemptible models
        # that ran there already (they cannot be moved, whatever their priority), without it.
        kept = [
            evaluate_option(
                predictor, by_model[other.model], node, other.resident_fraction, other.mode, config
            )
            for other in second.placements.values()
            if other.node == node.name
            and (
                by_model[other.model].priority >= model.priority
                or (
                    not by_model[other.model].preemptible
                    and (earlier := first.placements.get(other.model)) is not None
                    and earlier.node == node.name
                )
            )
        ]
        mine = evaluate_option(predictor, model, node, before.resident_fraction, before.mode, config)
        together = [*kept, mine]
        busy = sum(o.busy_fraction for o in together)
        fits = (
            sum(o.gpu_bytes for o in together) <= usable_gpu_bytes(node)
            and sum(o.host_bytes for o in together) <= usable_host_bytes(node)
            and busy <= config.max_gpu_busy_fraction + 1e-9
            and all(busy - o.busy_fraction <= o.tolerance + 1e-9 for o in together)
        )
        assert not fits, (
            f"{name} (priority {model.priority}) preempted although its place was free of higher tiers"
        )


def test_cached_models_fit_host_memory() -> None:
    node = NodeCapacity("n", "L4", 24 * GIB, 40 * GIB, 25.0, 300.0, 50.0)
    small = ModelDemand("ns/a", weight_bytes=int(16e9), kv_bytes_per_token=0, priority=0)
    big = ModelDemand("ns/b", weight_bytes=int(16e9), kv_bytes_per_token=0, priority=100, preemptible=False)
    current = [CurrentPlacement("ns/a", "n", 1.0, "stream", "loaded")]
    planned = plan([small, big], [node], current)
    assert "ns/b" in planned.placements and "ns/a" not in planned.placements
    assert [c.model for c in planned.cached] == ["ns/a"]
    assert sum(c.host_bytes for c in planned.cached) == cached_host_bytes(small, 0)
