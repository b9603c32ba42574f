"""Planner inputs kept per model between rounds (inputs.ModelRows): reused while a model's objects stay,
made again when they change, and what depends on the time read at every round."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from test_operator_state import NOW, knobs, llm, loaded, node, profile, run, stamp

from conftest import MakeDir
from residency_operator.inputs import ModelRows, planner_inputs
from residency_operator.state import WAKE_ANNOTATION, ClusterState, OperatorKnobs


def same_as_fresh(state: ClusterState, rows: ModelRows, at: Any, k: OperatorKnobs) -> Any:
    """The inputs with rows kept from earlier rounds, checked against inputs made from nothing."""
    kept = planner_inputs(state, at, k, rows=rows)
    fresh = planner_inputs(state, at, k)
    assert (kept.demands, kept.nodes, kept.current, kept.idle) == (
        fresh.demands,
        fresh.nodes,
        fresh.current,
        fresh.idle,
    )
    return kept


def fleet(tmp_path: Path, make_model_dir: MakeDir) -> tuple[ClusterState, list[dict[str, Any]]]:
    models = [llm(n, make_model_dir(n, params=20_000)) for n in ("a", "b", "c")]
    state = ClusterState(models, [profile("n1", 10**8)], [node("n1")], [])
    _, _, desired = run(state, tmp_path)
    quiet = stamp(NOW - timedelta(seconds=5))
    placements = [loaded(p, lastActiveTime=quiet, queuedRequests=0) for p in desired.values()]
    return ClusterState(models, state.node_profiles, state.nodes, placements), models


def test_a_row_is_reused_while_its_objects_stay_and_made_again_for_a_new_version(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    state, models = fleet(tmp_path, make_model_dir)
    rows, k = ModelRows(), knobs(tmp_path)
    same_as_fresh(state, rows, NOW, k)
    assert rows.made == 3
    same_as_fresh(state, rows, NOW, k)
    assert rows.made == 3  # nothing changed: nothing made again
    # a new version of b (a new object, as the informer stores it): only b is made again
    b = models[1]
    state.models[1] = {
        **b,
        "metadata": {**b["metadata"], "generation": 2},
        "spec": {**b["spec"], "priority": 7},
    }
    inputs = same_as_fresh(state, rows, NOW, k)
    assert rows.made == 4
    assert {d.name: d.priority for d in inputs.demands} == {"team-a/a": 0, "team-a/b": 7, "team-a/c": 0}
    # the worker reports on c's placement: c is made again, and its report is read
    c = state.placements[2]
    state.placements[2] = {**c, "status": {**c["status"], "state": "Failed", "reason": "LoadFailed"}}
    inputs = same_as_fresh(state, rows, NOW, k)
    assert rows.made == 5 and "team-a/c" not in {p.model for p in inputs.current}
    # a part replaced in place (a test's fake API does; the informers never do) is seen too
    state.placements[2]["status"] = {**c["status"]}
    inputs = same_as_fresh(state, rows, NOW, k)
    assert rows.made == 6 and "team-a/c" in {p.model for p in inputs.current}
    # a model gone takes its row with it
    a = state.models.pop(0)
    same_as_fresh(state, rows, NOW, k)
    assert rows.made == 6
    state.models.insert(0, a)
    same_as_fresh(state, rows, NOW, k)
    assert rows.made == 7


def test_what_depends_on_the_time_is_read_every_round_from_kept_rows(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    state, models = fleet(tmp_path, make_model_dir)
    rows, k = ModelRows(), knobs(tmp_path)
    # loaded and asked for 5 s ago: busy now, idle 10 s later (the same objects, the same rows)
    inputs = same_as_fresh(state, rows, NOW, k)
    assert [c.state for c in inputs.current] == ["loaded"] * 3
    inputs = same_as_fresh(state, rows, NOW + timedelta(seconds=6), k)
    assert [c.state for c in inputs.current] == ["idle"] * 3
    assert rows.made == 3
    # a model that does not run, that the router asked for 5 s ago, has a request waiting; 40 s on, none
    a = models[0]
    asked = {
        **a,
        "metadata": {**a["metadata"], "annotations": {WAKE_ANNOTATION: stamp(NOW - timedelta(seconds=5))}},
    }
    state = ClusterState([asked, *models[1:]], state.node_profiles, state.nodes, state.placements[1:])
    inputs = same_as_fresh(state, rows, NOW, k)
    assert {d.name: d.waiting_requests for d in inputs.demands}["team-a/a"] == 1
    made = rows.made
    inputs = same_as_fresh(state, rows, NOW + timedelta(seconds=40), k)
    assert {d.name: d.waiting_requests for d in inputs.demands}["team-a/a"] == 0
    assert rows.made == made
