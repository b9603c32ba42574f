"""A model with requests waiting takes the GPU memory of idle models (planner/swapin.py), only theirs."""

from __future__ import annotations

import dataclasses

from test_planner_plan import model as planner_model

from residency_operator.planner import GIB, CurrentPlacement, ModelDemand, NodeCapacity, PlannerConfig, plan
from residency_operator.planner.types import Plan
from residency_operator.simulator.engine import fair_shares

L4 = NodeCapacity("l4-0", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0)


def model(name: str, billions: float, demand: float, **fields: object) -> ModelDemand:
    """A model of ``billions`` parameters with an SLO of 15 tok/s and ``demand`` tok/s asked of it."""
    return planner_model(
        name, billions, min_decode_tokens_per_second=15.0, demand_decode_tokens_per_second=demand, **fields
    )


OLD = model("ns/old", 8, demand=10.0)
# Not running, a model is worth what its waiting requests ask (one at its SLO: 15 tok/s), as the operator
# values it (inputs.planner_inputs) and the planner counts it (types.with_backlog).
NEW = model("ns/new", 8, demand=15.0)
OLD_IDLE = CurrentPlacement("ns/old", "l4-0", 1.0, "stream", "idle")
# The solvers keep an incumbent unless a change gains more than half its value: worth 10 tok/s, the old
# model stays for one worth 15, so what happens to the waiting model is the swap-in pass's doing. (Idle
# means no request for the last ten seconds; its demand is the last minute's.)
STICKY = PlannerConfig(hysteresis_fraction=0.5)


def swap(old: ModelDemand = OLD, new: ModelDemand = NEW, *others: ModelDemand, **current: object) -> Plan:
    placements = [dataclasses.replace(OLD_IDLE, **current)]  # type: ignore[arg-type]
    placements += [CurrentPlacement(o.name, "l4-0", 1.0, "stream", "loaded") for o in others]
    return plan([old, new, *others], [L4], placements, config=STICKY)


def test_without_waiting_requests_the_incumbent_stays() -> None:
    planned = swap()
    assert set(planned.placements) == {"ns/old"}
    assert not planned.actions


def test_a_waiting_model_takes_the_memory_of_an_idle_one_that_keeps_its_weights_in_host_memory() -> None:
    planned = swap(OLD, dataclasses.replace(NEW, waiting_requests=1))
    assert set(planned.placements) == {"ns/new"}
    assert planned.placements["ns/new"].meets_slo
    assert [(a.kind, a.model) for a in planned.actions] == [("preempt", "ns/old"), ("load", "ns/new")]
    assert [c.model for c in planned.cached] == ["ns/old"]
    (reason,) = planned.unschedulable
    assert reason.model == "ns/old" and reason.reason == "PreemptedWhileIdle"
    assert reason.message.startswith("idle, so it gave way to ns/new (1 request(s) waiting); weights stay")
    assert any("requests waiting" in note for note in planned.notes)


def test_a_busy_model_never_gives_way() -> None:
    planned = swap(OLD, dataclasses.replace(NEW, waiting_requests=1), state="loaded")
    assert set(planned.placements) == {"ns/old"}


def test_an_idle_model_of_any_priority_gives_way_a_non_preemptible_one_keeping_its_host_copy() -> None:
    waiting = dataclasses.replace(NEW, waiting_requests=1)
    # priority orders demand, not memory: an idle higher-priority model gives way to a busy lower one
    assert set(swap(dataclasses.replace(OLD, priority=10), waiting).placements) == {"ns/new"}
    # a pinned one too (quiet for the idle interval, its last minute's demand not yet zero), its weights and
    # KV cache kept in host memory set aside for it
    pinned = dataclasses.replace(OLD, preemptible=False, priority=10)
    gave_way = swap(pinned, waiting)
    assert set(gave_way.placements) == {"ns/new"} and [c.model for c in gave_way.cached] == ["ns/old"]
    # never where its node's host memory could not keep that copy, nor under the older rule
    no_host = dataclasses.replace(L4, host_memory_bytes=8 * GIB)
    assert set(plan([pinned, waiting], [no_host], [OLD_IDLE], config=STICKY).placements) == {"ns/old"}
    older = dataclasses.replace(STICKY, idle_pinned_models_leave_gpu=False)
    assert set(plan([pinned, waiting], [L4], [OLD_IDLE], config=older).placements) == {"ns/old"}
    # the same priority, or a lower one, gives way
    raised = dataclasses.replace(waiting, priority=10)
    assert set(swap(OLD, raised).placements) == {"ns/new"}
    # the older rule, kept behind a switch: never for a lower priority
    strict = dataclasses.replace(STICKY, idle_gives_way_to_any_priority=False)
    kept = plan([dataclasses.replace(OLD, priority=10), waiting], [L4], [OLD_IDLE], config=strict)
    assert set(kept.placements) == {"ns/old"}


