"""Priority orders demand, not memory (planner/demand.py): idle models of any priority yield GPU memory to
busy ones, and take it back when their demand returns; ``preemptible: false`` models only ever demote."""

from __future__ import annotations

import dataclasses

import pytest
from test_planner_plan import model as planner_model

from residency_operator.planner import GIB, CurrentPlacement, ModelDemand, NodeCapacity, PlannerConfig, plan
from residency_operator.planner.demand import is_idle, yield_idle
from residency_operator.planner.incremental import IncrementalPlanner

L4 = NodeCapacity("l4-0", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0)
SOLVERS = ("milp", "greedy")


def model(name: str, billions: float, demand: float | None, **fields: object) -> ModelDemand:
    """A model of ``billions`` parameters with an SLO of 15 tok/s and ``demand`` tok/s asked of it."""
    return planner_model(
        name, billions, min_decode_tokens_per_second=15.0, demand_decode_tokens_per_second=demand, **fields
    )


# Two 8B models do not fit one L4 whole together; the production one is declared far more important.
PROD = model("prod/chat", 8, demand=0.0, priority=100)
BATCH = model("batch/job", 8, demand=30.0, priority=10)


def running(*names: str, state: str = "loaded") -> list[CurrentPlacement]:
    return [CurrentPlacement(name, "l4-0", 1.0, "stream", state) for name in names]  # type: ignore[arg-type]


def test_idle_means_known_zero_demand_and_nothing_waiting() -> None:
    config = PlannerConfig()
    assert is_idle(PROD, config)
    assert not is_idle(dataclasses.replace(PROD, waiting_requests=1), config)
    assert not is_idle(dataclasses.replace(PROD, demand_decode_tokens_per_second=None), config)
    assert not is_idle(dataclasses.replace(PROD, demand_decode_tokens_per_second=2.0), config)
    assert not is_idle(dataclasses.replace(PROD, wanted=False), config)
    seen, offset = yield_idle([PROD, BATCH], config)
    # Below every declared tier, its own declared priority still known.
    assert offset == 91 and seen[0].priority < BATCH.priority and seen[0].declared_priority == 100
    assert seen[1] is BATCH


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_idle_high_priority_model_yields_its_memory_to_a_busy_lower_one(solver: str) -> None:
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    waiting = dataclasses.replace(BATCH, waiting_requests=3)
    planned = plan([PROD, waiting], [L4], running("prod/chat", state="idle"), config=config)
    assert set(planned.placements) == {"batch/job"}
    assert planned.placements["batch/job"].meets_slo
    # It keeps its weights in host memory: its return is a resume at link speed, not a cold load.
    assert [c.model for c in planned.cached] == ["prod/chat"]
    assert ("preempt", "prod/chat") in [(a.kind, a.model) for a in planned.actions]
    (reason,) = planned.unschedulable
    assert reason.model == "prod/chat" and "idle" in reason.message
    # Strict tiers (the old behaviour) keep the idle model and leave the busy one out.
    strict = plan(
        [PROD, waiting],
        [L4],
        running("prod/chat", state="idle"),
        config=dataclasses.replace(config, idle_models_yield=False),
    )
    assert set(strict.placements) == {"prod/chat"}


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_idle_model_keeps_its_place_while_nobody_needs_the_room(solver: str) -> None:
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    quiet_batch = dataclasses.replace(BATCH, demand_decode_tokens_per_second=0.0)
    planned = plan([PROD, quiet_batch], [L4], running("prod/chat", state="idle"), config=config)
    assert "prod/chat" in planned.placements
    assert not [a for a in planned.actions if a.model == "prod/chat"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_when_its_demand_returns_it_takes_the_room_back(solver: str) -> None:
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    # prod/chat yielded: it is cached in host memory, batch/job runs and is busy.
    current = [
        CurrentPlacement("prod/chat", "l4-0", 0.0, "stream", "preempted"),
        *running("batch/job"),
    ]
    back = dataclasses.replace(PROD, waiting_requests=2, demand_decode_tokens_per_second=30.0)
    planned = plan([back, BATCH], [L4], current, config=config)
    assert set(planned.placements) == {"prod/chat"}
    kinds = [(a.kind, a.model) for a in planned.actions]
    assert ("resume", "prod/chat") in kinds
    assert kinds.index(("preempt", "batch/job")) < kinds.index(("resume", "prod/chat"))
    (reason,) = planned.unschedulable
    assert reason.model == "batch/job" and "higher-priority prod/chat (priority 100)" in reason.message


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_idle_non_preemptible_model_is_only_demoted_within_its_slo(solver: str) -> None:
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    # An SLO an 8B model still meets with part of its weights streamed from host memory, while a busy
    # model beside it takes its share of the GPU's time.
    pinned = dataclasses.replace(
        PROD, preemptible=False, max_offload_fraction=0.75, min_decode_tokens_per_second=1.0
    )
    waiting = model("batch/job", 4, demand=15.0, priority=10, waiting_requests=1)
    planned = plan([pinned, waiting], [L4], running("prod/chat", state="idle"), config=config)
    kept = planned.placements["prod/chat"]
    assert kept.node == "l4-0" and kept.meets_slo
    assert kept.resident_fraction >= pinned.min_resident_fraction - 1e-9
    assert not [a for a in planned.actions if a.model == "prod/chat" and a.kind in ("preempt", "evict")]
    # It gave the busy model room: demoted, so that both run.
    assert kept.resident_fraction < 1.0 and "batch/job" in planned.placements


def test_the_incremental_planner_applies_the_same_rule() -> None:
    config = PlannerConfig(solver="greedy")
    busy_prod = dataclasses.replace(PROD, demand_decode_tokens_per_second=30.0)
    planner = IncrementalPlanner([busy_prod, BATCH], [L4], running("prod/chat"), config=config)
    assert set(planner.plan.placements) == {"prod/chat"}
    # prod/chat goes quiet, batch/job has requests waiting: it is the busy one now.
    planner.update_model(PROD)
    updated = planner.update_model(dataclasses.replace(BATCH, waiting_requests=3))
    assert set(updated.placements) == {"batch/job"}
    # And back: prod/chat's requests return.
    back = planner.update_model(
        dataclasses.replace(PROD, waiting_requests=2, demand_decode_tokens_per_second=30.0)
    )
    assert set(back.placements) == {"prod/chat"}
