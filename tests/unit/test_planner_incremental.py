"""The incremental planner against full re-plans: same first plan, valid plans after every change, and
a re-plan after one change that is as good as re-planning everything from the same state."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner_properties import applied, assert_plan_valid, models_strategy, nodes_strategy

from residency_operator.planner import (
    GIB,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannerConfig,
    plan,
)
from residency_operator.planner.incremental import IncrementalPlanner
from residency_operator.planner.options import evaluate_option
from residency_operator.planner.predictor import Predictor

GREEDY = PlannerConfig(solver="greedy", repack_rounds=0)
"""The incremental planner is the greedy kept current; it does not repack (planner/repack.py), so it is
compared with full greedy plans that do not either (the next full plan repacks)."""
INCREMENTAL_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def plan_value(planned: Plan, models: list[ModelDemand], nodes: list[NodeCapacity]) -> float:
    """What a plan is worth regardless of how the cluster got there: the planner's value of every
    placement (served throughput, availability, tie-breaks) without transition costs or hysteresis,
    which depend on the state a plan starts from."""
    by_model = {m.name: m for m in models}
    by_node = {n.name: n for n in nodes}
    predictor = Predictor()
    return sum(
        evaluate_option(
            predictor, by_model[p.model], by_node[p.node], p.resident_fraction, p.mode, GREEDY
        ).value
        for p in planned.placements.values()
    )


def converged(models: list[ModelDemand], nodes: list[NodeCapacity]) -> Plan:
    """A plan that re-planning leaves as it is (the steady state a running cluster reaches)."""
    planned = plan(models, nodes, [], config=GREEDY)
    for _ in range(8):
        again = plan(models, nodes, applied(planned), config=GREEDY)
        if not again.actions:
            return again
        planned = again
    return planned


CHANGES = ("demand", "slo", "wanted", "priority", "offload")


def changed(model: ModelDemand, kind: str, draw: random.Random) -> ModelDemand:
    if kind == "demand":
        return dataclasses.replace(
            model, demand_decode_tokens_per_second=draw.choice([None, 0.0, 1.0, 10.0, 100.0, 1000.0])
        )
    if kind == "slo":
        return dataclasses.replace(model, min_decode_tokens_per_second=draw.choice([None, 2.0, 10.0, 40.0]))
    if kind == "wanted":
        return dataclasses.replace(model, wanted=not model.wanted)
    if kind == "priority":
        return dataclasses.replace(model, priority=draw.choice([0, 10, 50, 100, 1000]))
    return dataclasses.replace(model, max_offload_fraction=draw.choice([0.0, 0.5, 0.9]))


@INCREMENTAL_SETTINGS
@given(
    models=models_strategy(),
    nodes=nodes_strategy(),
    which=st.integers(0, 5),
    kind=st.sampled_from(CHANGES),
    seed=st.integers(0, 1000),
)
def test_incremental_replan_is_no_worse_than_a_full_replan(
    models: list[ModelDemand], nodes: list[NodeCapacity], which: int, kind: str, seed: int
) -> None:
    """From a steady state, re-planning one changed model incrementally gives a valid plan worth at least
    what a full re-plan from the same state gives."""
    steady = converged(models, nodes)
    planner = IncrementalPlanner(models, nodes, applied(steady), config=GREEDY)
    assert planner.plan.placements == steady.placements and planner.plan.actions == ()
    index = which % len(models)
    after = list(models)
    after[index] = changed(models[index], kind, random.Random(seed))
    incremental = planner.update_model(after[index])
    # Models already running may use all of a GPU's time (the planner moves them only past that).
    assert_plan_valid(incremental, after, nodes, GREEDY, busy_limit=1.0, current=applied(steady))
    full = plan(after, nodes, applied(steady), config=GREEDY)
    assert plan_value(incremental, after, nodes) >= plan_value(full, after, nodes) - 1e-6 * max(
        1.0, abs(plan_value(full, after, nodes))
    )


def fleet(model_count: int, node_count: int, seed: int) -> tuple[list[ModelDemand], list[NodeCapacity]]:
    """Many small models with heavy-tailed demand on four GPU types (as the scale benchmark uses)."""
    rng = random.Random(seed)
    kinds = [
        ("H100", 80, 512, 50.0, 2000.0, 120.0),
        ("A100", 40, 256, 25.0, 1555.0, 100.0),
        ("A6000", 48, 256, 25.0, 768.0, 80.0),
        ("L4", 24, 128, 25.0, 300.0, 60.0),
    ]
    nodes = [
        NodeCapacity(
            f"node-{i:03d}",
            *kinds[i % 4][:1],
            kinds[i % 4][1] * GIB,
            kinds[i % 4][2] * GIB,
            *kinds[i % 4][3:],
        )
        for i in range(node_count)
    ]
    models = []
    for i in range(model_count):
        billions = rng.choice([0.5, 1.2, 3.2, 7.2, 8.0])
        models.append(
            ModelDemand(
                name=f"team-{i % 7}/model-{i:03d}",
                weight_bytes=int(billions * 2e9),
                kv_bytes_per_token=int(billions * 16384),
                max_batch=8,
                priority=rng.choice([0, 0, 50, 100]),
                preemptible=rng.random() > 0.1,
                min_decode_tokens_per_second=rng.choice([5.0, 10.0, 20.0]),
                max_offload_fraction=rng.choice([0.0, 0.5, 0.8]),
                demand_decode_tokens_per_second=round(rng.paretovariate(1.3), 2),
            )
        )
    return models, nodes


def test_incremental_first_plan_is_the_full_greedy_plan() -> None:
    models, nodes = fleet(120, 12, seed=3)
    planner = IncrementalPlanner(models, nodes, [], config=GREEDY)
    full = plan(models, nodes, [], config=GREEDY)
    assert planner.plan.placements == full.placements
    assert planner.plan.actions == full.actions
    assert planner.plan.unschedulable == full.unschedulable


def test_incremental_replans_of_a_larger_fleet_stay_valid_and_close_to_full_replans() -> None:
    """Sequences of changes on fleets of 60 to 200 models. A full re-plan re-examines every model, and
    some greedy limits (the make-room attempts a tier gets) are counted over the whole fleet, so now and
    then it finds a placement far from the change; the local re-plan stays within 1% of it."""
    for seed in range(4):
        rng = random.Random(seed)
        models, nodes = fleet(rng.choice([60, 200]), rng.choice([6, 20]), seed)
        steady = converged(models, nodes)
        planner = IncrementalPlanner(models, nodes, applied(steady), config=GREEDY)
        current = list(models)
        for _ in range(4):
            index = rng.randrange(len(current))
            current[index] = changed(current[index], rng.choice(CHANGES), rng)
            before = planner.plan
            incremental = planner.update_model(current[index])
            assert_plan_valid(incremental, current, nodes, GREEDY, busy_limit=1.0, current=applied(before))
            full = plan(current, nodes, applied(before), config=GREEDY)
            full_value = plan_value(full, current, nodes)
            assert plan_value(incremental, current, nodes) >= 0.99 * full_value
            # Only what the change touched gets actions; the rest of the plan stands.
            touched = {a.model for a in incremental.actions}
            for name, placement in before.placements.items():
                if name not in touched and name in incremental.placements:
                    assert incremental.placements[name].node == placement.node


def test_a_model_that_arrives_takes_a_spare_row_and_is_planned_as_a_full_plan_would() -> None:
    """A planner built with spare rows plans models that arrive later without a full plan: each is placed
    (the fleet has room), the spares never appear in a plan, the plans stay valid and worth what a full
    re-plan from the same state is worth; with no spare left, add_model refuses (the caller plans in
    full)."""
    models, nodes = fleet(40, 12, seed=5)
    arriving, present = models[:3], models[3:]
    steady = converged(present, nodes)
    planner = IncrementalPlanner(present, nodes, applied(steady), config=GREEDY, spare_rows=2)
    assert planner.plan.placements == steady.placements and planner.plan.actions == ()
    assert planner.spares_left() == 2
    current = list(present)
    for model in arriving[:2]:
        before = planner.plan
        incremental = planner.add_model(model)
        current.append(model)
        full = plan(current, nodes, applied(before), config=GREEDY)
        assert model.name in full.placements  # (the fleet has room for it)
        assert model.name in incremental.placements
        assert {a.model for a in incremental.actions} >= {model.name}
        assert not any(name.startswith("~") for name in incremental.placements)
        assert not any(u.model.startswith("~") for u in incremental.unschedulable)
        assert_plan_valid(incremental, current, nodes, GREEDY, busy_limit=1.0, current=applied(before))
        assert plan_value(incremental, current, nodes) >= 0.99 * plan_value(full, current, nodes)
    assert planner.spares_left() == 0
    # a known model is updated, not added
    changed_model = dataclasses.replace(arriving[0], min_decode_tokens_per_second=2.0)
    assert changed_model.name in planner.add_model(changed_model).placements
    with pytest.raises(KeyError, match="no spare row left"):
        planner.add_model(arriving[2])


def test_a_planner_with_spare_rows_makes_the_same_first_plan() -> None:
    models, nodes = fleet(120, 12, seed=3)
    with_spares = IncrementalPlanner(models, nodes, [], config=GREEDY, spare_rows=8)
    full = plan(models, nodes, [], config=GREEDY)
    assert with_spares.plan.placements == full.placements
    assert with_spares.plan.actions == full.actions
    assert with_spares.plan.unschedulable == full.unschedulable
