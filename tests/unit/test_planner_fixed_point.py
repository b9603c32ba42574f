"""Examples the property tests drew with random seeds (CI draws the same ones every run), each a plan that
was not a fixed point, an incremental re-plan worth less than a full one, or a plan the validity check
misjudged, kept as plain tests."""

from __future__ import annotations

import dataclasses

from test_planner_incremental import GREEDY, converged, plan_value
from test_planner_properties import applied, as_planned, assert_plan_valid

from residency_operator.planner import GIB, ModelDemand, NodeCapacity, PlannerConfig, plan
from residency_operator.planner.incremental import IncrementalPlanner


def h100(
    name: str,
    gpu_gib: int,
    host_gib: int,
    host_to_device_gbps: float,
    hbm_gbps: float,
    host_gbps: float = 25.0,
) -> NodeCapacity:
    return NodeCapacity(name, "H100", gpu_gib * GIB, host_gib * GIB, host_to_device_gbps, hbm_gbps, host_gbps)


def small(name: str, weight_gb: float, **fields: object) -> ModelDemand:
    return ModelDemand(
        name,
        weight_bytes=int(weight_gb * 1e9),
        kv_bytes_per_token=0,
        max_sequence_length=2048,
        max_batch=1,
        **fields,  # type: ignore[arg-type]
    )


def assert_fixed_point(models: list[ModelDemand], nodes: list[NodeCapacity], config: PlannerConfig) -> None:
    first = plan(models, nodes, [], config=config)
    second = plan(models, nodes, applied(first), config=config)
    assert second.actions == (), [(a.kind, a.model, a.reason) for a in second.actions]
    assert second.placements == first.placements


def test_exact_plan_counts_lower_pinned_time_against_a_higher_models_slo() -> None:
    """Once the pinned models run, their time no longer bars the priority-10 model, but it still takes its
    GPU: a third model that the first plan kept off (the priority-10 model's SLO would break) stays off."""
    models = [
        small("ns/model-0", 1, preemptible=False, demand_decode_tokens_per_second=10.0),
        small("ns/model-1", 8, preemptible=False),
        small("ns/model-2", 16, priority=10, min_decode_tokens_per_second=5.0),
        small("ns/model-3", 8, preemptible=False),
        small("ns/model-4", 3, preemptible=False, demand_decode_tokens_per_second=10.0),
        small("ns/model-5", 3, preemptible=False, demand_decode_tokens_per_second=100.0),
    ]
    assert_fixed_point(models, [h100("node-0", 24, 16, 6.0, 300.0)], PlannerConfig(solver="milp"))


def test_exact_plan_lets_a_higher_tier_pay_a_slower_load_for_a_lower_tier_model() -> None:
    """The priority-10 model serves the same at 50 % or 100 % resident (CPU mode); 50 % loads a little
    faster but takes most of the GPU's time. Holding that few hundredths of a token/s of load cost for its
    tier kept the 30 GB model out, which the next plan (nothing left to load for tier 10) let in."""
    models = [
        dataclasses.replace(
            small("ns/model-0", 16, priority=10, max_offload_fraction=0.5),
            max_batch=4,
            demand_decode_tokens_per_second=10.0,
        ),
        dataclasses.replace(
            small("ns/model-1", 30, demand_decode_tokens_per_second=100.0, allowed_modes=("stream",)),
            max_batch=4,
            kv_bytes_per_token=131072,
        ),
        dataclasses.replace(
            small("ns/model-2", 1, preemptible=False, demand_decode_tokens_per_second=100.0),
            kv_bytes_per_token=32768,
        ),
    ]
    node = h100("node-0", 48, 256, 6.0, 2000.0, 100.0)
    first = plan(models, [node], [], config=PlannerConfig(solver="milp"))
    assert set(first.placements) == {"ns/model-0", "ns/model-1", "ns/model-2"}
    assert_fixed_point(models, [node], PlannerConfig(solver="milp"))


def test_greedy_plan_moves_a_newcomer_to_the_node_its_demand_needs_once_promotions_free_it() -> None:
    """model-1 is admitted at 10 % resident on the fast node (most of its time), so model-0 goes to the slow
    one; the tier's promotion then gives the fast node's time back. The plan moves model-0 there itself, as
    the next plan would (a migration right after its first load)."""
    models = [
        small("ns/model-0", 8, demand_decode_tokens_per_second=100.0),
        dataclasses.replace(
            small(
                "ns/model-1",
                1,
                preemptible=False,
                max_offload_fraction=0.9,
                demand_decode_tokens_per_second=100.0,
            ),
            max_batch=4,
        ),
        small("ns/model-2", 1, preemptible=False),
        small("ns/model-3", 8, priority=10, preemptible=False, demand_decode_tokens_per_second=100.0),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0), h100("node-1", 24, 16, 6.0, 2000.0, 100.0)]
    first = plan(models, nodes, [], config=PlannerConfig(solver="greedy"))
    assert first.placements["ns/model-0"].node == "node-1"
    assert_fixed_point(models, nodes, PlannerConfig(solver="greedy"))


