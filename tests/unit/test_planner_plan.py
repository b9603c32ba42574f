"""Behaviour of ``plan()`` on small cases with a known right answer."""

from __future__ import annotations

import dataclasses
import re

import pytest

from residency_operator.planner import (
    GIB,
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    PlannerConfig,
    plan,
)
from residency_operator.planner.incremental import IncrementalPlanner
from residency_operator.planner.options import evaluate_option
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.value import time_capacity

L4 = NodeCapacity("l4-0", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0)
H100 = NodeCapacity("h100-0", "H100", 80 * GIB, 512 * GIB, 50.0, 2000.0, 120.0)


def model(name: str, billions: float, **fields: object) -> ModelDemand:
    return ModelDemand(
        name=name,
        weight_bytes=int(billions * 2e9),
        kv_bytes_per_token=131072,
        max_sequence_length=2048,
        max_batch=4,
        **fields,  # type: ignore[arg-type]
    )


def demand(name: str, weight_gb: float, **fields: object) -> ModelDemand:
    """A model of ``weight_gb`` GB of weights (no KV cache unless given), the other fields as given."""
    fields.setdefault("kv_bytes_per_token", 0)
    return ModelDemand(name=name, weight_bytes=int(weight_gb * 1e9), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_partial_residency_fits_a_model_that_does_not_fit_whole(solver: str) -> None:
    big = model("ns/big", 13, min_decode_tokens_per_second=2.0, max_offload_fraction=0.5)
    planned = plan([big], [L4], [], config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    placement = planned.placements["ns/big"]
    assert 0.5 <= placement.resident_fraction < 1.0
    assert placement.predicted_decode_tokens_per_second >= 2.0
    assert [a.kind for a in planned.actions] == ["load"]
    assert planned.actions[0].predicted_seconds > 0 and planned.actions[0].bytes_moved > 0


def test_unschedulable_reason_names_the_numbers() -> None:
    big = model("ns/big", 30, min_decode_tokens_per_second=2.0, max_offload_fraction=0.2)
    planned = plan([big], [L4], [])
    (reason,) = planned.unschedulable
    assert reason.reason == "InsufficientGPUMemory"
    assert re.search(
        r"needs \d+\.\d GiB on the GPU .* for SLO 2 tok/s; the largest node has \d+\.\d GiB", reason.message
    )


def test_slo_unreachable_reason() -> None:
    slow = model("ns/fast-please", 8, min_decode_tokens_per_second=500.0)
    (reason,) = plan([slow], [L4], []).unschedulable
    assert reason.reason == "SLOUnreachable"
    assert "SLO 500 tok/s unreachable" in reason.message


def test_nothing_on_cordoned_or_disrupting_nodes() -> None:
    cordoned = dataclasses.replace(H100, name="h100-c", cordoned=True)
    disrupting = dataclasses.replace(H100, name="h100-d", disrupting=True)
    planned = plan([model("ns/a", 1)], [cordoned, disrupting], [])
    assert not planned.placements
    assert planned.unschedulable[0].reason == "NoSchedulableNode"
    # A model running on a node that starts draining is moved.
    current = [CurrentPlacement("ns/a", "h100-d", 1.0, "stream")]
    moved = plan([model("ns/a", 1)], [disrupting, H100], current)
    assert moved.placements["ns/a"].node == "h100-0"
    assert [a.kind for a in moved.actions] == ["migrate"]


def test_higher_priority_preempts_lower_with_a_reason() -> None:
    low = model("ns/low", 8, priority=0)
    high = model("ns/high", 8, priority=100, preemptible=False)
    current = [CurrentPlacement("ns/low", "l4-0", 1.0, "stream")]
    planned = plan([low, high], [L4], current)
    assert planned.placements["ns/high"].node == "l4-0"
    kinds = [(a.kind, a.model) for a in planned.actions]
    assert kinds.index(("preempt", "ns/low")) < kinds.index(("load", "ns/high"))
    preempt = next(a for a in planned.actions if a.kind == "preempt")
    assert "ns/high (priority 100)" in preempt.reason
    low_reason = next(u for u in planned.unschedulable if u.model == "ns/low")
    assert "preempted for higher-priority ns/high" in low_reason.message


def test_lower_priority_never_preempts_higher() -> None:
    low = model("ns/low", 8, priority=0)
    high = model("ns/high", 8, priority=100)
    current = [CurrentPlacement("ns/high", "l4-0", 1.0, "stream")]
    planned = plan([low, high], [L4], current)
    assert planned.actions == ()
    assert "ns/low" not in planned.placements


def test_hysteresis_small_demand_change_moves_nothing() -> None:
    models = [model(f"ns/m{i}", 3, demand_decode_tokens_per_second=50.0) for i in range(3)]
    first = plan(models, [L4, H100], [])
    current = [
        CurrentPlacement(p.model, p.node, p.resident_fraction, p.mode) for p in first.placements.values()
    ]
    nudged = [dataclasses.replace(m, demand_decode_tokens_per_second=52.0) for m in models]
    assert plan(nudged, [L4, H100], current).actions == ()


def test_unwanted_model_is_evicted() -> None:
    gone = model("ns/gone", 1, wanted=False)
    current = [CurrentPlacement("ns/gone", "l4-0", 1.0, "stream")]
    planned = plan([gone], [L4], current)
    assert [(a.kind, a.model) for a in planned.actions] == [("evict", "ns/gone")]
    assert planned.unschedulable == ()


def test_exact_solver_is_at_least_as_good_as_greedy() -> None:
    models = [
        model(f"ns/m{i}", b, demand_decode_tokens_per_second=d, min_decode_tokens_per_second=5.0)
        for i, (b, d) in enumerate([(8, 40.0), (3, 80.0), (13, 10.0), (1, 5.0), (8, 100.0)])
    ]
    exact = plan(models, [L4, H100], [], config=PlannerConfig(solver="milp"))
    greedy = plan(models, [L4, H100], [], config=PlannerConfig(solver="greedy"))
    assert exact.solver == "milp" and greedy.solver == "greedy"
    served_exact = sum(
        min(p.predicted_throughput_tokens_per_second, 200.0) for p in exact.placements.values()
    )
    assert len(exact.placements) >= len(greedy.placements) or served_exact > 0
    assert 0.0 <= greedy.optimality_gap <= 1.0
    assert greedy.upper_bound >= greedy.objective


def test_incremental_update_replans_only_the_changed_model() -> None:
    models = [model(f"ns/m{i}", 1 + i % 3, demand_decode_tokens_per_second=10.0) for i in range(12)]
    planner = IncrementalPlanner(models, [L4, H100], [])
    before = planner.plan.placements
    changed = dataclasses.replace(models[3], wanted=False)
    after = planner.update_model(changed)
    assert "ns/m3" not in after.placements
    assert {a.model for a in after.actions} == {"ns/m3"}
    assert {k: v for k, v in before.items() if k != "ns/m3"} == {
        k: v for k, v in after.placements.items() if k != "ns/m3"
    }
    with pytest.raises(KeyError):
        planner.update_model(model("ns/unknown", 1))


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_model_whose_demand_outgrew_its_gpu_moves_to_a_faster_one(solver: str) -> None:
    """Placed on the L4 while quiet, a model whose demand the L4 can no longer serve moves to the free
    H100 (the throughput gained is worth the reload); one the L4 still serves stays."""
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    hot = model("ns/hot", 3, demand_decode_tokens_per_second=2000.0, min_decode_tokens_per_second=5.0)
    current = [CurrentPlacement("ns/hot", "l4-0", 1.0, "stream")]
    planned = plan([hot], [L4, H100], current, config=config)
    assert planned.placements["ns/hot"].node == "h100-0"
    assert [a.kind for a in planned.actions] == ["migrate"]
    # served where it is (its demand with headroom within what a full batch there decodes): it stays,
    # though the H100 would score a little higher
    for demand in (5.0, 60.0):
        served = dataclasses.replace(hot, demand_decode_tokens_per_second=demand)
        assert plan([served], [L4, H100], current, config=config).actions == ()


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_an_idle_model_makes_room_for_a_busy_one_of_its_own_tier(solver: str) -> None:
    """Same priority: a loaded model nobody uses is preempted (weights kept in host memory) for one with
    traffic that cannot fit beside it."""
    idle = model("ns/idle", 8, demand_decode_tokens_per_second=0.0, min_decode_tokens_per_second=5.0)
    busy = model(
        "ns/busy",
        8,
        demand_decode_tokens_per_second=60.0,
        min_decode_tokens_per_second=5.0,
        max_offload_fraction=0.0,
    )
    current = [CurrentPlacement("ns/idle", "l4-0", 1.0, "stream", "idle")]
    planned = plan([idle, busy], [L4], current, config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    assert planned.placements["ns/busy"].node == "l4-0"
    assert "ns/idle" not in planned.placements
    kinds = [(a.kind, a.model) for a in planned.actions]
    assert kinds.index(("preempt", "ns/idle")) < kinds.index(("load", "ns/busy"))
    if solver == "greedy":
        (reason,) = [u for u in planned.unschedulable if u.model == "ns/idle"]
        # An idle model yields before any priority comparison (planner/demand.py).
        assert reason.message.startswith("idle, so it yielded its memory to busy ns/busy (priority 0)")


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_models_of_one_tier_do_not_swap_for_a_small_gain(solver: str) -> None:
    """A running model of the same tier is preempted only for a clear gain, not for a near equal."""
    running = model("ns/running", 8, demand_decode_tokens_per_second=8.0, min_decode_tokens_per_second=5.0)
    waiting = model(
        "ns/waiting",
        8,
        demand_decode_tokens_per_second=12.0,
        min_decode_tokens_per_second=5.0,
        max_offload_fraction=0.0,
    )
    current = [CurrentPlacement("ns/running", "l4-0", 1.0, "stream")]
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    planned = plan([running, waiting], [L4], current, config=config)
    assert planned.actions == ()
    assert "ns/waiting" not in planned.placements
    # worth more than twice as much (the running one's traffic dropped), it does take the place
    quieter = dataclasses.replace(running, demand_decode_tokens_per_second=2.0)
    planned = plan([quieter, waiting], [L4], current, config=config)
    assert planned.placements["ns/waiting"].node == "l4-0" and "ns/running" not in planned.placements


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_model_that_just_resumed_keeps_its_place_while_its_backlog_waits(solver: str) -> None:
    """A model that resumed a moment ago, its requests still queued, is worth what they ask (its last
    minute's rate lags them), so a model of its tier with as many requests waiting does not preempt it:
    otherwise the two take turns every round, each reload serving nothing."""
    resumed = model(
        "ns/resumed",
        8,
        demand_decode_tokens_per_second=6.0,
        min_decode_tokens_per_second=8.0,
        waiting_requests=4,
    )
    waiting = model(
        "ns/waiting",
        8,
        demand_decode_tokens_per_second=32.0,
        min_decode_tokens_per_second=8.0,
        waiting_requests=4,
    )
    current = [
        CurrentPlacement("ns/resumed", "l4-0", 1.0, "stream"),
        CurrentPlacement("ns/waiting", "l4-0", 0.0, "stream", "preempted"),
    ]
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    planned = plan([resumed, waiting], [L4], current, config=config)
    assert planned.placements["ns/resumed"].node == "l4-0"
    assert "ns/waiting" not in planned.placements
    assert not any(a.model == "ns/resumed" for a in planned.actions)
    # once its backlog is served and its traffic is low, the waiting model's requests do win the place
    served = dataclasses.replace(resumed, waiting_requests=0, demand_decode_tokens_per_second=2.0)
    planned = plan([served, waiting], [L4], current, config=config)
    assert planned.placements["ns/waiting"].node == "l4-0" and "ns/resumed" not in planned.placements


def test_a_busy_gpu_is_valued_at_what_its_time_can_serve() -> None:
    """A full batch on the L4 would be fast enough for twice the demand, but the demand already needs
    most of the L4's time: that option is worth about the demand, the H100's (same footprint) the demand
    with its headroom."""
    config = PlannerConfig()
    busy = dataclasses.replace(
        model("ns/busy", 8, demand_decode_tokens_per_second=60.0, min_decode_tokens_per_second=5.0),
        max_batch=8,
    )
    on_l4 = evaluate_option(Predictor(), busy, L4, 1.0, "stream", config)
    on_h100 = evaluate_option(Predictor(), busy, H100, 1.0, "stream", config)
    assert on_l4.busy_fraction > 0.5
    assert on_l4.throughput_tokens_per_second > config.demand_headroom * 60.0
    assert on_l4.primary_value < 60.0 * config.max_gpu_busy_fraction / on_l4.busy_fraction + 1.0
    assert on_h100.primary_value >= config.demand_headroom * 60.0 - 1.0
    assert float(time_capacity(70.0, 1.9, 0.95)) == pytest.approx(35.0)
    assert float(time_capacity(float("inf"), 0.5, 0.95)) == float("inf")


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_settled_model_that_loses_its_room_to_a_higher_tier_moves_rather_than_stops(solver: str) -> None:
    """Served where it is, the low-priority model would never move by itself; when a higher tier needs its
    GPU it moves to a node with room instead of being preempted."""
    low = model(
        "ns/low",
        8,
        demand_decode_tokens_per_second=5.0,
        min_decode_tokens_per_second=5.0,
        max_offload_fraction=0.0,
    )
    high = model(
        "ns/high",
        34,
        demand_decode_tokens_per_second=50.0,
        min_decode_tokens_per_second=20.0,
        priority=10,
        max_offload_fraction=0.0,
    )
    current = [CurrentPlacement("ns/low", "h100-0", 1.0, "stream")]
    planned = plan([low, high], [L4, H100], current, config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    assert {k: p.node for k, p in planned.placements.items()} == {"ns/high": "h100-0", "ns/low": "l4-0"}
    assert [(a.kind, a.model) for a in planned.actions] == [("migrate", "ns/low"), ("load", "ns/high")]


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_running_non_preemptible_models_stay_when_their_demand_over_fills_the_gpu(solver: str) -> None:
    """GPU time is an estimate: two `preemptible: false` models whose measured demand together needs more
    than all of their GPU's time both keep running (only the preemptible one beside them gives way)."""
    pinned = [
        model(
            f"ns/prod-{i}",
            3,
            demand_decode_tokens_per_second=400.0,
            min_decode_tokens_per_second=5.0,
            preemptible=False,
            priority=100,
        )
        for i in range(2)
    ]
    batch = model("ns/batch", 1, demand_decode_tokens_per_second=50.0, min_decode_tokens_per_second=5.0)
    current = [CurrentPlacement(m.name, "l4-0", 1.0, "stream") for m in [*pinned, batch]]
    planned = plan([*pinned, batch], [L4], current, config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    assert {"ns/prod-0", "ns/prod-1"} <= set(planned.placements)
    assert not any(a.model.startswith("ns/prod") for a in planned.actions)
    # the exact solver solves it (it found the pinned models infeasible and fell back to the greedy)
    assert planned.solver == solver, planned.notes


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_pinned_model_below_the_top_priority_leaves_the_exact_solver_feasible(solver: str) -> None:
    """A running `preemptible: false` model of a low priority stays through the higher tiers' stages:
    the exact solver used to find every higher tier infeasible and silently fell back to the greedy."""
    low = model("ns/low", 1, preemptible=False, priority=0)
    high = model("ns/high", 1, priority=10)
    current = [CurrentPlacement("ns/low", "h100-0", 1.0, "stream")]
    planned = plan([low, high], [H100], current, config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    assert planned.solver == solver, planned.notes
    assert set(planned.placements) == {"ns/low", "ns/high"}


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_higher_priority_model_is_not_preempted_for_a_pinned_lower_one_s_gpu_time(solver: str) -> None:
    """A pinned low-priority model whose demand takes most of the GPU's time beside a running high-priority
    one: both stay (the high one was preempted to give the low one room, a priority inversion)."""
    node = NodeCapacity("h100-24", "H100", 24 * GIB, 64 * GIB, 25.0, 2000.0, 25.0)
    high = demand(
        "ns/high",
        16,
        priority=100,
        min_decode_tokens_per_second=20.0,
        demand_decode_tokens_per_second=10.0,
    )
    low = demand(
        "ns/low",
        30,
        priority=10,
        preemptible=False,
        max_offload_fraction=0.9,
        allowed_modes=("cpu",),
        demand_decode_tokens_per_second=100.0,
    )
    current = [
        CurrentPlacement("ns/high", "h100-24", 1.0, "stream"),
        CurrentPlacement("ns/low", "h100-24", 0.1, "cpu"),
    ]
    planned = plan([high, low], [node], current, config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    assert planned.solver == solver, planned.notes
    assert {"ns/high", "ns/low"} <= set(planned.placements)
    assert not [a for a in planned.actions if a.kind in ("preempt", "evict", "migrate")]


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_pinned_model_keeps_running_below_its_slo_and_is_not_moved(solver: str) -> None:
    """`preemptible: false`: when its node's measured rate falls below its SLO it keeps serving there
    (rather than be preempted to serve nothing), and a faster free node does not make it move (a move
    stops it while it reloads)."""
    pinned = demand(
        "ns/pinned",
        8,
        preemptible=False,
        priority=100,
        min_decode_tokens_per_second=30.0,
        demand_decode_tokens_per_second=200.0,
    )
    slower = dataclasses.replace(L4, calibration_factor=0.75)  # measured: 28 tok/s, below the SLO of 30
    current = [CurrentPlacement("ns/pinned", "l4-0", 1.0, "stream")]
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    planned = plan([pinned], [slower, H100], current, config=config)
    assert planned.solver == solver, planned.notes
    assert planned.placements["ns/pinned"].node == "l4-0"
    assert planned.actions == ()


@pytest.mark.parametrize("solver", ["milp", "greedy", "auto"])
def test_a_cluster_without_nodes_gives_every_model_a_reason(solver: str) -> None:
    planned = plan([model("ns/a", 1)], [], [], config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    assert planned.placements == {}
    assert [u.model for u in planned.unschedulable] == ["ns/a"]
    assert "no node accepts work" in planned.unschedulable[0].message


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_each_action_only_takes_memory_the_ones_before_it_freed(solver: str) -> None:
    """Two models trade places across full nodes via a third: in the order given, the big model leaves
    the slow node before the small one moves onto it (it was sorted by kind and name only)."""
    from test_planner_properties import assert_every_step_fits

    gone = NodeCapacity("gone", "H100", 16 * GIB, 64 * GIB, 25.0, 2000.0, 25.0, cordoned=True)
    fast = NodeCapacity("fast", "H100", 17 * GIB, 64 * GIB, 6.0, 2000.0, 25.0)
    slow = NodeCapacity("slow", "L4", 16 * GIB, 16 * GIB, 25.0, 300.0, 25.0)
    small = demand(
        "ns/a-small",
        1,
        kv_bytes_per_token=131072,
        max_sequence_length=1024,
        max_batch=4,
        demand_decode_tokens_per_second=1000.0,
    )
    big = demand(
        "ns/b-big",
        16,
        kv_bytes_per_token=32768,
        max_sequence_length=2048,
        max_offload_fraction=0.5,
        demand_decode_tokens_per_second=100.0,
    )
    current = [
        CurrentPlacement("ns/a-small", "gone", 1.0, "stream"),
        CurrentPlacement("ns/b-big", "slow", 1.0, "stream"),
    ]
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    planned = plan([small, big], [gone, fast, slow], current, config=config)
    assert planned.actions
    assert_every_step_fits(planned, [small, big], [gone, fast, slow], current)


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_model_whose_prefills_break_its_slo_is_told_so(solver: str) -> None:
    """Decoding alone would meet the SLO; its own prompt load leaves too little time. The reason says that
    (it used to blame the cost of loading, as if the model would fit and merely waited)."""
    node = NodeCapacity("n0", "H100", 80 * GIB, 256 * GIB, 50.0, 2000.0, 100.0, gpu_tflops=100.0)
    busy = demand(
        "ns/m",
        16,
        min_decode_tokens_per_second=50.0,
        prompt_tokens_per_second=3000.0,
        demand_decode_tokens_per_second=10.0,
    )
    planned = plan([busy], [node], [], config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    (reason,) = planned.unschedulable
    assert reason.reason == "SLOUnreachable"
    assert "prefilling its 3000 prompt tok/s" in reason.message


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_time_a_lower_tier_gives_back_goes_to_a_higher_tier_in_the_same_plan(solver: str) -> None:
    """A pinned low-priority model, half resident, is slow and fills the GPU's time; promoted in its own
    tier it gives most of it back. The high-priority newcomer gets it in this plan (it waited a round)."""
    node = NodeCapacity("n0", "H100", 48 * GIB, 8 * GIB, 50.0, 2000.0, 25.0, reserved_host_bytes=4 * GIB)
    high = demand(
        "ns/hi",
        1,
        kv_bytes_per_token=32768,
        max_sequence_length=1024,
        max_batch=8,
        priority=100,
        min_decode_tokens_per_second=5.0,
        max_offload_fraction=0.5,
        demand_decode_tokens_per_second=1000.0,
    )
    low = demand(
        "ns/lo",
        3,
        max_sequence_length=1024,
        max_batch=8,
        priority=0,
        preemptible=False,
        max_offload_fraction=0.9,
        demand_decode_tokens_per_second=100.0,
        prompt_tokens_per_second=5000.0,
    )
    current = [CurrentPlacement("ns/lo", "n0", 0.5, "stream")]
    planned = plan([high, low], [node], current, config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    assert set(planned.placements) == {"ns/hi", "ns/lo"}, [u.message for u in planned.unschedulable]


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_cached_model_resumes_where_it_is_best_not_merely_where_its_cache_is(solver: str) -> None:
    """Preempted on a small slow node, with a big one free: it loads on the big one at once (it resumed
    on the small one, and the next plan migrated it: two reloads), and the plan after that is empty."""
    big = NodeCapacity("big", "H100", 48 * GIB, 64 * GIB, 25.0, 300.0, 50.0)
    small = NodeCapacity("small", "H100", 8 * GIB, 16 * GIB, 6.0, 300.0, 50.0)
    cached = demand(
        "ns/m",
        8,
        kv_bytes_per_token=32768,
        max_sequence_length=1024,
        max_offload_fraction=0.9,
        demand_decode_tokens_per_second=100.0,
    )
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    first = plan(
        [cached], [big, small], [CurrentPlacement("ns/m", "small", 0.0, "stream", "preempted")], config=config
    )
    assert first.placements["ns/m"].node == "big"
    applied = [
        CurrentPlacement(p.model, p.node, p.resident_fraction, p.mode) for p in first.placements.values()
    ]
    assert plan([cached], [big, small], applied, config=config).actions == ()


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_preemption_never_names_a_lower_priority_model_as_its_reason(solver: str) -> None:
    """A priority-10 model whose SLO is now out of reach is stopped, and a priority-0 model beside it takes
    the memory freed: the reason says the SLO, not 'to make room for' the priority-0 one."""
    node = NodeCapacity("n0", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0)
    high = demand("ns/high", 8, priority=10, min_decode_tokens_per_second=1000.0)
    low = demand("ns/low", 8, priority=0, max_offload_fraction=0.9, demand_decode_tokens_per_second=50.0)
    current = [
        CurrentPlacement("ns/high", "n0", 1.0, "stream"),
        CurrentPlacement("ns/low", "n0", 0.3, "stream"),
    ]
    planned = plan([high, low], [node], current, config=PlannerConfig(solver=solver))  # type: ignore[arg-type]
    stopped = [a for a in planned.actions if a.model == "ns/high"]
    assert stopped and stopped[0].kind == "preempt"
    assert "ns/low" not in stopped[0].reason and "no room meets its SLO" in stopped[0].reason


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_busy_higher_priority_model_takes_room_where_it_serves_best_not_where_room_is_cheapest(
    solver: str,
) -> None:
    # A burst hits a high-priority model whose weights are cached on the fast node. At its least-memory
    # level that meets its SLO, it streams most of its weights and needs more GPU time than any node has;
    # whole, it needs a quarter of the fast GPU. Making room there (one batch model preempted, the pinned
    # model beside it left as it is) beats taking a slow node's cheap room, where it barely meets its SLO.
    def busy(name: str, billions: float, demand: float, **fields: object) -> ModelDemand:
        return dataclasses.replace(
            model(name, billions, **fields),
            max_batch=8,
            demand_decode_tokens_per_second=demand,
            prompt_tokens_per_second=demand * 4,
            typical_prompt_tokens=512,
        )

    fast = NodeCapacity("h100-0", "H100", 80 * GIB, 512 * GIB, 50.0, 2000.0, 120.0, gpu_tflops=750.0)
    slow = NodeCapacity("l4-0", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0, gpu_tflops=121.0)
    slo = {"min_decode_tokens_per_second": 8.0, "max_offload_fraction": 0.75}
    batch = [busy(f"batch/m{i}", 8, demand, priority=10, **slo) for i, demand in enumerate((64, 44, 49, 35))]
    small = busy("batch/small", 3.2, 33, priority=10, **slo)
    pinned = busy("prod/steady", 8, 6, priority=100, preemptible=False, min_decode_tokens_per_second=15.0)
    burst = dataclasses.replace(
        busy("prod/burst", 8, 90, priority=100, preemptible=False, min_decode_tokens_per_second=15.0),
        waiting_requests=6,
    )
    current = [
        *(CurrentPlacement(m.name, "h100-0", 1.0, "stream") for m in (*batch[:3], small, pinned)),
        CurrentPlacement(batch[3].name, "l4-0", 1.0, "stream"),
        CurrentPlacement(burst.name, "h100-0", 0.0, "stream", "preempted"),
    ]
    planned = plan([*batch, small, pinned, burst], [fast, slow], current, config=PlannerConfig(solver=solver))
    assert planned.placements["prod/burst"].node == "h100-0"
    assert planned.placements["prod/steady"].resident_fraction == 1.0
    assert [a.kind for a in planned.actions if a.model == "prod/burst"] == ["resume"]


def _running(
    models: list[ModelDemand], nodes: list[NodeCapacity], config: PlannerConfig
) -> list[CurrentPlacement]:
    """The placements of a first plan, as if carried out."""
    from test_planner_properties import applied

    return applied(plan(models, nodes, [], config=config))


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_model_preempted_for_one_newcomer_stays_when_a_later_one_frees_enough(solver: str) -> None:
    # Four small newcomers of one tier. The first takes the room of the idle small model (least value);
    # the second needs the large one's room, which leaves enough for all: the idle model stays.
    def one(name: str, gb: float, preemptible: bool, **fields: object) -> ModelDemand:
        fields.setdefault("max_sequence_length", 2048)
        return demand(
            name, gb, max_batch=1, preemptible=preemptible, allowed_modes=("stream", "cpu"), **fields
        )

    running = [one("ns/idle", 1, True, demand_decode_tokens_per_second=0.0), one("ns/large", 16, True)]
    running += [one("ns/pinned-0", 1, False), one("ns/pinned-1", 1, False, kv_bytes_per_token=32768)]
    newcomers = [one(f"new/m{i}", 1, False) for i in range(4)]
    node = NodeCapacity("node-0", "H100", 24 * GIB, 16 * GIB, 6.0, 300.0, 25.0)
    config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
    current = _running(running, [node], config)
    assert {c.model for c in current} == {m.name for m in running}
    planned = plan([*running, *newcomers], [node], current, config=config)
    assert all(f"new/m{i}" in planned.placements for i in range(4))
    assert [(a.kind, a.model) for a in planned.actions if a.model.startswith("ns/")] == [
        ("preempt", "ns/large")
    ]


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_a_newcomer_takes_a_lower_tier_s_room_at_a_level_that_leaves_its_own_tier_running(
    solver: str,
) -> None:
    # Half-resident (its least memory) the newcomer needs more of the GPU's time than the idle model of its
    # own tier, whose SLO leaves little to share, allows; whole it needs less, and the lower tier's
    # large model makes the room. The idle model of its tier is not preempted for it. (With strict tiers:
    # where idle models yield, planner/demand.py, the idle one goes first; see test_planner_demand.py.)
    def one(name: str, gb: float, priority: int, preemptible: bool, **fields: object) -> ModelDemand:
        fields.setdefault("allowed_modes", ("stream", "cpu"))
        return demand(name, gb, max_batch=1, priority=priority, preemptible=preemptible, **fields)

    running = [
        one("ns/idle", 8, 10, True, demand_decode_tokens_per_second=0.0, min_decode_tokens_per_second=20.0),
        one("ns/large", 16, 0, True),
    ]
    newcomer = one(
        "new/busy",
        1,
        10,
        False,
        max_offload_fraction=0.5,
        demand_decode_tokens_per_second=10.0,
        allowed_modes=("stream",),
    )
    node = NodeCapacity("node-0", "H100", 24 * GIB, 16 * GIB, 6.0, 300.0, 25.0)
    config = PlannerConfig(solver=solver, idle_models_yield=False)  # type: ignore[arg-type]
    current = _running(running, [node], config)
    assert {c.model for c in current} == {"ns/idle", "ns/large"}
    planned = plan([*running, newcomer], [node], current, config=config)
    assert "new/busy" in planned.placements
    assert "ns/idle" in planned.placements
    assert [(a.kind, a.model) for a in planned.actions if a.model.startswith("ns/")] == [
        ("preempt", "ns/large")
    ]


def test_a_preemption_whose_cache_needs_host_memory_a_promotion_frees_gives_up_its_cache() -> None:
    """Preempting the large model frees the GPU memory the offloaded model's promotion needs, but caching
    its weights needs the host memory that promotion frees: neither can go first with the cache kept, so
    the large model is evicted, and no step over-commits host memory."""
    from test_planner_properties import assert_every_step_fits

    def one(name: str, gb: float, max_batch: int, preemptible: bool, offload: float) -> ModelDemand:
        return demand(
            name,
            gb,
            max_batch=max_batch,
            preemptible=preemptible,
            max_offload_fraction=offload,
            allowed_modes=("stream", "cpu"),
        )

    running = [
        one("ns/offloaded", 8, 1, False, 0.5),
        one("ns/large", 16, 4, True, 0.0),
        *(one(f"ns/small-{i}", 1, 1, False, 0.0) for i in range(2)),
    ]
    newcomer = one("new/small", 1, 1, False, 0.0)
    node = NodeCapacity("node-0", "H100", 24 * GIB, 16 * GIB, 6.0, 300.0, 25.0)
    config = PlannerConfig(solver="greedy")
    current = _running(running, [node], config)
    offloaded = next(c for c in current if c.model == "ns/offloaded")
    assert offloaded.resident_fraction < 1.0 and offloaded.mode == "cpu"
    planned = plan([*running, newcomer], [node], current, config=config)
    assert planned.placements["ns/offloaded"].resident_fraction == 1.0
    assert [(a.kind, a.model) for a in planned.actions if a.model == "ns/large"] == [("evict", "ns/large")]
    assert planned.cached == ()
    assert_every_step_fits(planned, [*running, newcomer], [node], current)


def test_models_trading_places_on_full_nodes_unload_before_they_load() -> None:
    """A high-priority newcomer takes the big model's node; the big model moves to the other node, from
    which a model moves the other way. Neither move fits first as a whole: one of them unloads first and
    loads on its new node once the other has left it."""
    from test_planner_properties import assert_every_step_fits

    def one(name: str, gb: float, priority: int, offload: float, **fields: object) -> ModelDemand:
        fields.setdefault("allowed_modes", ("stream", "cpu"))
        return demand(name, gb, max_batch=1, priority=priority, max_offload_fraction=offload, **fields)

    running = [
        one("ns/model-0", 1, 0, 0.0),
        one("ns/model-1", 1, 0, 0.0),
        one("ns/model-2", 8, 0, 0.0),
        one("ns/model-3", 30, 10, 0.9, allowed_modes=("stream",)),
    ]
    newcomer = one("new/model-0", 8, 100, 0.0)
    nodes = [
        NodeCapacity("node-0", "H100", 16 * GIB, 64 * GIB, 6.0, 300.0, 25.0),
        NodeCapacity("node-1", "H100", 24 * GIB, 16 * GIB, 6.0, 300.0, 25.0),
    ]
    config = PlannerConfig(solver="greedy")
    current = _running(running, nodes, config)
    assert {(c.model, c.node) for c in current} >= {("ns/model-2", "node-0"), ("ns/model-3", "node-1")}
    planned = plan([*running, newcomer], nodes, current, config=config)
    assert planned.placements["new/model-0"].node == "node-1"
    assert planned.placements["ns/model-3"].node == "node-0"
    assert planned.placements["ns/model-2"].node == "node-1"
    steps = [(a.kind, a.model) for a in planned.actions]
    # one of the two goes in halves, around the other's whole migration
    split, whole = next(
        names
        for names in (("ns/model-2", "ns/model-3"), ("ns/model-3", "ns/model-2"))
        if ("evict", names[0]) in steps
    )
    assert steps.index(("evict", split)) < steps.index(("migrate", whole)) < steps.index(("load", split))
    assert_every_step_fits(planned, [*running, newcomer], nodes, current)


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_make_room_counts_only_the_preemptions_it_needs(solver: str) -> None:
    # On x, the least valuable model of the newcomer's tier goes first but frees too little; the large one
    # then frees enough alone. Counted as both, x's room looks dearer than y's (one model worth a little
    # more than the large one): the newcomer would take y's and stop a model for less gain.
    def one(name: str, gb: float, rate: float, **fields: object) -> ModelDemand:
        fields.setdefault("priority", 0)
        return demand(name, gb, max_batch=1, demand_decode_tokens_per_second=rate, **fields)

    x = NodeCapacity("x", "H100", 24 * GIB, 64 * GIB, 6.0, 300.0, 25.0)
    y = dataclasses.replace(x, name="y")
    running = [
        one("ns/a", 1, 1.0),
        one("ns/b", 16, 4.0),
        one("ns/c", 12, 4.5),
        one("ns/d", 8, 1.0, preemptible=False),
    ]
    current = [
        CurrentPlacement("ns/a", "x", 1.0, "stream"),
        CurrentPlacement("ns/b", "x", 1.0, "stream"),
        CurrentPlacement("ns/c", "y", 1.0, "stream"),
        CurrentPlacement("ns/d", "y", 1.0, "stream"),
    ]
    # The greedy's own room-making: a repack (planner/repack.py) finds the MILP's answer instead.
    config = PlannerConfig(solver=solver, repack_rounds=0)  # type: ignore[arg-type]
    assert plan(running, [x, y], current, config=config).actions == ()
    planned = plan([*running, one("ns/new", 10, 40.0)], [x, y], current, config=config)
    assert planned.placements["ns/new"].node == "x"
    assert {"ns/a", "ns/c"} <= set(planned.placements)  # (the MILP even keeps ns/b, on y, by moving ns/c)
    if solver == "greedy":
        assert [(a.kind, a.model) for a in planned.actions if a.model != "ns/new"] == [("preempt", "ns/b")]


def test_a_backlogged_model_is_valued_alike_running_or_not_so_plans_settle() -> None:
    # Six requests wait at an SLO of 20 tok/s: 120 tok/s asked, more than the L4 has beside the pinned
    # models. Its last report (0 tok/s) understates that whether it runs or not; valued at its backlog
    # only while it ran, it was preempted, then resumed on the old figure, then preempted, every round.
    def one(name: str, gb: float, priority: int, **fields: object) -> ModelDemand:
        return demand(name, gb, max_sequence_length=2048, max_batch=8, priority=priority, **fields)

    node = NodeCapacity("l4-0", "L4", 48 * GIB, 256 * GIB, 6.0, 300.0, 25.0, gpu_tflops=750.0)
    models = [
        one(
            "prod/small",
            3,
            100,
            preemptible=False,
            min_decode_tokens_per_second=15.0,
            demand_decode_tokens_per_second=0.0,
        ),
        one(
            "prod/steady",
            8,
            100,
            kv_bytes_per_token=131072,
            min_decode_tokens_per_second=15.0,
            max_offload_fraction=0.9,
            demand_decode_tokens_per_second=5.0,
            prompt_tokens_per_second=20.0,
            allowed_modes=("stream",),
        ),
        one(
            "batch/backlogged",
            8,
            10,
            kv_bytes_per_token=32768,
            min_decode_tokens_per_second=20.0,
            max_offload_fraction=0.0,
            demand_decode_tokens_per_second=0.0,
            waiting_requests=6,
        ),
    ]
    from test_planner_properties import applied

    current = [CurrentPlacement(m.name, "l4-0", 1.0, "stream") for m in models]
    config = PlannerConfig(solver="greedy")
    first = plan(models, [node], current, config=config)
    assert [(a.kind, a.model) for a in first.actions] == [("preempt", "batch/backlogged")]
    assert plan(models, [node], applied(first), config=config).actions == ()


def test_a_busy_model_takes_the_fast_gpu_from_two_quiet_ones_rather_than_a_slow_gpu() -> None:
    # The bandwidth-starved scenario at t=264 s: the busiest model (141 tok/s asked) needs a node. On the
    # H100 room-making first demotes every model there (least loss per byte), which leaves too little
    # GPU time, then preempts them all, least valuable first; only the two quiet 8B models were needed.
    # Counted as all seven, the H100 looked dear, and the model went to the L4 (17.6 tok/s per stream),
    # where it missed most of its SLOs.
    def llama(name: str, billions: float, rate: float, prompt: float, **fields: object) -> ModelDemand:
        layers, kv = {1.2: (16, 32768), 3.2: (28, 114688), 8.0: (32, 131072)}[billions]
        fields.setdefault("min_decode_tokens_per_second", 10.0)
        return demand(
            name,
            2 * billions,
            kv_bytes_per_token=kv,
            max_sequence_length=2048,
            max_batch=8,
            max_offload_fraction=0.75,
            layer_count=layers,
            bytes_per_layer=int(2e9 * billions / layers),
            parameter_count=int(billions * 1e9),
            demand_decode_tokens_per_second=rate,
            prompt_tokens_per_second=prompt,
            typical_prompt_tokens=480,
            **fields,
        )

    h100 = NodeCapacity(
        "h100", "H100-PCIe", 80 * GIB, 512 * GIB, 50.0, 2000.0, 120.0, gpu_tflops=750.0,
        storage_read_gbps=6.0, reserved_gpu_bytes=GIB,
    )  # fmt: skip
    l4 = NodeCapacity(
        "l4", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0, gpu_tflops=121.0, reserved_gpu_bytes=GIB
    )
    on_h100 = [
        llama("apps/llama-1b-2", 1.2, 15.8, 66.6, min_decode_tokens_per_second=25.0),
        *(
            llama(f"apps/llama-3b-{i}", 3.2, rate, prompt, min_decode_tokens_per_second=15.0)
            for i, rate, prompt in ((0, 18.5, 58.8), (1, 16.8, 67.8), (3, 18.6, 64.7))
        ),
        llama("apps/llama-8b-0", 8.0, 58.2, 186.4),
        llama("apps/llama-8b-2", 8.0, 6.9, 31.8),
        llama("apps/llama-8b-5", 8.0, 6.6, 43.0),
    ]
    on_l4 = llama("apps/llama-8b-4", 8.0, 13.1, 25.1)
    busy = llama("apps/llama-8b-3", 8.0, 140.9, 470.8)
    current = [CurrentPlacement(m.name, "h100", 1.0, "stream") for m in on_h100]
    current[-2] = CurrentPlacement("apps/llama-8b-2", "h100", 0.85, "cpu")
    current.append(CurrentPlacement(on_l4.name, "l4", 1.0, "stream"))
    config = PlannerConfig(solver="greedy", amortisation_horizon_seconds=300.0)
    planned = plan([*on_h100, on_l4, busy], [h100, l4], current, config=config)
    assert planned.placements[busy.name].node == "h100"
    preempted = {a.model for a in planned.actions if a.kind in ("preempt", "evict")}
    assert preempted <= {"apps/llama-8b-2", "apps/llama-8b-5"}, preempted


def test_a_cache_ordered_earlier_is_given_up_when_a_later_demotion_and_promotion_block_each_other() -> None:
    """Found by a review's fuzz: on node-1, a/m2's demotion needs host memory a/m7's promotion frees, and
    the promotion needs the GPU memory the demotion frees; the host memory is held by a/m10's cache,
    whose preemption was ordered earlier. That cache is given up (a/m10 is evicted) rather than the
    demotion over-committing host memory."""
    from test_planner_properties import assert_every_step_fits

    def one(
        name: str, gb: float, kv: int, batch: int, priority: int, preemptible: bool, **fields: object
    ) -> ModelDemand:
        fields.setdefault("demand_decode_tokens_per_second", 0.0)
        return demand(
            name,
            gb,
            kv_bytes_per_token=kv,
            max_sequence_length=2048,
            max_batch=batch,
            priority=priority,
            preemptible=preemptible,
            **fields,
        )

    stream, both = ("stream",), ("stream", "cpu")
    models = [
        one("a/m2", 8, 131072, 8, 100, False, max_offload_fraction=0.9, allowed_modes=stream),
        one("a/m4", 1, 131072, 1, 0, True, allowed_modes=both, waiting_requests=3),
        one(
            "a/m5",
            1,
            131072,
            1,
            0,
            False,
            allowed_modes=both,
            min_decode_tokens_per_second=20.0,
            waiting_requests=3,
        ),
        one(
            "a/m7",
            8,
            32768,
            4,
            10,
            False,
            max_offload_fraction=0.9,
            allowed_modes=stream,
            demand_decode_tokens_per_second=50.0,
        ),
        one("a/m8", 3, 131072, 4, 100, True, allowed_modes=both, min_decode_tokens_per_second=5.0),
        one(
            "a/m10",
            8,
            131072,
            4,
            100,
            True,
            max_offload_fraction=0.5,
            allowed_modes=both,
            demand_decode_tokens_per_second=50.0,
        ),
        one(
            "a/m11",
            8,
            0,
            1,
            10,
            True,
            max_offload_fraction=0.5,
            allowed_modes=stream,
            min_decode_tokens_per_second=5.0,
            waiting_requests=3,
        ),
        one(
            "b/m0",
            16,
            131072,
            8,
            100,
            False,
            max_offload_fraction=0.5,
            allowed_modes=both,
            min_decode_tokens_per_second=5.0,
            demand_decode_tokens_per_second=100.0,
        ),
    ]
    nodes = [
        NodeCapacity("node-0", "L4", 16 * GIB, 256 * GIB, 6.0, 2000.0, 100.0),
        NodeCapacity("node-1", "L4", 24 * GIB, 16 * GIB, 25.0, 300.0, 100.0),
    ]
    current = [
        CurrentPlacement("a/m10", "node-1", 0.5, "stream"),
        CurrentPlacement("a/m11", "node-0", 1.0, "stream"),
        CurrentPlacement("a/m2", "node-1", 1.0, "stream"),
        CurrentPlacement("a/m4", "node-1", 1.0, "stream"),
        CurrentPlacement("a/m5", "node-1", 1.0, "stream"),
        CurrentPlacement("a/m7", "node-1", 0.1, "stream"),
        CurrentPlacement("a/m8", "node-0", 1.0, "stream"),
    ]
    planned = plan(models, nodes, current, config=PlannerConfig(solver="greedy"))
    assert ("demote", "a/m2") in [(a.kind, a.model) for a in planned.actions]
    assert_every_step_fits(planned, models, nodes, current)


def test_a_pinned_high_priority_newcomer_gets_room_whose_host_memory_a_demoted_preemption_frees() -> None:
    """Making room on a node with 16 GiB of host memory demotes a model (its offloaded weights take host
    memory) and then preempts it, which frees its demoted footprint, host memory included. That host
    memory was counted with the wrong sign (as taken rather than freed): the node looked too short of
    host memory, and the priority-100 newcomer was left out (found by a fuzz of random clusters)."""

    def one(name: str, gb: float, priority: int, **fields: object) -> ModelDemand:
        fields.setdefault("typical_prompt_tokens", 512)
        return demand(name, gb, max_sequence_length=2048, priority=priority, **fields)

    stream = ("stream",)
    running = [
        one(
            "ns/model-0", 8, 10, kv_bytes_per_token=131072, max_batch=8, min_decode_tokens_per_second=15.0,
            max_offload_fraction=0.9, allowed_modes=stream, waiting_requests=6,
        ),
        one(
            "ns/model-1", 1, 0, kv_bytes_per_token=131072, max_batch=4, preemptible=False,
            min_decode_tokens_per_second=20.0, demand_decode_tokens_per_second=300.0,
            prompt_tokens_per_second=1200.0,
        ),
        one(
            "ns/model-2", 3, 100, max_batch=8, preemptible=False, min_decode_tokens_per_second=5.0,
            max_offload_fraction=0.5, demand_decode_tokens_per_second=10.0, prompt_tokens_per_second=0.0,
        ),
        one(
            "ns/model-3", 1, 10, max_batch=4, min_decode_tokens_per_second=20.0, max_offload_fraction=0.5,
            demand_decode_tokens_per_second=5.0, prompt_tokens_per_second=0.0,
        ),
        one(
            "ns/model-4", 8, 10, kv_bytes_per_token=131072, max_batch=1, min_decode_tokens_per_second=5.0,
            max_offload_fraction=0.9, demand_decode_tokens_per_second=0.0, prompt_tokens_per_second=0.0,
            typical_prompt_tokens=None, allowed_modes=stream,
        ),
    ]  # fmt: skip
    newcomers = [
        one(
            "new/model-0", 8, 10, kv_bytes_per_token=32768, max_batch=4, min_decode_tokens_per_second=20.0,
            max_offload_fraction=0.9, allowed_modes=stream, waiting_requests=3,
        ),
        one(
            "new/model-1", 16, 10, kv_bytes_per_token=32768, max_batch=8, min_decode_tokens_per_second=5.0,
            max_offload_fraction=0.9, allowed_modes=stream, waiting_requests=6,
        ),
        one(
            "new/model-2", 8, 100, max_batch=1, preemptible=False, min_decode_tokens_per_second=8.0,
            max_offload_fraction=0.9, demand_decode_tokens_per_second=0.0, prompt_tokens_per_second=0.0,
        ),
    ]  # fmt: skip
    node = NodeCapacity("node-0", "L4", 24 * GIB, 16 * GIB, 50.0, 2000.0, 25.0, gpu_tflops=121.0)
    current = [CurrentPlacement(m.name, "node-0", 1.0, "stream") for m in running]
    current[-1] = CurrentPlacement("ns/model-4", "node-0", 0.7, "stream")
    # The greedy's own room-making (a repack, planner/repack.py, runs busy models before the idle new/model-2)
    planned = plan(
        [*running, *newcomers], [node], current, config=PlannerConfig(solver="greedy", repack_rounds=0)
    )
    assert "new/model-2" in planned.placements
    assert {"ns/model-1", "ns/model-2"} <= set(planned.placements)  # the pinned ones stay


def fuzzed(
    name: str,
    gb: float,
    kv: int,
    batch: int,
    priority: int,
    preemptible: bool,
    slo: float | None,
    offload: float,
    rate: float | None,
    prompt: float | None,
    modes: tuple[str, ...] = ("stream", "cpu"),
    waiting: int = 0,
    typical: int | None = None,
) -> ModelDemand:
    """A model as the random-cluster fuzz draws them (sequences of 2 048 tokens)."""
    return ModelDemand(
        name=name,
        weight_bytes=int(gb * 1e9),
        kv_bytes_per_token=kv,
        max_sequence_length=2048,
        max_batch=batch,
        priority=priority,
        preemptible=preemptible,
        min_decode_tokens_per_second=slo,
        max_offload_fraction=offload,
        demand_decode_tokens_per_second=rate,
        prompt_tokens_per_second=prompt,
        typical_prompt_tokens=typical,
        allowed_modes=modes,  # type: ignore[arg-type]
        waiting_requests=waiting,
    )


def test_a_model_preempted_early_in_its_tier_round_is_placed_again_when_room_is_left() -> None:
    # A priority-100 newcomer makes room on the H100, preempting a model of its own tier and a tier-10
    # one. Its own tier's model is placed again in that tier's round (on the L4); the tier-10 one then
    # finds room beside it in its own round. Left to the pass after the final promotion, the priority-100
    # model took the room later and the tier-10 one was left out (found by a fuzz of random clusters).
    models = [
        fuzzed("ns/model-0", 3, 0, 1, 100, True, 15.0, 0.9, None, None, ("stream",), waiting=6),
        fuzzed("ns/model-1", 1, 131072, 4, 0, True, None, 0.0, 10.0, 0.0, waiting=6, typical=512),
        fuzzed("ns/model-2", 8, 32768, 4, 0, True, None, 0.9, 100.0, 0.0),
        fuzzed("ns/model-3", 30, 131072, 1, 0, True, 20.0, 0.9, 100.0, 0.0, waiting=6, typical=512),
        fuzzed("ns/model-4", 8, 32768, 4, 100, True, 15.0, 0.9, 10.0, 10.0),
        fuzzed("ns/model-5", 16, 0, 4, 0, True, 20.0, 0.5, 100.0, 400.0, typical=512),
        fuzzed("ns/model-6", 3, 131072, 4, 10, True, 20.0, 0.75, 100.0, 0.0),
        fuzzed("new/model-0", 16, 32768, 1, 100, True, 20.0, 0.5, 300.0, 300.0),
        fuzzed("new/model-1", 30, 32768, 8, 0, False, 5.0, 0.5, 10.0, 40.0, ("stream",), waiting=3),
    ]
    nodes = [
        NodeCapacity("node-0", "H100", 80 * GIB, 256 * GIB, 25.0, 2000.0, 25.0, gpu_tflops=750.0),
        NodeCapacity("node-1", "L4", 24 * GIB, 256 * GIB, 50.0, 300.0, 25.0, gpu_tflops=121.0),
    ]
    running = ("ns/model-0", "ns/model-1", "ns/model-2", "ns/model-4", "ns/model-5", "ns/model-6")
    current = [CurrentPlacement(name, "node-0", 1.0, "stream") for name in running]
    planned = plan(models, nodes, current, config=PlannerConfig(solver="greedy"))
    assert planned.placements["new/model-0"].node == "node-0"
    assert planned.placements["ns/model-4"].node == "node-1"
    assert planned.placements["ns/model-6"].node == "node-1"


def test_a_busy_newcomer_tries_its_best_level_where_its_least_memory_one_needs_its_own_tier_s_room() -> None:
    # At its least memory (40 % resident) the busy pinned newcomer streams most of its weights and needs
    # more of the L4's time than the node can share: room there comes only from its own tier. Whole, it
    # needs far less time, and the model of its tier with requests waiting fits beside it.
    models = [
        fuzzed("ns/model-0", 16, 32768, 8, 100, True, 8.0, 0.75, 5.0, 5.0, waiting=6),
        fuzzed("ns/model-1", 16, 131072, 4, 0, True, None, 0.75, 0.0, 0.0, typical=512),
        fuzzed("new/model-0", 1, 0, 8, 0, True, 20.0, 0.0, 10.0, 40.0, waiting=3),
        fuzzed(
            "new/model-1",
            16,
            131072,
            1,
            100,
            True,
            None,
            0.5,
            300.0,
            0.0,
            ("stream",),
            waiting=3,
            typical=512,
        ),
        fuzzed("new/model-2", 3, 0, 8, 0, False, 5.0, 0.75, 300.0, 1200.0, ("stream",)),
    ]
    nodes = [
        NodeCapacity("node-0", "H100", 16 * GIB, 256 * GIB, 6.0, 2000.0, 25.0, gpu_tflops=121.0),
        NodeCapacity("node-1", "L4", 16 * GIB, 256 * GIB, 6.0, 300.0, 100.0, gpu_tflops=750.0),
        NodeCapacity("node-2", "L4", 16 * GIB, 256 * GIB, 50.0, 300.0, 25.0, gpu_tflops=121.0),
    ]
    current = [
        CurrentPlacement("ns/model-0", "node-0", 1.0, "stream"),
        CurrentPlacement("ns/model-1", "node-2", 0.9, "cpu"),
    ]
    planned = plan(models, nodes, current, config=PlannerConfig(solver="greedy"))
    assert planned.placements["new/model-2"].resident_fraction == 1.0
    assert {"new/model-0", "new/model-1", "new/model-2"} <= set(planned.placements)
