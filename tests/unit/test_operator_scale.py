"""What keeps the operator quiet at fleet size: only changes that can alter a plan start a round; node
liveness comes from node Leases; a round reads its state from the cache and validates a model once per
generation, not once per round."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from test_controller_round import FakeKube
from test_operator_state import NOW, knobs, llm, node, profile

from conftest import MakeDir
from residency_operator import changes
from residency_operator.cache import ClusterCache
from residency_operator.changes import Changes
from residency_operator.controller import Controller
from residency_operator.inputs import planner_inputs
from residency_operator.state import ClusterState, lease_renewals, live_nodes, stale_nodes


def changed(body: dict[str, Any], **edits: Any) -> dict[str, Any]:
    new = copy.deepcopy(body)
    for path, value in edits.items():
        target = new
        *parents, last = path.split("__")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value
    return new


def test_the_operators_own_writes_and_bookkeeping_start_no_round(tmp_path: Path) -> None:
    model = llm("a", tmp_path)
    assert not changes.model_changed(model, changed(model, status={"phase": "Ready"}))
    assert not changes.model_changed(model, changed(model, metadata__finalizers=["kopf.zalando.org/x"]))
    assert not changes.model_changed(model, changed(model, metadata__resourceVersion="9"))
    assert changes.model_changed(model, changed(model, metadata__generation=2))
    assert changes.model_changed(model, changed(model, metadata__deletionTimestamp="2026-01-01T00:00:00Z"))
    assert changes.model_changed(
        model, changed(model, metadata__annotations={"residency.dev/wake-time": "2026-01-01T00:00:00Z"})
    )
    assert changes.model_changed(None, model) and changes.model_changed(model, None)

    placement = {
        "metadata": {"name": "p", "uid": "u", "finalizers": ["residency.dev/unload"]},
        "spec": {"nodeName": "n"},
        "status": {},
    }
    assert not changes.placement_changed(placement, changed(placement, spec__residentFraction=0.5))
    assert changes.placement_changed(placement, changed(placement, status={"state": "Loaded"}))
    assert changes.placement_changed(placement, changed(placement, metadata__finalizers=[]))  # unloaded


def test_the_cache_sorts_changes_into_what_an_incremental_round_can_take(tmp_path: Path) -> None:
    """Spec changes and deletions, models that came or went, workers' reports and placements that end are
    recorded per model (an incremental round may take them); anything else only as "other"."""
    cache = ClusterCache(lambda: None, "residency-system")
    model = llm("a", tmp_path)
    cache._on_model("MODIFIED", model, changed(model, metadata__generation=2))
    deleting = changed(model, metadata__deletionTimestamp="2026-01-01T00:00:00Z")
    assert changes.model_deletion_began(model, deleting)
    cache._on_model("ADDED", None, llm("b", tmp_path))
    cache._on_model("DELETED", deleting, None)
    cache._on_model("MODIFIED", model, changed(model, status={"phase": "Ready"}))  # the operator's own
    placement = {
        "metadata": {"name": "team-a.c", "uid": "u", "finalizers": ["residency.dev/unload"]},
        "spec": {"nodeName": "n", "model": {"namespace": "team-a", "name": "c"}},
        "status": {},
    }
    cache._on_placement("MODIFIED", placement, changed(placement, status={"state": "Loaded"}))
    ending = changed(placement, metadata__deletionTimestamp="2026-01-01T00:00:00Z")
    ending["spec"]["model"]["name"] = "d"
    cache._on_placement("MODIFIED", changed(ending, metadata__deletionTimestamp=None), ending)
    cache._on_placement("MODIFIED", placement, changed(placement, spec__residentFraction=0.5))  # its own
    taken = cache.take_changes()
    assert taken == changes.Changes(
        spec=frozenset({"team-a/a"}),
        added=frozenset({"team-a/b"}),
        reported=frozenset({"team-a/c"}),
        ended=frozenset({"team-a/a", "team-a/d"}),
        other=False,
    )
    assert cache.take_changes() == changes.Changes()
    woken = changed(model, metadata__annotations={"residency.dev/wake-time": "2026-01-01T00:00:00Z"})
    cache._on_model("MODIFIED", model, woken)
    assert cache.take_changes().other


def test_heartbeats_and_renewals_start_no_round() -> None:
    ready = node("n1")
    beat = changed(
        ready, status={"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "x"}]}
    )
    assert not changes.node_changed(ready, beat)
    assert changes.node_changed(ready, changed(ready, spec={"unschedulable": True}))
    assert changes.node_changed(
        ready, changed(ready, status={"conditions": [{"type": "Ready", "status": "False"}]})
    )

    old = profile("n1", 10**9)
    assert not changes.profile_changed(old, changed(old, status__heartbeatTime="2030-01-01T00:00:00Z"))
    assert changes.profile_changed(old, changed(old, status__residentBytes=5))
    assert changes.profile_changed(old, changed(old, spec__gpuMemoryBytes=2 * 10**9))

    lease = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "n1", "renewTime": "t1"}}
    assert not changes.lease_holder_changed(lease, changed(lease, spec__renewTime="t2"))
    assert changes.lease_holder_changed(lease, changed(lease, spec__holderIdentity="n2"))


def node_lease(node_name: str, renewed: datetime) -> dict[str, Any]:
    return {
        "metadata": {"name": f"residency-node.{node_name}"},
        "spec": {"holderIdentity": node_name, "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
    }


def test_a_node_lease_decides_liveness_over_a_stale_profile_heartbeat(tmp_path: Path) -> None:
    stale = NOW - timedelta(minutes=10)
    state = ClusterState(
        models=[],
        node_profiles=[profile("leased", 10**9, heartbeat=stale), profile("old-worker", 10**9)],
        nodes=[node("leased"), node("old-worker")],
        placements=[],
        node_leases=[node_lease("leased", NOW - timedelta(seconds=5))],
    )
    # the profile's heartbeat is ten minutes old, but the Lease was renewed: alive; a worker without a
    # Lease (before Leases) is judged by its profile's heartbeat as before
    assert live_nodes(state, NOW, knobs(tmp_path)) == {"leased", "old-worker"}
    inputs = planner_inputs(state, NOW, knobs(tmp_path))
    assert all(n.schedulable for n in inputs.nodes)
    later = NOW + timedelta(seconds=40)  # the Lease expired (grace 30 s), the old worker went quiet too
    assert live_nodes(state, later, knobs(tmp_path)) == frozenset()
    assert not any(n.schedulable for n in planner_inputs(state, later, knobs(tmp_path)).nodes)


class CachedState:
    """Stands in for ClusterCache: the state a round reads, without any list call."""

    def __init__(self, state: ClusterState) -> None:
        self._state = state
        self.models = self.placements = self

    def state(self) -> ClusterState:
        return self._state

    def written(self, body: Any) -> None:
        pass

    def wake_requests(self) -> dict[str, tuple[str, str]]:
        return {}

    def take_changes(self) -> Changes:
        return Changes(other=True)  # every round here plans in full


class CountingKube(FakeKube):
    def __init__(self, state: ClusterState) -> None:
        super().__init__(state)
        self.lists = 0

    def list_custom(self, plural: str) -> list[dict[str, Any]]:
        self.lists += 1
        return super().list_custom(plural)


def test_a_round_from_the_cache_lists_nothing_and_runs_only_when_due(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    now = datetime.now(UTC)
    state = ClusterState(
        [llm("a", make_model_dir("a"))],
        [profile("gpu-1", 10**9, heartbeat=now - timedelta(hours=1))],
        [node("gpu-1")],
        [],
        node_leases=[node_lease("gpu-1", now)],
    )
    kube = CountingKube(state)
    controller = Controller(kube, knobs(tmp_path), cache=CachedState(state), resync_seconds=3600)  # type: ignore[arg-type]
    assert controller.round_due(dirty=False)  # never planned yet
    report = controller.round()
    assert report.created and kube.lists == 0
    assert not controller.round_due(dirty=False)  # nothing changed, resync far away
    assert controller.round_due(dirty=True)
    # the node's Lease stops being renewed: its liveness flips without any event, and that is due
    state.node_leases[0] = node_lease("gpu-1", now - timedelta(minutes=5))
    assert controller.round_due(dirty=False)


def test_a_model_directory_is_read_once_per_generation(
    tmp_path: Path, make_model_dir: MakeDir, monkeypatch: Any
) -> None:
    from residency_operator import validation as validation_module

    calls: list[str] = []
    real = validation_module.validate_model

    def counting(spec: dict[str, Any], *args: Any) -> Any:
        calls.append(spec["source"]["path"])
        return real(spec, *args)

    monkeypatch.setattr(validation_module, "validate_model", counting)
    model = llm("a", make_model_dir("a"))
    state = ClusterState([model], [profile("gpu-1", 10**9, heartbeat=datetime.now(UTC))], [node("gpu-1")], [])
    controller = Controller(FakeKube(state), knobs(tmp_path))  # type: ignore[arg-type]
    controller.round()
    controller.round()
    assert len(calls) == 1
    model["metadata"]["generation"] = 2  # a new spec is validated again
    controller.round()
    assert len(calls) == 2
    controller.validation_seconds = 0.0  # and an old verdict is checked again (the directory may change)
    controller.round()
    assert len(calls) == 3


def test_models_that_share_a_directory_read_it_once_per_round(
    tmp_path: Path, make_model_dir: MakeDir, monkeypatch: Any
) -> None:
    from residency_operator import validation as validation_module

    reads: list[str] = []
    real = validation_module.inspect_model_dir

    def counting(path: str, *args: Any) -> Any:
        reads.append(path)
        return real(path, *args)

    monkeypatch.setattr(validation_module, "inspect_model_dir", counting)
    shared = make_model_dir("shared")
    models = [llm(f"m{i}", shared) for i in range(5)]
    state = ClusterState(models, [profile("gpu-1", 10**9, heartbeat=datetime.now(UTC))], [node("gpu-1")], [])
    controller = Controller(FakeKube(state), knobs(tmp_path), validation_seconds=0.0)  # type: ignore[arg-type]
    report = controller.round()
    assert reads == [str(shared)] and len(report.created) == 5
    controller.round()  # verdicts expire at once here: the directory is read again, once
    assert reads == [str(shared)] * 2


def test_writes_past_the_burst_wait_for_the_rate() -> None:
    from residency_operator.kube import WriteLimiter

    limiter = WriteLimiter(qps=20.0, burst=3)
    started = time.monotonic()
    for _ in range(3):
        limiter.acquire()
    assert limiter.waited_seconds == 0.0  # the burst goes at once
    for _ in range(4):
        limiter.acquire()
    assert time.monotonic() - started >= 4 / 20.0 * 0.9  # four more at 20/s
    unlimited = WriteLimiter(qps=0.0, burst=1)
    for _ in range(100):
        unlimited.acquire()
    assert unlimited.waited_seconds == 0.0


def test_most_nodes_stale_at_once_suspends_liveness_instead_of_dropping_their_models(tmp_path: Path) -> None:
    """An API server too busy to take Lease renewals makes every node look dead at once: no model is moved or
    dropped for that (as kube-controller-manager stops evicting in a full disruption); a few stale nodes
    among live ones, or in a small fleet, are judged dead as before."""
    now = datetime.now(UTC)
    fresh, stale = now - timedelta(seconds=5), now - timedelta(minutes=5)

    def fleet(stale_count: int, size: int) -> ClusterState:
        names = [f"gpu-{i}" for i in range(size)]
        return ClusterState(
            [],
            [profile(n, 10**9, heartbeat=stale) for n in names],
            [node(n) for n in names],
            [],
            node_leases=[node_lease(n, stale if i < stale_count else fresh) for i, n in enumerate(names)],
        )

    k = knobs(tmp_path)  # grace 30 s; suspended from 20 stale nodes, more than half
    overloaded = fleet(stale_count=24, size=30)
    assert live_nodes(overloaded, now, k) == {f"gpu-{i}" for i in range(30)}
    assert all(n.schedulable for n in planner_inputs(overloaded, now, k).nodes)
    few = fleet(stale_count=5, size=30)
    assert live_nodes(few, now, k) == {f"gpu-{i}" for i in range(5, 30)}
    assert [n.name for n in planner_inputs(few, now, k).nodes if not n.schedulable] == [
        f"gpu-{i}" for i in range(5)
    ]
    small = fleet(stale_count=2, size=3)
    assert live_nodes(small, now, k) == {"gpu-2"}
    registering = fleet(stale_count=0, size=30)  # profiles without a heartbeat or a Lease yet
    registering.node_leases = []
    for p in registering.node_profiles:
        p["status"] = {}
    assert live_nodes(registering, now, k) == frozenset()  # not seen yet is not "stopped renewing"
    # the nodes judged dead are the stale ones the operator names in its log
    renewed = lease_renewals(few.node_leases)
    assert stale_nodes(few.node_profiles, renewed, now, k) == {f"gpu-{i}" for i in range(5)}
    assert stale_nodes(registering.node_profiles, {}, now, k) == frozenset()
