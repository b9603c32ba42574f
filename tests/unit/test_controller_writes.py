"""The writes a model costs on its way to Ready: no Event per ordinary step (the worker's measured operation
is the Event), an Event where the phase says something is wrong or waiting, and status writes that give
way to a round that is waiting (placements first) without being lost."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from test_controller_round import FakeKube
from test_operator_state import knobs, llm, node, profile

from conftest import MakeDir
from residency_operator.capacity import CapacityConfig
from residency_operator.controller import Controller
from residency_operator.state import ClusterState


class EventKube(FakeKube):
    def __init__(self, state: ClusterState) -> None:
        super().__init__(state)
        self.events: list[tuple[str, str, str]] = []

    def post_event(self, body: dict[str, Any], event_type: str, reason: str, message: str, **_: Any) -> None:
        self.events.append((body["metadata"]["name"], event_type, reason))


def controller(kube: FakeKube, tmp_path: Path, **kwargs: Any) -> Controller:
    return Controller(kube, knobs(tmp_path), capacity=CapacityConfig(enabled=False), **kwargs)  # type: ignore[arg-type]


def loaded(placement: dict[str, Any]) -> None:
    """What the worker reports once the model is loaded, with the operation it measured."""
    placement["status"] = {
        "state": "Loaded",
        "residentFraction": placement["spec"]["residentFraction"],
        "lastOperation": {"action": "Load", "node": placement["spec"]["nodeName"], "seconds": 0.5},
    }


def test_the_way_to_ready_posts_only_the_measured_operation(tmp_path: Path, make_model_dir: MakeDir) -> None:
    now = datetime.now(UTC)
    state = ClusterState(
        [llm("chat", make_model_dir("chat"))], [profile("gpu-1", 10**9, heartbeat=now)], [node("gpu-1")], []
    )
    kube = EventKube(state)
    ctl = controller(kube, tmp_path)
    ctl.round()
    assert kube.statuses["team-a/chat"]["phase"] == "Scheduled"
    assert kube.events == []  # Scheduled is a step on the way, shown by the status alone
    state.models[0]["status"] = kube.statuses["team-a/chat"]
    loaded(kube.placements["team-a.chat"])
    ctl.round()
    assert kube.statuses["team-a/chat"]["phase"] == "Ready"
    assert kube.events == [("chat", "Normal", "ModelLoaded")]


def test_a_waiting_model_still_gets_its_event(tmp_path: Path, make_model_dir: MakeDir) -> None:
    state = ClusterState([llm("chat", make_model_dir("chat"))], [], [], [])
    kube = EventKube(state)
    controller(kube, tmp_path).round()
    assert kube.statuses["team-a/chat"]["reason"] == "NoNodes"
    assert kube.events == [("chat", "Normal", "NoNodes")]


def test_status_writes_give_way_to_a_waiting_round_and_follow_in_the_next(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    now = datetime.now(UTC)
    names = [f"m{i}" for i in range(4)]
    directory = make_model_dir("shared")
    state = ClusterState(
        [llm(n, directory) for n in names], [profile("gpu-1", 10**9, heartbeat=now)], [node("gpu-1")], []
    )
    kube = EventKube(state)
    ctl = controller(kube, tmp_path, status_budget_seconds=0.0)
    ctl.poke()  # a change is waiting (no loop yet: the flag is set at once)
    report = ctl.round()
    assert sorted(report.created) == [f"team-a.{n}" for n in names]  # placements are never deferred
    assert report.deferred == 4 and kube.statuses == {}
    ctl._dirty.clear()  # the loop starts the next round and clears the flag
    report = ctl.round()
    assert report.deferred == 0 and report.created == []
    assert {kube.statuses[f"team-a/{n}"]["phase"] for n in names} == {"Scheduled"}


def test_a_model_placed_during_a_wave_gets_one_status_write_not_two(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    """While more changes wait, a model placed moments ago is not reported Scheduled: a round after its
    worker reports writes where its load got to, here Ready, in one write. With no change waiting, or
    once the placement is older than progress_quiet_seconds, each step is written at once."""
    now = datetime.now(UTC)
    directory = make_model_dir("shared")
    state = ClusterState(
        [llm("early", directory), llm("late", directory)],
        [profile("gpu-1", 10**9, heartbeat=now)],
        [node("gpu-1")],
        [],
    )
    kube = EventKube(state)
    writes: list[str] = []
    patch = kube.patch_model_status

    def counted(namespace: str, name: str, status: dict[str, Any]) -> Any:
        writes.append(name)
        return patch(namespace, name, status)

    kube.patch_model_status = counted  # type: ignore[method-assign]
    ctl = controller(kube, tmp_path)
    ctl.poke()  # the rest of the wave is on its way
    report = ctl.round()
    assert sorted(report.created) == ["team-a.early", "team-a.late"]
    assert report.deferred == 2 and writes == []
    report = ctl.round()  # still busy, and the worker has not reported yet: nothing to say but "Scheduled"
    assert report.deferred == 2 and writes == []
    for placement in kube.placements.values():
        loaded(placement)
    ctl.round()
    assert {kube.statuses[f"team-a/{n}"]["phase"] for n in ("early", "late")} == {"Ready"}
    assert sorted(writes) == ["early", "late"], "one status write each on the way to Ready"
    # with nothing waiting, a new model is reported Scheduled the moment it is placed
    ctl._dirty.clear()
    state.models.append(llm("alone", directory))
    ctl.round()
    assert kube.statuses["team-a/alone"]["phase"] == "Scheduled"
    # busy, but a worker that has not reported in progress_quiet_seconds: its Scheduled is written
    ctl.progress_quiet_seconds = 0.0
    state.models.append(llm("slow", directory))
    ctl.poke()
    ctl.round()
    assert kube.statuses["team-a/slow"]["phase"] == "Scheduled"
