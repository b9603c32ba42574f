"""The planner reshuffles no seats it does not need to: a model released earlier in a plan, or preempted and
cached on a node, goes back to its own node where room allows there (planner/admission.py), and running
models are not moved off their node for a small overclaim of its estimated GPU time where
``PlannerConfig.incumbent_time_slack`` allows it (greedy_base.py; off by default)."""

from __future__ import annotations

import dataclasses

from test_planner_plan import model

from residency_operator.planner import GIB, CurrentPlacement, ModelDemand, NodeCapacity, PlannerConfig, plan
from residency_operator.planner.options import evaluate_option
from residency_operator.planner.predictor import Predictor

GREEDY = PlannerConfig(solver="greedy")


def l4(name: str, gpu_gib: float = 24) -> NodeCapacity:
    return NodeCapacity(name, "L4", int(gpu_gib * GIB), 128 * GIB, 25.0, 300.0, 60.0)


def test_a_model_cached_on_its_node_resumes_there_at_a_lower_residency_rather_than_load_elsewhere() -> None:
    # ns/back (16 GB) was preempted on l4-a, where ns/stay now leaves room for about half of it; l4-b is
    # empty. Served as well either way (its SLO is met at half residency, and its demand is small), it
    # resumes on its own node from host memory instead of a cold load on the other.
    back = model(
        "ns/back",
        8,
        demand_decode_tokens_per_second=1.0,
        min_decode_tokens_per_second=2.0,
        waiting_requests=1,
        max_offload_fraction=0.7,
    )
    stay = model("ns/stay", 6, demand_decode_tokens_per_second=5.0, min_decode_tokens_per_second=2.0)
    current = [
        CurrentPlacement("ns/back", "l4-a", 1.0, "stream", "preempted"),
        CurrentPlacement("ns/stay", "l4-a", 1.0, "stream", "loaded"),
    ]
    planned = plan([back, stay], [l4("l4-a"), l4("l4-b")], current, config=GREEDY)
    placement = planned.placements["ns/back"]
    assert placement.node == "l4-a"
    assert placement.resident_fraction < 1.0 and placement.meets_slo
    assert [(a.kind, a.model) for a in planned.actions] == [("resume", "ns/back")]
    # With room for its target residency nowhere but the other node and a node of its own too full for any
    # level, it still loads there (going home is a preference, not a rule).
    crowded = [dataclasses.replace(current[1], resident_fraction=1.0)]
    big_stay = dataclasses.replace(stay, weight_bytes=int(20e9))
    planned = plan([back, big_stay], [l4("l4-a"), l4("l4-b")], current[:1] + crowded, config=GREEDY)
    assert planned.placements["ns/back"].node == "l4-b"


def demand_for_busy(name: str, node: NodeCapacity, busy: float, **fields: object) -> ModelDemand:
    """A model whose estimated share of ``node``'s GPU time, fully resident, is ``busy``: its demand found
    by bisection on the planner's own estimate."""
    low, high = 0.0, 10_000.0
    for _ in range(60):
        middle = (low + high) / 2
        candidate = model(name, 3, demand_decode_tokens_per_second=middle, **fields)
        option = evaluate_option(Predictor(()), candidate, node, 1.0, "stream", GREEDY)
        low, high = (middle, high) if option.busy_fraction < busy else (low, middle)
    return model(name, 3, demand_decode_tokens_per_second=low, **fields)


def test_running_models_stay_through_a_small_overclaim_of_gpu_time_and_move_past_it() -> None:
    # Two models on l4-a whose estimated GPU time adds up to a little more than the GPU has: an estimate
    # from the last minute's demand. Within PlannerConfig.incumbent_time_slack both stay (a move is a cold
    # load elsewhere); well past it, the lower priority one moves to the empty l4-b.
    nodes = [l4("l4-a"), l4("l4-b")]
    slack = dataclasses.replace(GREEDY, incumbent_time_slack=0.1)
    for total, moves in ((1.05, False), (1.3, True)):
        high = demand_for_busy("ns/high", nodes[0], total / 2, priority=10, min_decode_tokens_per_second=1.0)
        low = demand_for_busy("ns/low", nodes[0], total / 2, priority=0, min_decode_tokens_per_second=1.0)
        current = [CurrentPlacement(m.name, "l4-a", 1.0, "stream", "loaded") for m in (high, low)]
        planned = plan([high, low], nodes, current, config=slack)
        assert planned.placements["ns/high"].node == "l4-a"
        assert planned.placements["ns/low"].node == ("l4-b" if moves else "l4-a"), total
        # Without the slack (the default) the small overclaim moves it too.
        assert plan([high, low], nodes, current, config=GREEDY).placements["ns/low"].node == "l4-b"