def test_two_pinned_models_that_crowd_each_other_both_keep_running() -> None:
    """A pinned model's demand grows until its neighbour's SLO no longer tolerates it: neither may be
    preempted or moved for GPU time (``preemptible: false``), so both stay, the full plan and the incremental
    one alike; the validity check counts a pinned neighbour's time of at most its priority as given."""
    config = PlannerConfig(solver="greedy", repack_rounds=0)
    models = [
        small("ns/model-0", 1, preemptible=False),
        small("ns/model-1", 1, preemptible=False, min_decode_tokens_per_second=20.0),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0)]
    steady = plan(models, nodes, [], config=config)
    planner = IncrementalPlanner(models, nodes, applied(steady), config=config)
    busy = dataclasses.replace(models[0], demand_decode_tokens_per_second=1000.0)
    incremental = planner.update_model(busy)
    full = plan([busy, models[1]], nodes, applied(steady), config=config)
    assert set(incremental.placements) == set(full.placements) == {"ns/model-0", "ns/model-1"}
    assert incremental.placements["ns/model-0"].gpu_busy_fraction > 0.9
    assert_plan_valid(incremental, [busy, models[1]], nodes, config, busy_limit=1.0, current=applied(steady))
    assert_plan_valid(full, [busy, models[1]], nodes, config, busy_limit=1.0, current=applied(steady))


def assert_incremental_as_good_as_full(
    models: list[ModelDemand], nodes: list[NodeCapacity], changed: ModelDemand
) -> None:
    """From the steady state, the incremental re-plan after ``changed`` is worth what a full re-plan is."""
    steady = converged(models, nodes)
    planner = IncrementalPlanner(models, nodes, applied(steady), config=GREEDY)
    after = [changed if m.name == changed.name else m for m in models]
    incremental = planner.update_model(changed)
    full = plan(after, nodes, applied(steady), config=GREEDY)
    assert_plan_valid(incremental, after, nodes, GREEDY, busy_limit=1.0, current=applied(steady))
    assert plan_value(incremental, after, nodes) >= plan_value(full, after, nodes) - 1e-6, (
        sorted(incremental.placements),
        sorted(full.placements),
    )


def test_incremental_relocates_a_model_into_the_room_a_removed_one_left() -> None:
    """The pinned model on the fast node is deleted: the busy model on the slow node moves there, as the
    full plan's relocation moves it (the incremental planner only looked at the deleted model)."""
    models = [
        dataclasses.replace(small("ns/model-0", 8, preemptible=False), kv_bytes_per_token=32768),
        dataclasses.replace(
            small("ns/model-1", 8, demand_decode_tokens_per_second=100.0), kv_bytes_per_token=32768
        ),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0), h100("node-1", 16, 16, 6.0, 2000.0)]
    assert_incremental_as_good_as_full(models, nodes, dataclasses.replace(models[0], wanted=False))


def test_incremental_relocates_a_model_when_making_room_became_worth_it() -> None:
    """model-1's demand becomes known and small: the busy model-3 on the slow node is now worth swapping
    with it onto the fast node, as the full plan does."""
    models = [
        small("ns/model-0", 1, preemptible=False),
        small("ns/model-1", 16),
        small("ns/model-2", 1, preemptible=False),
        small("ns/model-3", 16, demand_decode_tokens_per_second=100.0),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0), h100("node-1", 24, 16, 6.0, 2000.0)]
    assert_incremental_as_good_as_full(
        models, nodes, dataclasses.replace(models[1], demand_decode_tokens_per_second=10.0)
    )


def test_incremental_promotes_a_model_that_became_busy_over_an_idle_one() -> None:
    """The pinned model was idle and demoted to 85 %; its demand returns: it takes back its node's memory
    from the idle model beside it (the tier promotion a full plan makes)."""
    models = [
        small("ns/model-0", 1, demand_decode_tokens_per_second=0.0),
        small(
            "ns/model-1", 16, preemptible=False, max_offload_fraction=0.5, demand_decode_tokens_per_second=0.0
        ),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0)]
    assert_incremental_as_good_as_full(
        models, nodes, dataclasses.replace(models[1], demand_decode_tokens_per_second=10.0)
    )


def test_incremental_replans_all_when_a_priority_widens_past_the_idle_offset() -> None:
    """An idle model's priority is raised past the span idle models were moved down by: the full plan keeps
    it below every busy model, which the incremental planner's kept offset could not; it plans afresh."""
    models = [
        small("ns/model-0", 1, preemptible=False),
        small("ns/model-1", 1, preemptible=False),
        small("ns/model-2", 16, preemptible=False, demand_decode_tokens_per_second=0.0),
        small("ns/model-3", 1, preemptible=False),
        small("ns/model-4", 16, priority=10),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0)]
    assert_incremental_as_good_as_full(models, nodes, dataclasses.replace(models[2], priority=100))


