"""The greedy planner on the benchmark's 1 000-model fleet: an applied plan is a fixed point."""

from __future__ import annotations

import collections
from types import ModuleType

import bench_modules
import pytest

from residency_operator.planner import PlannerConfig, plan


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return bench_modules.load("bench_plan_scale")


def test_a_re_plan_of_the_applied_plan_changes_nothing_on_the_benchmark_fleet(bench: ModuleType) -> None:
    # The final promotion raises models into free memory; were room not made once more after it, the
    # next re-plan would demote those models to admit ones left out (21 actions here before).
    models, nodes = bench.make_fleet(1000, 100, seed=0)
    config = PlannerConfig(solver="greedy")
    first = plan(models, nodes, [], config=config)
    again = plan(models, nodes, bench.applied(first), config=config)
    assert again.actions == (), collections.Counter(a.kind for a in again.actions)
    assert again.placements == first.placements


@pytest.mark.parametrize("seed", [1, 2])
def test_re_plans_settle_within_one_more_round_on_other_fleets(bench: ModuleType, seed: int) -> None:
    models, nodes = bench.make_fleet(1000, 100, seed=seed)
    config = PlannerConfig(solver="greedy")
    state = bench.applied(plan(models, nodes, [], config=config))
    second = plan(models, nodes, state, config=config)
    assert len(second.actions) <= 10
    assert plan(models, nodes, bench.applied(second), config=config).actions == ()
