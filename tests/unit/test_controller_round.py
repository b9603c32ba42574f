"""One planning round against an API server that checks names as Kubernetes does: a model's odd but valid
name, or one object the API server refuses, never stops the round for the other models."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException
from test_operator_state import knobs, llm, node, profile

from conftest import MakeDir
from residency.names import label_value, placement_name
from residency_operator.capacity import CapacityConfig
from residency_operator.controller import Controller
from residency_operator.state import ClusterState

SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def refused(status: int, message: str) -> ApiException:
    exc = ApiException(status=status, reason="Unprocessable Entity" if status == 422 else "Forbidden")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


class FakeKube:
    """The calls a round makes, with the API server's checks of names and label values."""

    def __init__(self, state: ClusterState, forbidden: frozenset[str] = frozenset()) -> None:
        self.state = state
        self.forbidden = forbidden
        self.placements: dict[str, dict[str, Any]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}

    def list_custom(self, plural: str) -> list[dict[str, Any]]:
        return {
            "llmmodels": self.state.models,
            "nodeprofiles": self.state.node_profiles,
            "modelplacements": list(self.placements.values()),
            "sensitivityprofiles": [],
        }[plural]

    def list_nodes(self) -> list[dict[str, Any]]:
        return self.state.nodes

    def wake_requests(self, namespace: str) -> dict[str, tuple[str, str]]:
        return {}  # the router asked for nothing

    def list_pods(self, selector: str) -> list[dict[str, Any]]:
        return []  # no capacity-request pods: every model here fits

    def create_placement(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        if len(name) > 253 or not SUBDOMAIN.match(name):
            raise refused(422, f'ModelPlacement "{name}" is invalid: metadata.name')
        for key, value in body["metadata"]["labels"].items():
            if len(value) > 63 or not LABEL_VALUE.match(value):
                raise refused(422, f"metadata.labels: Invalid value: {value!r} ({key})")
        if name in self.forbidden:
            raise refused(403, f'modelplacements "{name}" is forbidden by an admission policy')
        self.placements[name] = body

    def delete_placement(self, name: str) -> None:
        del self.placements[name]

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.setdefault(f"{namespace}/{name}", {}).update(status)

    def post_event(self, *args: Any, **kwargs: Any) -> None:
        pass


def cluster(tmp_path: Path, make_model_dir: MakeDir, names: list[str]) -> ClusterState:
    models = [llm(name, make_model_dir(name[:200])) for name in names]
    now = datetime.now(UTC)
    return ClusterState(models, [profile("gpu-1", 10**9, heartbeat=now)], [node("gpu-1")], [])


def test_long_model_names_get_valid_placements_and_labels(tmp_path: Path, make_model_dir: MakeDir) -> None:
    long_name = "a" * 200 + "." + "b" * 51 + "z"  # a valid 253-character LLMModel name
    dash_at_63 = "c" * 62 + "-d"  # cut at 63 characters it would end in '-'
    state = cluster(tmp_path, make_model_dir, [long_name, dash_at_63, "ok-model"])
    kube = FakeKube(state)
    report = Controller(kube, knobs(tmp_path)).round()  # type: ignore[arg-type]
    assert report.rejected == {}
    assert len(kube.placements) == 3
    assert placement_name(f"team-a/{long_name}") in kube.placements
    assert len(placement_name(f"team-a/{long_name}")) == 253
    assert label_value(dash_at_63) != label_value("c" * 62 + "-e")  # cut names stay apart
    assert {s["phase"] for s in kube.statuses.values()} == {"Scheduled"}


def test_a_refused_placement_fails_only_its_model(tmp_path: Path, make_model_dir: MakeDir) -> None:
    state = cluster(tmp_path, make_model_dir, ["blocked", "ok-model"])
    kube = FakeKube(state, forbidden=frozenset({"team-a.blocked"}))
    report = Controller(kube, knobs(tmp_path)).round()  # type: ignore[arg-type]
    assert set(report.rejected) == {"team-a.blocked"}
    assert list(kube.placements) == ["team-a.ok-model"]
    assert kube.statuses["team-a/ok-model"]["phase"] == "Scheduled"
    blocked = kube.statuses["team-a/blocked"]
    assert (blocked["phase"], blocked["reason"]) == ("Pending", "PlacementRejected")
    assert "forbidden by an admission policy" in blocked["message"]
    scheduled = next(c for c in blocked["conditions"] if c["type"] == "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "PlacementRejected")


def test_an_operator_for_some_namespaces_plans_only_their_models_around_the_others(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    """`--namespace team-a`: a team-b model is neither placed nor given a status, team-b's placement (of
    another operator) is neither deleted nor planned into: its GPU bytes are taken as held."""
    team_a = llm("chat", make_model_dir("a-chat", params=20_000))
    team_b = llm("other", make_model_dir("b-other", params=20_000), namespace="team-b")
    now = datetime.now(UTC)
    node_bytes = 10**9
    state = ClusterState([team_a, team_b], [profile("gpu-1", node_bytes, heartbeat=now)], [node("gpu-1")], [])
    kube = FakeKube(state)
    theirs = {
        "metadata": {"name": "team-b.other"},
        "spec": {"model": {"namespace": "team-b", "name": "other"}, "nodeName": "gpu-1"},
        "status": {"state": "Loaded", "residentBytes": node_bytes},  # the whole GPU
    }
    kube.placements["team-b.other"] = theirs
    controller = Controller(
        kube,  # type: ignore[arg-type]
        knobs(tmp_path),
        capacity=CapacityConfig(enabled=False),
        namespaces=["team-a"],
    )
    report = controller.round()
    assert report.deleted == [] and kube.placements["team-b.other"] is theirs
    assert "team-a.chat" not in kube.placements  # no room left beside team-b's model
    assert set(kube.statuses) == {"team-a/chat"}
    assert kube.statuses["team-a/chat"]["phase"] == "Unschedulable"


async def test_a_clean_stop_releases_the_lease_only_after_the_round_in_flight(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    """A round runs in a thread that cancelling the controller's task does not stop: released at once,
    the Lease would let a successor plan while this round still writes placements."""
    events: list[str] = []
    in_round, finish = threading.Event(), threading.Event()

    class LeaderKube(FakeKube):
        def try_acquire_lease(self, *args: Any) -> bool:
            events.append("renew")
            return True

        def release_lease(self, *args: Any) -> None:
            events.append("release")

    kube = LeaderKube(cluster(tmp_path, make_model_dir, ["a"]))
    controller = Controller(kube, knobs(tmp_path), debounce_seconds=0.0)  # type: ignore[arg-type]
    real_round = controller.round

    def slow_round() -> Any:
        events.append("round starts")
        in_round.set()
        finish.wait(10)
        report = real_round()
        events.append("round ends")
        return report

    controller.round = slow_round  # type: ignore[method-assign]
    controller.poke()
    task = asyncio.create_task(controller.run())
    assert await asyncio.to_thread(in_round.wait, 10)
    task.cancel()  # as main.stop does, then release
    releasing = asyncio.create_task(asyncio.to_thread(controller.release))
    await asyncio.sleep(0.3)
    assert "release" not in events, events
    finish.set()
    await releasing
    assert events[-2:] == ["round ends", "release"], events
    # and no renewal or round starts after that
    assert controller._renew() is False and controller._lead_round() is None
    assert events[-1] == "release"


async def test_a_lease_acquired_as_the_stop_begins_is_released(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    """The first acquisition is in flight (a thread) when the operator stops: the Lease it gets must be
    given up, not held by a stopped operator until it expires."""
    events: list[str] = []
    asking, answer = threading.Event(), threading.Event()

    class SlowLeaseKube(FakeKube):
        def try_acquire_lease(self, *args: Any) -> bool:
            asking.set()
            answer.wait(10)
            events.append("acquired")
            return True

        def release_lease(self, *args: Any) -> None:
            events.append("released")

    kube = SlowLeaseKube(cluster(tmp_path, make_model_dir, ["a"]))
    controller = Controller(kube, knobs(tmp_path), debounce_seconds=0.0)  # type: ignore[arg-type]
    controller.poke()
    task = asyncio.create_task(controller.run())
    assert await asyncio.to_thread(asking.wait, 10)
    task.cancel()  # as main.stop does, then release
    releasing = asyncio.create_task(asyncio.to_thread(controller.release))
    await asyncio.sleep(0.2)
    answer.set()
    await releasing
    assert events == ["acquired", "released"], events


async def test_rounds_within_a_third_of_the_lease_term_do_not_renew_it_first(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    """At fleet size a Lease renewal before every round adds an API round trip to every change: a leader
    renews when a third of its term has passed (and then before its next round), not before each round."""
    renewals: list[float] = []

    class LeaderKube(FakeKube):
        def try_acquire_lease(self, *args: Any) -> bool:
            renewals.append(time.monotonic())
            return True

    kube = LeaderKube(cluster(tmp_path, make_model_dir, ["a"]))
    controller = Controller(kube, knobs(tmp_path), debounce_seconds=0.0, lease_seconds=60)  # type: ignore[arg-type]
    rounds: list[Any] = []
    real_round = controller.round

    def counted_round() -> Any:
        rounds.append(real_round())
        return rounds[-1]

    async def rounds_reach(count: int) -> None:
        deadline = time.monotonic() + 20
        while len(rounds) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(rounds) >= count

    controller.round = counted_round  # type: ignore[method-assign]
    task = asyncio.create_task(controller.run())
    try:
        for count in (1, 2, 3):
            controller.poke()
            await rounds_reach(count)
        assert len(renewals) == 1
        controller._renewed_at -= 20.5  # a third of the term passed since the renewal
        controller.poke()
        await rounds_reach(4)
        assert len(renewals) == 2
        # a leader that lost the Lease renews (and finds it lost) before any round
        controller.leader = False
        controller.poke()
        deadline = time.monotonic() + 20
        while len(renewals) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(renewals) == 3
    finally:
        task.cancel()
