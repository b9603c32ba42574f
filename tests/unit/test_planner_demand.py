"""Priority orders demand, not memory (planner/demand.py): idle models of any priority yield GPU memory to
busy ones, and take it back when their demand returns; ``preemptible: false`` models only while idle, and
never past host memory."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_planner_plan import model as planner_model
from test_planner_properties import (
    PROPERTY_SETTINGS,
    applied,
    assert_every_step_fits,
    models_strategy,
    nodes_strategy,
)

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
    # Below every declared tier, its own declared priority still known; the offset (past the span of 91,
    # a power of ten with room for the span to double) leaves the order of every model as it was.
    assert offset == 1000 and seen[0].priority < BATCH.priority and seen[0].declared_priority == 100
    assert seen[1] is BATCH


def test_a_priority_change_within_the_offset_room_is_planned_incrementally() -> None:
    """A new priority that widens the span of declared priorities while models are idle, but not past
    the offset's room, is one model's change: the incremental planner does not re-plan everything."""
    config = PlannerConfig(solver="greedy")
    planner = IncrementalPlanner([PROD, BATCH], [L4], running("prod/chat"), config=config)
    rebuilt: list[str] = []
    planner._replan_all = lambda model, now: rebuilt.append(model.name)  # type: ignore[method-assign,assignment,return-value]
    planner.update_model(dataclasses.replace(BATCH, priority=150))  # declared 100 and 150: in the room
    assert rebuilt == []
    planner.update_model(dataclasses.replace(BATCH, priority=5000))  # past the room: a full re-plan
    assert rebuilt == ["batch/job"]


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
def test_an_idle_non_preemptible_model_is_demoted_within_its_slo_where_that_makes_the_room(
    solver: str,
) -> None:
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


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_idle_non_preemptible_model_leaves_the_gpu_but_never_host_memory(solver: str) -> None:
    """A pinned model nobody calls gives its GPU memory to a busy model it could only be demoted for before
    (its SLO needs it whole): its weights and KV cache stay in host memory, and its return is a resume."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    pinned = dataclasses.replace(PROD, preemptible=False)
    waiting = dataclasses.replace(BATCH, waiting_requests=3)
    idle = running("prod/chat", state="idle")
    planned = plan([pinned, waiting], [L4], idle, config=config)
    assert set(planned.placements) == {"batch/job"}
    assert [c.model for c in planned.cached] == ["prod/chat"]
    kinds = [(a.kind, a.model) for a in planned.actions]
    assert ("preempt", "prod/chat") in kinds and ("evict", "prod/chat") not in kinds
    # The older rule keeps it on the GPU, the busy model left out.
    older = plan(
        [pinned, waiting], [L4], idle, config=dataclasses.replace(config, idle_pinned_models_leave_gpu=False)
    )
    assert set(older.placements) == {"prod/chat"}
    # Its demand returns: it resumes from its host copy at its declared priority, the batch model preempted.
    back = dataclasses.replace(pinned, waiting_requests=2, demand_decode_tokens_per_second=30.0)
    current = [CurrentPlacement("prod/chat", "l4-0", 0.0, "stream", "preempted"), *running("batch/job")]
    returned = plan([back, BATCH], [L4], current, config=config)
    assert set(returned.placements) == {"prod/chat"}
    assert ("resume", "prod/chat") in [(a.kind, a.model) for a in returned.actions]


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_idle_pinned_model_whose_host_copy_has_no_room_keeps_its_gpu(solver: str) -> None:
    """Never evicted past host memory: where its node's host memory cannot hold its copy, it stays."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    small_host = dataclasses.replace(L4, host_memory_bytes=8 * GIB)
    pinned = dataclasses.replace(PROD, preemptible=False)
    waiting = dataclasses.replace(BATCH, waiting_requests=3)
    planned = plan([pinned, waiting], [small_host], running("prod/chat", state="idle"), config=config)
    assert "prod/chat" in planned.placements
    assert not [a for a in planned.actions if a.model == "prod/chat" and a.kind in ("preempt", "evict")]


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_yielded_pinned_model_keeps_its_host_copy_before_any_other_cache(solver: str) -> None:
    """Host memory for one copy only: the preempted pinned model keeps it, even against a declared
    higher-priority preemptible model's cache, because the plan set its room aside before solving."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    one_copy = dataclasses.replace(L4, host_memory_bytes=20 * GIB)
    pinned = dataclasses.replace(PROD, preemptible=False)
    other = model("prod/other", 8, demand=0.0, priority=200)
    waiting = dataclasses.replace(BATCH, waiting_requests=3)
    current = [
        *running("prod/chat", state="idle"),
        CurrentPlacement("prod/other", "l4-0", 0.0, "stream", "preempted"),
    ]
    planned = plan([pinned, other, waiting], [one_copy], current, config=config)
    assert "prod/chat" not in planned.placements
    assert [c.model for c in planned.cached] == ["prod/chat"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_idle_pinned_model_never_leaves_the_gpu_to_a_pinned_model_of_lower_priority(solver: str) -> None:
    """Placed, a busy ``preemptible: false`` model is never moved for another, of any priority: had the
    idle priority-100 model given it its GPU, its next request would find the room held by a lower tier for
    good (found by ``test_no_priority_inversion_and_non_preemptible_kept`` with random draws, issue 26).
    So it keeps its GPU, idle (its demand window empty) or only quiet, while such a model waits; to a pinned
    model of its own priority, or to a preemptible one of any, it still gives its room."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    pinned = dataclasses.replace(PROD, preemptible=False)
    lower = dataclasses.replace(BATCH, preemptible=False, waiting_requests=3)
    for quiet in (pinned, dataclasses.replace(pinned, demand_decode_tokens_per_second=5.0)):
        planned = plan([quiet, lower], [L4], running("prod/chat", state="idle"), config=config)
        assert "prod/chat" in planned.placements and not planned.cached
        # its demand returns: it serves at once, the lower one still waiting
        back = dataclasses.replace(pinned, waiting_requests=2, demand_decode_tokens_per_second=30.0)
        returned = plan([back, lower], [L4], applied(planned), config=config)
        assert "prod/chat" in returned.placements and "batch/job" not in returned.placements
    for peer in (dataclasses.replace(lower, priority=100), dataclasses.replace(lower, preemptible=True)):
        gave_way = plan([pinned, peer], [L4], running("prod/chat", state="idle"), config=config)
        assert set(gave_way.placements) == {"batch/job"}
        assert [c.model for c in gave_way.cached] == ["prod/chat"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_pinned_model_in_host_memory_keeps_its_node_from_a_lower_pinned_model(solver: str) -> None:
    """The idle priority-100 model left its GPU for a busy preemptible model (allowed: that one can be
    preempted when it returns), which then went away. A busy pinned priority-10 model now waits: it is not
    placed where the priority-100 model's copy waits in host memory, whose return needs that room."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    pinned = dataclasses.replace(PROD, preemptible=False)
    lower = dataclasses.replace(BATCH, preemptible=False, waiting_requests=3)
    current = [CurrentPlacement("prod/chat", "l4-0", 0.0, "stream", "preempted")]
    planned = plan([pinned, lower], [L4], current, config=config)
    assert "batch/job" not in planned.placements
    assert "prod/chat" in planned.placements or [c.model for c in planned.cached] == ["prod/chat"]
    (held,) = [u for u in planned.unschedulable if u.model == "batch/job"]
    assert held.reason == "HeldForPinnedModel" and held.message.startswith("the room on l4-0 is kept")
    # its demand returns: it serves at once
    back = dataclasses.replace(pinned, waiting_requests=2, demand_decode_tokens_per_second=30.0)
    returned = plan([back, lower], [L4], applied(planned), config=config)
    assert "prod/chat" in returned.placements and "batch/job" not in returned.placements
    # another node takes the lower one
    other = dataclasses.replace(L4, name="l4-1")
    elsewhere = plan([pinned, lower], [L4, other], current, config=config)
    assert elsewhere.placements["batch/job"].node == "l4-1"


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_idle_pinned_model_of_lower_priority_is_not_placed_where_a_higher_one_leaves(solver: str) -> None:
    """Drawn by ``test_a_pinned_model_that_leaves_the_gpu_keeps_its_host_copy`` (seed 10). The priority-10
    pinned model goes idle and leaves its GPU for a busy preemptible model; the priority-0 pinned model, idle
    too and with no place (its demand had crowded the other's SLO), was put into the room left: busy again,
    it would hold that room for good. It is kept off that node (it has nothing to serve)."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    node = NodeCapacity("node-0", "H100", 24 * GIB, 16 * GIB, 6.0, 300.0, 25.0)
    low = ModelDemand(
        "ns/low", int(8e9), 0, 2048, 1, preemptible=False, demand_decode_tokens_per_second=100.0
    )
    high = ModelDemand(
        "ns/high", int(1e9), 32768, 2048, 4, priority=10, preemptible=False, min_decode_tokens_per_second=20.0
    )
    first = plan([low, high], [node], [], config=config)
    assert set(first.placements) == {"ns/high"}
    quiet = [dataclasses.replace(m, demand_decode_tokens_per_second=0.0) for m in (low, high)]
    busy = ModelDemand(
        "new/busy", int(16e9), 0, 2048, 1, waiting_requests=2, demand_decode_tokens_per_second=50.0
    )
    second = plan([*quiet, busy], [node], applied(first), config=config)
    assert "ns/low" not in second.placements
    assert "ns/high" in second.placements or [c.model for c in second.cached] == ["ns/high"]


def test_the_incremental_planner_keeps_an_idle_pinned_model_for_a_pinned_model_of_lower_priority() -> None:
    """A pinned lower-priority model that had no place becomes busy: the incremental planner, which could
    only follow the full plan's set-aside host memory, plans in full, and the idle model keeps its GPU."""
    config = PlannerConfig(solver="greedy")
    pinned = dataclasses.replace(PROD, preemptible=False)
    lower = dataclasses.replace(BATCH, preemptible=False, demand_decode_tokens_per_second=0.0)
    planner = IncrementalPlanner([pinned, lower], [L4], running("prod/chat", state="idle"), config=config)
    assert set(planner.plan.placements) == {"prod/chat"}
    updated = planner.update_model(dataclasses.replace(lower, demand_decode_tokens_per_second=30.0))
    assert "prod/chat" in updated.placements and not updated.cached
    # Nor, once it left its GPU for a busy preemptible model of priority 0, to the lower pinned one, which
    # would preempt that model and hold the room for good.
    cached = [CurrentPlacement("prod/chat", "l4-0", 0.0, "stream", "preempted"), *running("batch/low")]
    low = model("batch/low", 8, demand=30.0, priority=0)
    planner = IncrementalPlanner([pinned, lower, low], [L4], cached, config=config)
    assert set(planner.plan.placements) == {"batch/low"}
    updated = planner.update_model(dataclasses.replace(lower, demand_decode_tokens_per_second=30.0))
    assert set(updated.placements) == {"batch/low"}


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


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_freshly_applied_model_is_placed_at_its_priority_before_it_could_be_called(solver: str) -> None:
    """A model never loaded has had no chance to be called: its demand of 0 (no request waits) is no sign of
    idleness, so applying a higher-priority model preempts a busy lower one, as a user applying it expects;
    once it has served and nobody calls it, it yields."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    fresh = dataclasses.replace(PROD, has_served=False)
    assert not is_idle(fresh, PlannerConfig())
    planned = plan([fresh, BATCH], [L4], running("batch/job"), config=config)
    assert set(planned.placements) == {"prod/chat"}
    assert ("preempt", "batch/job") in [(a.kind, a.model) for a in planned.actions]
    served = plan([PROD, BATCH], [L4], running("batch/job"), config=config)
    assert set(served.placements) == {"batch/job"}


@PROPERTY_SETTINGS
@given(
    models=models_strategy(),
    newcomers=models_strategy(),
    nodes=nodes_strategy(),
    quiet=st.lists(st.booleans(), min_size=6, max_size=6),
    solver=st.sampled_from(SOLVERS),
)
def test_a_pinned_model_that_leaves_the_gpu_keeps_its_host_copy(
    models: list[ModelDemand],
    newcomers: list[ModelDemand],
    nodes: list[NodeCapacity],
    quiet: list[bool],
    solver: str,
) -> None:
    """Whatever else arrives: a ``preemptible: false`` model that ran is, in the next plan, still placed,
    or (only when idle) preempted with its weights and KV cache kept in host memory — never evicted."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    first = plan(models, nodes, [], config=config)
    # Some go quiet (idle: they served, nobody calls them), the newcomers are busy and waiting.
    later = [
        dataclasses.replace(m, demand_decode_tokens_per_second=0.0, waiting_requests=0) if quiet[i] else m
        for i, m in enumerate(models)
    ]
    arrivals = [
        dataclasses.replace(
            m, name=m.name.replace("ns/", "new/"), waiting_requests=2, demand_decode_tokens_per_second=50.0
        )
        for m in newcomers
    ]
    everyone = later + arrivals
    second = plan(everyone, nodes, applied(first), config=config)
    assert_every_step_fits(second, everyone, nodes, applied(first))
    cached = {c.model for c in second.cached}
    by_name = {m.name: m for m in everyone}
    for name in first.placements:
        model = by_name[name]
        if model.preemptible or name in second.placements:
            continue
        assert is_idle(model, config), f"busy pinned {name} left the GPU"
        assert name in cached, f"pinned {name} left the GPU without its host copy"
        # nor for a pinned model of a lower priority: placed, that one would hold its room for good
        below = [
            p.model
            for p in second.placements.values()
            if p.node == first.placements[name].node
            and not by_name[p.model].preemptible
            and by_name[p.model].declared_priority < model.declared_priority
            and p.model not in first.placements
        ]
        assert not below, f"pinned {name} left the GPU while pinned {below} of a lower priority were placed"
        assert not [a for a in second.actions if a.model == name and a.kind == "evict"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_returning_model_makes_room_on_the_node_holding_its_host_copy(solver: str) -> None:
    """Demand returns to a model cached in one node's host memory, and both nodes are full of busy lower
    tiers: it makes room at home (a resume at link speed), not on the node where the lower tier happens
    to lose a little less (a cold load from storage while its requests wait)."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    other_l4 = dataclasses.replace(L4, name="l4-1")
    back = dataclasses.replace(PROD, waiting_requests=2, demand_decode_tokens_per_second=30.0)
    at_home = model("batch/home", 8, demand=30.0, priority=10)
    elsewhere = model("batch/away", 8, demand=28.0, priority=10)
    current = [
        CurrentPlacement("prod/chat", "l4-0", 0.0, "stream", "preempted"),
        CurrentPlacement("batch/home", "l4-0", 1.0, "stream", "loaded"),
        CurrentPlacement("batch/away", "l4-1", 1.0, "stream", "loaded"),
    ]
    planned = plan([back, at_home, elsewhere], [L4, other_l4], current, config=config)
    assert planned.placements["prod/chat"].node == "l4-0"
    assert ("resume", "prod/chat") in [(a.kind, a.model) for a in planned.actions]
    assert "batch/away" in planned.placements
