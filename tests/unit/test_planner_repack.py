"""Repacking several models at once (planner/repack.py): where no single move makes room, a small
neighbourhood is re-solved exactly, so that moving one model lets a left-out one run."""

from __future__ import annotations

import dataclasses

from test_planner_plan import demand
from test_planner_properties import assert_every_step_fits, assert_plan_valid

from residency_operator.planner import GIB, CurrentPlacement, ModelDemand, NodeCapacity, PlannerConfig, plan

X = NodeCapacity("x", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0)
Y = dataclasses.replace(X, name="y")
GREEDY = PlannerConfig(solver="greedy", repack_rounds=2)


def whole(name: str, gb: float, **fields: object) -> ModelDemand:
    """A model that runs only whole (no offload), asked 10 tok/s, of the same priority as the others."""
    fields.setdefault("demand_decode_tokens_per_second", 10.0)
    return demand(name, gb, max_batch=4, max_offload_fraction=0.0, min_decode_tokens_per_second=5.0, **fields)


# Footprints with the 0.5 GiB workspace: x holds a (10.5 GB) and s (6.5 GB), 8.8 GB free; y holds b (12.5
# GB), 13.3 GB free. The newcomer n (14.5 GB) fits neither, but fits x once s moves to y.
RUNNING = [whole("ns/a", 10), whole("ns/s", 6), whole("ns/b", 12)]
CURRENT = [
    CurrentPlacement("ns/a", "x", 1.0, "stream"),
    CurrentPlacement("ns/s", "x", 1.0, "stream"),
    CurrentPlacement("ns/b", "y", 1.0, "stream"),
]
NEWCOMER = whole("ns/n", 14, waiting_requests=4, demand_decode_tokens_per_second=30.0)


def test_single_moves_cannot_make_room_so_the_neighbourhood_is_repacked() -> None:
    models = [*RUNNING, NEWCOMER]
    without = plan(models, [X, Y], CURRENT, config=dataclasses.replace(GREEDY, repack_rounds=0))
    assert "ns/n" not in without.placements, "the greedy alone would have made room: no test of the repack"

    planned = plan(models, [X, Y], CURRENT, config=GREEDY)
    assert planned.placements["ns/n"].node == "x"
    # One model moves to y (a: 10.5 GB beside b; the exact solver's choice), so that n fits on x.
    (moved,) = [a.model for a in planned.actions if a.kind == "migrate"]
    assert moved in ("ns/a", "ns/s") and planned.placements[moved].node == "y"
    assert [a.kind for a in planned.actions] == ["migrate", "load"]
    # The same answer as the exact solver over the whole fleet.
    exact = plan(models, [X, Y], CURRENT, config=PlannerConfig(solver="milp"))
    assert {n: (p.node, p.resident_fraction) for n, p in planned.placements.items()} == {
        n: (p.node, p.resident_fraction) for n, p in exact.placements.items()
    }
    assert any("repacked" in note for note in planned.notes)
    assert_plan_valid(planned, models, [X, Y], GREEDY, busy_limit=1.0, current=CURRENT)
    assert_every_step_fits(planned, models, [X, Y], CURRENT)
    # Deterministic, and settled: applied, the next plan changes nothing.
    assert (
        plan(models, [X, Y], CURRENT, config=GREEDY)
        == dataclasses.replace(planned, solve_seconds=planned.solve_seconds)
        or plan(models, [X, Y], CURRENT, config=GREEDY).placements == planned.placements
    )
    applied = [
        CurrentPlacement(p.model, p.node, p.resident_fraction, p.mode) for p in planned.placements.values()
    ]
    assert plan(models, [X, Y], applied, config=GREEDY).actions == ()


def test_a_repack_never_costs_a_higher_tier_nor_moves_a_pinned_model() -> None:
    # s is pinned (preemptible: false): it may not move; b is of a higher tier: it loses nothing. (a may
    # still move beside b, so that n runs.)
    pinned = [whole("ns/a", 10), whole("ns/s", 6, preemptible=False), whole("ns/b", 12, priority=10)]
    planned = plan([*pinned, NEWCOMER], [X, Y], CURRENT, config=GREEDY)
    assert planned.placements["ns/s"].node == "x"
    assert planned.placements["ns/b"].node == "y"
    assert planned.placements["ns/b"].resident_fraction == 1.0
    assert not [a for a in planned.actions if a.model in ("ns/s", "ns/b")]