def test_an_idle_model_that_gave_way_comes_back_at_its_priority_with_its_next_request() -> None:
    # it gave way to a busy lower-priority model and sits in host memory; a request for it now waits
    waiting = dataclasses.replace(NEW, waiting_requests=1)
    gave_way = swap(dataclasses.replace(OLD, priority=10), waiting)
    assert set(gave_way.placements) == {"ns/new"}
    busy_new = dataclasses.replace(NEW, demand_decode_tokens_per_second=20.0, has_served=True)
    back = dataclasses.replace(OLD, priority=10, waiting_requests=1)
    current = [
        CurrentPlacement("ns/new", "l4-0", 1.0, "stream", "loaded"),
        CurrentPlacement("ns/old", "l4-0", 0.0, "stream", "preempted"),
    ]
    planned = plan([back, busy_new], [L4], current, config=STICKY)
    assert "ns/old" in planned.placements
    assert [a.kind for a in planned.actions if a.model == "ns/old"] == ["resume"]


def test_the_least_valuable_idle_model_gives_way_and_only_as_many_as_needed() -> None:
    # an 8B and two 1B models fill the L4; a waiting 1B model needs the room of one 1B model
    tiny = [model("ns/tiny-0", 1, demand=6.0), model("ns/tiny-1", 1, demand=9.0)]
    current = [CurrentPlacement(t.name, "l4-0", 1.0, "stream", "idle") for t in tiny] + [OLD_IDLE]
    old = dataclasses.replace(OLD, demand_decode_tokens_per_second=12.0)
    waiting = model("ns/new", 1, demand=1.0, waiting_requests=1)
    planned = plan([*tiny, old, waiting], [L4], current, config=STICKY)
    assert set(planned.placements) == {"ns/new", "ns/tiny-1", "ns/old"}
    assert [(u.model, u.reason) for u in planned.unschedulable] == [("ns/tiny-0", "PreemptedWhileIdle")]


def test_nothing_is_swapped_onto_a_node_whose_running_models_have_requests_queued() -> None:
    # its SLO is slow enough that its backlog asks no more than its measured rate (a running model's demand
    # counts at least its backlog, which would change how much of the GPU's time it needs)
    hot = dataclasses.replace(
        model("ns/hot", 1, demand=1.0, waiting_requests=3), min_decode_tokens_per_second=0.3
    )
    waiting = dataclasses.replace(NEW, waiting_requests=1)
    planned = swap(OLD, waiting, hot)
    assert set(planned.placements) == {"ns/old", "ns/hot"}
    calm = dataclasses.replace(hot, waiting_requests=0)
    assert set(swap(OLD, waiting, calm).placements) == {"ns/new", "ns/hot"}


def test_no_swap_when_the_idle_model_could_not_keep_its_weights_in_host_memory() -> None:
    small_host = dataclasses.replace(L4, host_memory_bytes=12 * GIB)
    waiting = dataclasses.replace(NEW, waiting_requests=1)
    planned = plan([OLD, waiting], [small_host], [OLD_IDLE], config=STICKY)
    assert set(planned.placements) == {"ns/old"}


def test_fair_shares_give_nobody_more_than_it_wants_and_split_the_rest_equally() -> None:
    assert fair_shares([0.1, 1.0, 1.0], 0.5) == [0.1, 0.2, 0.2]
    assert fair_shares([0.1, 0.1], 0.5) == [0.1, 0.1]
    assert fair_shares([], 0.5) == []
    shares = fair_shares([0.3, 0.05, 2.0, 0.2], 0.5)
    assert abs(sum(shares) - 0.5) < 1e-12 and shares[1] == 0.05 and shares[2] == max(shares)


def test_the_waiting_model_keeps_its_own_slo_beside_the_models_that_stay() -> None:
    # an 8B model asking 17 tok/s of an L4 that gives it 18.1 alone tolerates ~6 % of the GPU's time
    # taken by others: beside a small model using 6.7 % it would miss its SLO, beside one using 0.7 % not
    # (the idle model's own SLO is loose: it does not limit the time here)
    waiting = dataclasses.replace(NEW, waiting_requests=1, min_decode_tokens_per_second=17.0)
    old = dataclasses.replace(OLD, min_decode_tokens_per_second=1.0)
    running = CurrentPlacement("ns/hot", "l4-0", 1.0, "stream", "loaded")
    busy = plan([old, waiting, model("ns/hot", 2, demand=5.0)], [L4], [OLD_IDLE, running], config=STICKY)
    assert set(busy.placements) == {"ns/old", "ns/hot"}
    quiet = plan([old, waiting, model("ns/hot", 2, demand=0.5)], [L4], [OLD_IDLE, running], config=STICKY)
    assert set(quiet.placements) == {"ns/new", "ns/hot"}


def test_waiting_requests_with_no_node_at_all_are_unschedulable_not_a_crash() -> None:
    (reason,) = plan([dataclasses.replace(NEW, waiting_requests=1)], [], []).unschedulable
    assert reason.reason == "NoSchedulableNode"
