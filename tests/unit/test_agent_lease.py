"""A worker's liveness is its node Lease, renewed as a kubelet renews its own; the NodeProfile's status is
written only when a measured value changes. A hollow engine goes through the same agent code path."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from residency_worker.hollow import HollowAgent, HollowEngine
from residency_worker.presence import AgentConfig, node_lease_name


class Response:
    """What the kubernetes client returns for a call made with ``_preload_content=False``."""

    def __init__(self, body: Any) -> None:
        self.data = json.dumps(body).encode()


class FakeCoordination:
    """The Lease calls as the API server answers them: JSON in and out, a version that moves."""

    def __init__(self) -> None:
        self.lease: Any = None
        self.calls: list[str] = []
        self.fail_next: int | None = None

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            status, self.fail_next = self.fail_next, None
            raise ApiException(status=status, reason="refused")

    def _store(self, body: Any) -> Response:
        assert isinstance(body, dict) and body["spec"]["renewTime"].endswith("Z")
        version = int((self.lease or {}).get("metadata", {}).get("resourceVersion", 0)) + 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(version)}}
        return Response(self.lease)

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        self.calls.append("read")
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return Response(self.lease)

    def create_namespaced_lease(self, namespace: str, body: Any, **_: Any) -> Any:
        self.calls.append("create")
        self._maybe_fail()
        return self._store(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **_: Any) -> Any:
        self.calls.append("replace")
        self._maybe_fail()
        if (
            self.lease is not None
            and body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]
        ):
            raise ApiException(status=409, reason="Conflict")
        return self._store(body)


class FakeCustom:
    def __init__(self, placements: list[dict[str, Any]] | None = None) -> None:
        self.profile_status: list[dict[str, Any]] = []
        self.placements = placements or []

    def create_cluster_custom_object(self, *args: Any) -> None:
        pass

    def patch_cluster_custom_object_status(
        self, group: str, version: str, plural: str, name: str, body: dict[str, Any]
    ) -> None:
        if plural == "nodeprofiles":
            self.profile_status.append(body["status"])
        else:
            next(p for p in self.placements if p["metadata"]["name"] == name).setdefault("status", {}).update(
                {k: v for k, v in body["status"].items() if v is not None}
            )

    def list_cluster_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"items": self.placements}


class FakeCore:
    def read_node(self, name: str) -> Any:
        raise ApiException(status=404, reason="Not Found")


def placement_on_gpu7(name: str, resident_fraction: float) -> dict[str, Any]:
    return {
        "metadata": {"name": f"t.{name}", "generation": 1, "resourceVersion": "1"},
        "spec": {
            "model": {"namespace": "t", "name": name, "uid": "u"},
            "nodeName": "gpu-7",
            "sourcePath": f"/models/{name}",
            "dtype": "float32",
            "residentFraction": resident_fraction,
            "executionMode": "stream",
            "desiredState": "Loaded",
            "maxSequenceLength": 64,
            "maxBatchSize": 1,
        },
    }


def gpu7_config(**settings: Any) -> AgentConfig:
    """The agent of node gpu-7 with 1 GiB of host memory, and ``settings``."""
    return AgentConfig(node="gpu-7", endpoint="http://x", host_memory_bytes=2**30, **settings)


def agent(custom: FakeCustom, coordination: FakeCoordination) -> HollowAgent:
    config = gpu7_config(heartbeat_seconds=0.0)
    engine: Any = HollowEngine("gpu-7", 2**30, load_seconds=0.0)
    return HollowAgent(engine, config, custom=custom, core=FakeCore(), coordination=coordination)  # type: ignore[arg-type]


def test_heartbeats_renew_the_lease_and_leave_the_profile_alone() -> None:
    custom, coordination = FakeCustom(), FakeCoordination()
    worker = agent(custom, coordination)
    worker.register()
    assert coordination.calls == ["read", "create"]
    assert coordination.lease["metadata"]["name"] == node_lease_name("gpu-7")
    assert coordination.lease["metadata"]["labels"]["residency.dev/node-lease"] == "true"
    assert coordination.lease["spec"]["holderIdentity"] == "gpu-7"
    assert len(custom.profile_status) == 1  # the registration's measured values
    renewed = [coordination.lease["spec"]["renewTime"]]
    for _ in range(3):
        time.sleep(0.001)
        worker.heartbeat()
        renewed.append(coordination.lease["spec"]["renewTime"])
    assert coordination.calls[2:] == ["replace"] * 3
    assert renewed == sorted(set(renewed))  # (each renewal a later MicroTime, on the version last written)
    assert coordination.lease["metadata"]["resourceVersion"] == "4"
    assert len(custom.profile_status) == 1  # nothing measured changed: no status write


def test_a_conflict_reads_the_lease_again_and_a_refusal_falls_back_to_the_profile() -> None:
    custom, coordination = FakeCustom(), FakeCoordination()
    worker = agent(custom, coordination)
    worker.register()
    # someone else wrote it (a restarted worker): the update on the old version conflicts, read it afresh
    coordination.lease["metadata"]["resourceVersion"] = "7"
    worker.heartbeat()
    worker.heartbeat()
    assert coordination.calls[2:] == ["replace", "read", "replace"]
    assert coordination.lease["metadata"]["resourceVersion"] == "8"
    coordination.fail_next = 403  # an older chart without the Lease role
    worker.heartbeat()
    writes = len(custom.profile_status)
    worker.heartbeat()
    worker.heartbeat()
    assert len(custom.profile_status) == writes + 2  # every heartbeat in the NodeProfile, as before
    assert "heartbeatTime" in custom.profile_status[-1]


def test_a_hollow_node_acknowledges_its_placement_through_the_agent() -> None:
    placement = placement_on_gpu7("m", 0.5)
    custom = FakeCustom([placement])
    worker = agent(custom, FakeCoordination())
    worker.sync()
    assert worker.engine.names() == ["t/m"]
    status = placement["status"]
    assert status["state"] == "Loaded" and status["residentFraction"] == 0.5
    assert status["observedGeneration"] == 1
    placement["spec"]["desiredState"] = "Preempted"
    worker.sync()
    assert placement["status"]["state"] == "Preempted"


class BlockedLoads(HollowEngine):
    """A hollow engine whose loads wait until the test lets them finish."""

    def __init__(self) -> None:
        super().__init__("gpu-7", 2**30, load_seconds=0.0)
        self.started = threading.Event()
        self.release = threading.Event()

    def load(self, name: str, path: str, options: Any = None) -> None:
        self.started.set()
        self.release.wait(30)
        super().load(name, path, options)


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_lease_is_renewed_while_a_long_load_holds_the_sync_loop() -> None:
    """The Lease has a thread of its own, as a kubelet's lease controller: a load that lasts many renewal
    periods (a large model from slow storage) does not let it lapse, which would have the operator judge
    a working node dead and move its models; a failed renewal is tried again at the next period."""
    placement = placement_on_gpu7("big", 1.0)
    custom, coordination = FakeCustom([placement]), FakeCoordination()
    config = gpu7_config(heartbeat_seconds=0.05, poll_seconds=0.05)
    engine = BlockedLoads()
    worker = HollowAgent(engine, config, custom=custom, core=FakeCore(), coordination=coordination)  # type: ignore[arg-type]
    worker.watch_placements = lambda stop: None  # type: ignore[method-assign]  # (no API server: polls)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert engine.started.wait(20), "the load never began"
        before = coordination.calls.count("replace")
        coordination.fail_next = 500  # one renewal refused: the renewer goes on
        # while the sync loop is held in the load, the Lease is renewed again and again
        assert wait_for(lambda: coordination.calls.count("replace") >= before + 5), coordination.calls
        assert "state" not in placement.get("status", {}) or placement["status"]["state"] != "Loaded"
    finally:
        engine.release.set()
    assert wait_for(lambda: placement.get("status", {}).get("state") == "Loaded")
    stop.set()
    thread.join(timeout=5)


def test_an_agent_without_a_renewer_thread_wakes_when_its_renewal_falls_due() -> None:
    """A hollow agent renews its Lease between sync passes: a pass that a placement change brought early
    must not push the next renewal a whole poll period on (twice the period at worst)."""
    config = gpu7_config(heartbeat_seconds=10.0, poll_seconds=10.0, lease_thread=False)
    engine: Any = HollowEngine("gpu-7", 2**30, load_seconds=0.0)
    worker = HollowAgent(
        engine, config, custom=FakeCustom(), core=FakeCore(), coordination=FakeCoordination()
    )  # type: ignore[arg-type]
    worker._last_heartbeat = time.monotonic() - 9.0  # renewed 9 s ago; a placement change woke it now
    assert 0.5 < worker._wait_seconds(10.0) <= 1.0
    assert worker._wait_seconds(20.0) == 20.0  # (an error's backoff is kept)
    worker._last_heartbeat = time.monotonic() - 30.0
    assert worker._wait_seconds(10.0) == 0.05
    threaded = HollowAgent(
        engine,
        dataclasses.replace(config, lease_thread=True),
        custom=FakeCustom(),
        core=FakeCore(),
        coordination=FakeCoordination(),
    )  # type: ignore[arg-type]
    threaded._last_heartbeat = time.monotonic() - 9.0
    assert threaded._wait_seconds(10.0) == 10.0  # its renewer thread keeps the Lease