def test_incremental_promotes_a_higher_tier_before_admitting_a_lower_one_into_freed_room() -> None:
    """A model beside a demoted pinned one is deleted: the pinned one (busy, priority 0) takes the room back
    before the idle model (yielded below it) is admitted into it, as a full plan promotes each tier before
    admitting the next."""
    models = [
        small("ns/model-0", 1, preemptible=False, demand_decode_tokens_per_second=0.0),
        small("ns/model-1", 16, preemptible=False, max_offload_fraction=0.5),
        small("ns/model-2", 1, preemptible=False),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0)]
    assert_incremental_as_good_as_full(models, nodes, dataclasses.replace(models[2], wanted=False))


def test_exact_plan_counts_a_higher_models_time_against_a_running_pinned_models_slo() -> None:
    """Once model-0 (pinned, SLO 5) runs, the priority-100 model's time beside it must not bar that model,
    but still takes model-0's GPU: model-1, which the first plan kept off for model-0's SLO, stays off."""
    models = [
        dataclasses.replace(
            small(
                "ns/model-0",
                16,
                priority=10,
                preemptible=False,
                min_decode_tokens_per_second=5.0,
                max_offload_fraction=0.9,
                allowed_modes=("stream",),
            ),
            max_batch=4,
        ),
        dataclasses.replace(small("ns/model-1", 30, demand_decode_tokens_per_second=10.0), max_batch=4),
        dataclasses.replace(
            small(
                "ns/model-2",
                1,
                priority=100,
                max_offload_fraction=0.5,
                demand_decode_tokens_per_second=100.0,
                allowed_modes=("stream",),
            ),
            max_batch=4,
            kv_bytes_per_token=131072,
        ),
    ]
    assert_fixed_point(models, [h100("node-0", 48, 256, 50.0, 300.0)], PlannerConfig(solver="milp"))


def test_exact_plan_counts_a_higher_pinned_models_time_against_a_running_pinned_models_slo() -> None:
    """The same with the priority-10 neighbour pinned too: its time is given to model-0's tolerance."""
    models = [
        small("ns/model-0", 16, preemptible=False, min_decode_tokens_per_second=20.0),
        small("ns/model-1", 16, preemptible=False, demand_decode_tokens_per_second=10.0),
        small("ns/model-2", 1, preemptible=False),
        small("ns/model-3", 3, preemptible=False, demand_decode_tokens_per_second=100.0),
        small("ns/model-4", 1, preemptible=False),
        small("ns/model-5", 30, priority=10, preemptible=False, demand_decode_tokens_per_second=100.0),
    ]
    nodes = [h100("node-0", 16, 16, 6.0, 300.0), h100("node-1", 80, 16, 6.0, 2000.0)]
    assert_fixed_point(models, nodes, PlannerConfig(solver="milp"))


def test_idle_pinned_model_without_room_for_its_host_copy_keeps_its_gpu_and_is_judged_pinned() -> None:
    """Issue 26 (``test_no_priority_inversion_and_non_preemptible_kept``, ``--hypothesis-seed=15``). Model-0
    is pinned, idle and holds 30 GB of node-1's GPU. Node-1's 16 GiB of host memory cannot hold its copy, so
    it keeps its GPU (docs/planner.md, guarantee 2) and is planned pinned at its yielded priority: busy
    newcomers of its declared priority may take the GPU time its SLO would have kept (while it is idle they
    rank above it). The validity check used to judge it as a preemptible model whose SLO bars them. With
    room for its copy it is planned as a preemptible one: its SLO is kept, or it leaves the GPU with its copy
    in node-1's host memory."""

    def pinned(name: str, weight_gb: float, **fields: object) -> ModelDemand:
        return small(name, weight_gb, preemptible=False, **fields)

    models = [
        pinned("ns/model-0", 30, min_decode_tokens_per_second=5.0, demand_decode_tokens_per_second=0.0),
        pinned("ns/model-1", 1),
    ]
    everyone = [
        *models,
        pinned("new/model-0", 1),
        pinned("new/model-1", 8),
        pinned("new/model-2", 8, demand_decode_tokens_per_second=100.0),
    ]
    for host_gib in (16, 64):
        nodes = [h100("node-0", 16, 16, 6.0, 300.0), h100("node-1", 48, host_gib, 6.0, 300.0)]
        for solver in ("milp", "greedy"):
            config = PlannerConfig(solver=solver)  # type: ignore[arg-type]
            first = plan(models, nodes, [], config=config)
            assert first.placements["ns/model-0"].node == "node-1"
            second = plan(everyone, nodes, applied(first), config=config)
            assert_plan_valid(second, everyone, nodes, config, current=applied(first))
            seen_as = as_planned(everyone, nodes, applied(first), config)["ns/model-0"]
            kept = second.placements.get("ns/model-0")
            cached = [(c.model, c.node) for c in second.cached]
            if host_gib == 16:
                assert not seen_as.preemptible and seen_as.priority < 0
                assert kept is not None and (kept.node, kept.resident_fraction) == ("node-1", 1.0)
            else:
                assert seen_as.preemptible and seen_as.host_copy_kept
                assert kept is not None or cached == [("ns/model-0", "node-1")]
