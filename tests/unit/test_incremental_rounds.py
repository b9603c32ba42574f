"""A single model's spec change at fleet size is re-planned with the planner's incremental mode: only that
model (and what it touched) is planned, written and given a status; anything else plans in full."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_controller_round import FakeKube
from test_operator_state import knobs, llm, node, profile

from conftest import MakeDir
from residency_operator import changes
from residency_operator.cache import ChangeLog
from residency_operator.capacity import CapacityConfig
from residency_operator.controller import Controller
from residency_operator.state import ClusterState


class Written:
    def written(self, body: Any) -> None:
        pass


class FakeCache(ChangeLog):
    """What the controller reads from its informers: the fake API's objects, and the changes it is told."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.models = self.placements = Written()
        super().__init__()
        self.other = True

    def state(self) -> ClusterState:
        return copy.copy(self.kube.state)

    def wake_requests(self) -> dict[str, tuple[str, str]]:
        return {}


class PlacementKube(FakeKube):
    def __init__(self, state: ClusterState) -> None:
        super().__init__(state)
        self.patched: list[str] = []
        self.status_writes: list[str] = []

    def create_placement(self, body: dict[str, Any]) -> dict[str, Any]:
        super().create_placement(body)
        self.state.placements = list(self.placements.values())
        return body

    def patch_placement(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.placements[name]["spec"] = patch["spec"]
        self.patched.append(name)
        return self.placements[name]

    def delete_placement(self, name: str) -> None:
        super().delete_placement(name)
        self.state.placements = list(self.placements.values())

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        super().patch_model_status(namespace, name, status)
        self.status_writes.append(f"{namespace}/{name}")


def fleet(tmp_path: Path, make_model_dir: MakeDir) -> tuple[PlacementKube, FakeCache, Controller]:
    directory = make_model_dir("shared")
    now = datetime.now(UTC)
    state = ClusterState(
        [llm(f"m{i:02d}", directory, priority=i % 3) for i in range(12)],
        [profile(f"gpu-{n}", 10**9, heartbeat=now) for n in range(3)],
        [node(f"gpu-{n}") for n in range(3)],
        [],
    )
    kube = PlacementKube(state)
    cache = FakeCache(kube)
    controller = Controller(
        kube,  # type: ignore[arg-type]
        knobs(tmp_path),
        capacity=CapacityConfig(enabled=False),
        cache=cache,  # type: ignore[arg-type]
        incremental_min_models=10,
    )
    return kube, cache, controller


def settle(kube: PlacementKube, cache: FakeCache, controller: Controller) -> None:
    """Full rounds until one writes no placement (the incremental planner is built at that one)."""
    for _ in range(5):
        cache.other = True
        report = controller.round()
        if not (report.created or report.updated or report.deleted):
            return
    raise AssertionError("the plan did not settle")


def test_a_spec_change_is_planned_incrementally_and_writes_only_its_model(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    kube, cache, controller = fleet(tmp_path, make_model_dir)
    settle(kube, cache, controller)
    assert controller.incremental is not None and controller.incremental.planner is not None
    assert len(kube.placements) == 12
    kube.patched.clear()
    kube.status_writes.clear()

    old = kube.state.models[5]
    new = copy.deepcopy(old)
    new["metadata"]["generation"] = 2
    new["spec"]["slo"] = {"minDecodeTokensPerSecond": 1.0}
    assert changes.model_spec_changed(old, new)
    kube.state.models[5] = new
    cache.spec_changes.add("team-a/m05")
    report = controller.round()
    assert report.solver == "incremental"
    assert kube.patched == ["team-a.m05"]  # the new SLO, on its placement; no other placement written
    assert kube.placements["team-a.m05"]["spec"]["minDecodeTokensPerSecond"] == 1.0
    assert set(kube.status_writes) <= {"team-a/m05"}
    assert controller.incremental.used == 1


def test_anything_but_a_spec_change_plans_in_full(tmp_path: Path, make_model_dir: MakeDir) -> None:
    kube, cache, controller = fleet(tmp_path, make_model_dir)
    settle(kube, cache, controller)
    newcomer = llm("m99", Path(kube.state.models[0]["spec"]["source"]["path"]))
    assert not changes.model_spec_changed(None, newcomer)
    kube.state.models.append(newcomer)
    cache.other = True  # what the cache records for a model that came
    report = controller.round()
    assert report.solver != "incremental"
    assert "team-a.m99" in report.created
    # the round wrote a placement: the planner is dropped, and rebuilt at the next quiet full round
    assert controller.incremental is not None and controller.incremental.planner is None
    settle(kube, cache, controller)
    assert controller.incremental.planner is not None


def test_a_small_fleet_always_plans_in_full(tmp_path: Path, make_model_dir: MakeDir) -> None:
    kube, cache, controller = fleet(tmp_path, make_model_dir)
    assert controller.incremental is not None
    controller.incremental.min_models = 100
    settle(kube, cache, controller)
    assert controller.incremental.planner is None
    kube.state.models[0] = {
        **kube.state.models[0],
        "metadata": {**kube.state.models[0]["metadata"], "generation": 2},
    }
    cache.spec_changes.add("team-a/m00")
    assert controller.round().solver != "incremental"


def test_a_failed_incremental_update_plans_in_full_and_drops_the_planner(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    kube, cache, controller = fleet(tmp_path, make_model_dir)
    settle(kube, cache, controller)
    assert controller.incremental is not None and controller.incremental.planner is not None

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("planner state out of step")

    controller.incremental.planner.update_model = broken  # type: ignore[method-assign]
    body = kube.state.models[3]
    kube.state.models[3] = {**body, "metadata": {**body["metadata"], "generation": 2}}
    cache.spec_changes.add("team-a/m03")
    report = controller.round()
    assert report.solver != "incremental"
    assert controller.incremental.used == 0  # (and a planner, if any, is a new one built by this full round)


def test_a_round_after_deferred_statuses_plans_in_full_and_writes_them(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    kube, cache, controller = fleet(tmp_path, make_model_dir)
    settle(kube, cache, controller)
    placement = kube.placements["team-a.m07"]
    placement["status"] = {"state": "Loaded", "residentFraction": placement["spec"]["residentFraction"]}
    controller.status_budget_seconds = 0.0
    controller.poke()  # a change is waiting: the status write gives way
    cache.other = True  # (the worker's report)
    writes_before = len(kube.status_writes)
    report = controller.round()
    assert report.deferred >= 1 and "team-a/m07" not in kube.status_writes[writes_before:]
    controller._dirty.clear()
    body = kube.state.models[2]
    kube.state.models[2] = {**body, "metadata": {**body["metadata"], "generation": 2}}
    cache.spec_changes.add("team-a/m02")
    report = controller.round()
    assert report.solver != "incremental"  # a full round: the deferred status is written by it
    assert kube.statuses["team-a/m07"]["phase"] == "Ready"


Settled = tuple["PlacementKube", "FakeCache", Controller]


@pytest.fixture
def settled(tmp_path: Path, make_model_dir: MakeDir) -> Settled:
    """The fleet at its plan, with the incremental planner built."""
    kube, cache, controller = fleet(tmp_path, make_model_dir)
    settle(kube, cache, controller)
    assert controller.incremental is not None and controller.incremental.planner is not None
    return kube, cache, controller


def report_loaded(kube: PlacementKube, name: str, **status: Any) -> None:
    """The worker's report: the placement loaded where its spec says (or ``status`` says otherwise)."""
    placement = kube.placements[name]
    placement["status"] = {
        "state": "Loaded",
        "residentFraction": placement["spec"]["residentFraction"],
        **status,
    }


def test_a_workers_report_on_a_placement_where_the_plan_put_it_is_not_a_full_round(settled: Settled) -> None:
    kube, cache, controller = settled
    assert controller.incremental is not None
    kube.patched.clear()
    kube.status_writes.clear()
    report_loaded(kube, "team-a.m04")
    cache.reported.add("team-a/m04")
    report = controller.round()
    assert report.solver == "incremental"
    assert not (report.created or report.updated or report.deleted) and kube.patched == []
    assert kube.status_writes == ["team-a/m04"] and kube.statuses["team-a/m04"]["phase"] == "Ready"

    # a report that the placement failed is not where the plan put it: the round plans in full
    report_loaded(kube, "team-a.m06", state="Failed", reason="LoadFailed", message="out of memory")
    cache.reported.add("team-a/m06")
    assert controller.round().solver != "incremental"


def test_a_deleted_model_and_a_new_one_are_planned_incrementally(settled: Settled) -> None:
    kube, cache, controller = settled
    assert controller.incremental is not None
    kube.patched.clear()

    # deletion begins: the model is no longer wanted, its placement is deleted, nothing else is written
    body = kube.state.models[8]
    deleting = {**body, "metadata": {**body["metadata"], "deletionTimestamp": "2026-12-07T00:00:00Z"}}
    assert changes.model_deletion_began(body, deleting)
    kube.state.models[8] = deleting
    cache.spec_changes.add("team-a/m08")
    report = controller.round()
    assert report.solver == "incremental"
    assert report.deleted == ["team-a.m08"] and not report.created and kube.patched == []
    # its placement and then the model are gone: nothing to plan, still no full round
    cache.ended.add("team-a/m08")
    assert controller.round().solver == "incremental"
    del kube.state.models[8]
    cache.ended.add("team-a/m08")
    assert controller.round().solver == "incremental"

    # a model that came takes a spare row of the planner: its placement is written, and only it
    newcomer = llm("m99", Path(body["spec"]["source"]["path"]))
    kube.state.models.append(newcomer)
    cache.added.add("team-a/m99")
    report = controller.round()
    assert report.solver == "incremental"
    assert report.created == ["team-a.m99"] and kube.patched == []
    assert controller.incremental.planner is not None and controller.incremental.used == 4
    # (and a full round finds the cluster at its plan: nothing more to write)
    cache.other = True
    report = controller.round()
    assert report.solver != "incremental" and not (report.created or report.updated or report.deleted)


def test_what_the_planner_cannot_follow_plans_in_full(settled: Settled) -> None:
    kube, cache, controller = settled
    assert controller.incremental is not None and controller.incremental.planner is not None
    # a placement gone while its model still wants one
    kube.delete_placement("team-a.m01")
    cache.ended.add("team-a/m01")
    assert controller.round().solver != "incremental"
    settle(kube, cache, controller)
    # more models came than the planner has spare rows for
    controller.incremental.planner._spares = controller.incremental.planner._spares[:1]
    path = Path(kube.state.models[0]["spec"]["source"]["path"])
    for name in ("m90", "m91"):
        kube.state.models.append(llm(name, path))
        cache.added.add(f"team-a/{name}")
    report = controller.round()
    assert report.solver != "incremental" and {"team-a.m90", "team-a.m91"} <= set(report.created)
    settle(kube, cache, controller)
    # a model that came unannounced (a missed event): the planner's fleet is not the cluster's
    kube.state.models.append(llm("m92", path))
    body = kube.state.models[2]
    kube.state.models[2] = {**body, "metadata": {**body["metadata"], "generation": 2}}
    cache.spec_changes.add("team-a/m02")
    assert controller.round().solver != "incremental"


def test_the_report_on_a_changed_placement_of_a_quiet_model_is_not_a_full_round(settled: Settled) -> None:
    """A model nobody calls is idle once quiet for a few seconds; after a change the planner placed it as
    loaded, and its worker's report (the new generation seen) says it still holds where the plan put it:
    before, each such report cost a full round, and a change that came meanwhile waited for it."""
    kube, cache, controller = settled
    quiet = (datetime.now(UTC) - timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for name in list(kube.placements):
        report_loaded(kube, name, lastActiveTime=quiet, queuedRequests=0)
    settle(kube, cache, controller)  # (the incremental planner is built with every model idle)
    assert controller.incremental is not None and controller.incremental.planner is not None
    body = kube.state.models[3]
    kube.state.models[3] = {
        **body,
        "metadata": {**body["metadata"], "generation": 2},
        "spec": {**body["spec"], "slo": {"minDecodeTokensPerSecond": 3.0}},
    }
    cache.spec_changes.add("team-a/m03")
    assert controller.round().solver == "incremental"
    report_loaded(kube, "team-a.m03", lastActiveTime=quiet, queuedRequests=0, observedGeneration=2)
    cache.reported.add("team-a/m03")
    assert controller.round().solver == "incremental"
    # a report that it no longer holds its memory is not where the plan put it
    report_loaded(kube, "team-a.m03", state="Preempted")
    cache.reported.add("team-a/m03")
    assert controller.round().solver != "incremental"
