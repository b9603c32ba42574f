"""The informers keep objects slim (no managedFields, no last-applied copy; a Node's status reduced to its
conditions), and the operator decides exactly as it does from the objects the API server sent."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from test_controller_round import FakeKube
from test_informer import FakeApi, obj
from test_operator_scale import CachedState, node_lease
from test_operator_state import knobs, llm, node, profile

from conftest import MakeDir
from residency.informer import Informer, slim
from residency_operator import changes
from residency_operator.cache import slim_node
from residency_operator.controller import Controller
from residency_operator.state import WAKE_ANNOTATION, ClusterState, node_accepts

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def fields(value: Any) -> Any:
    """A FieldsV1 tree of ``value``, as the API server records who set which field."""
    if isinstance(value, dict):
        return {".": {}, **{f"f:{k}": fields(v) for k, v in value.items()}}
    if isinstance(value, list):
        return {".": {}, **{f"k:{json.dumps(i, sort_keys=True)[:40]}": fields(i) for i in value}}
    return {}


def as_served(body: dict[str, Any], **annotations: str) -> dict[str, Any]:
    """The object as the API server returns it: managedFields for a writer of the spec and one of the
    status, and ``kubectl apply``'s copy of what it applied."""
    served = copy.deepcopy(body)
    meta = served.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), LAST_APPLIED: json.dumps(body), **annotations}
    meta["managedFields"] = [
        {"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": fields(body)},
        {
            "manager": "residency",
            "operation": "Update",
            "subresource": "status",
            "fieldsV1": fields({"status": served.get("status") or {}}),
        },
    ]
    return served


def real_node(name: str, **edits: Any) -> dict[str, Any]:
    """A Node as a kubelet keeps it: images, addresses, capacity, heartbeats and annotations."""
    body = node(name)
    body["metadata"].update(uid=f"uid-{name}", labels={"kubernetes.io/hostname": name})
    body["metadata"]["annotations"] = {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/x": "y"}
    body["status"] = {
        **body.get("status", {}),
        "images": [{"names": [f"registry/image-{i}@sha256:{i:064d}"], "sizeBytes": i} for i in range(50)],
        "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
        "capacity": {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": "8"},
        "nodeInfo": {"kubeletVersion": "v1.34.4", "machineID": "x" * 32},
    }
    for path, value in edits.items():
        section, key = path.split("__")
        body.setdefault(section, {})[key] = value
    return as_served(body)


def test_the_store_drops_managed_fields_and_last_applied_on_every_path() -> None:
    served = as_served(obj("a", 1, spec={"x": 1}), **{WAKE_ANNOTATION: "2026-01-01T00:00:00Z"})
    newer = as_served(obj("a", 2, spec={"x": 2}))
    api = FakeApi([served], 5, [[{"type": "ADDED", "object": as_served(obj("b", 6))}]])
    seen: list[dict[str, Any] | None] = []
    informer = Informer("things", api.list, handler=lambda kind, old, new: seen.append(new))
    informer.run(api.stop)
    stored = informer.get("a")
    assert stored is not None and "managedFields" not in stored["metadata"]
    # the annotations the operator reads stay; kubectl's copy of the whole object goes
    assert stored["metadata"]["annotations"] == {WAKE_ANNOTATION: "2026-01-01T00:00:00Z"}
    assert stored["spec"] == {"x": 1} and stored["metadata"]["resourceVersion"] == "1"
    assert all(b is not None and "managedFields" not in b["metadata"] for b in seen)  # handlers too
    watched = informer.get("b")
    assert watched is not None and "managedFields" not in watched["metadata"]

    informer.written(newer)  # the API server's answer to a write this process made
    kept = informer.get("a")
    assert kept is not None and kept["spec"] == {"x": 2} and "managedFields" not in kept["metadata"]
    assert "managedFields" in newer["metadata"]  # the caller's object is left as it was


def test_slim_copies_the_metadata_and_shares_the_rest() -> None:
    served = as_served(obj("a", 1, spec={"x": 1}, status={"phase": "Ready"}))
    slimmed = slim(served)
    assert set(slimmed) == set(served)
    assert slimmed["metadata"] == {
        **{k: v for k, v in served["metadata"].items() if k != "managedFields"},
        "annotations": {},  # kubectl's copy was the only one
    }
    assert slimmed["spec"] is served["spec"] and slimmed["status"] is served["status"]
    assert slim({"kind": "Status"}) == {"kind": "Status"}  # no metadata: nothing to drop


def test_a_slim_node_takes_work_exactly_when_the_full_one_does() -> None:
    variants = [
        real_node("ready"),
        real_node("not-ready", status__conditions=[{"type": "Ready", "status": "False"}]),
        real_node("cordoned", spec__unschedulable=True),
        real_node("tainted", spec__taints=[{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}]),
        real_node("going", metadata__deletionTimestamp="2026-01-01T00:00:00Z"),
    ]
    for full in variants:
        slimmed = slim_node(full)
        assert node_accepts(slimmed) == node_accepts(full), full["metadata"]["name"]
        assert set(slimmed["status"]) == {"conditions"}
        assert "managedFields" not in slimmed["metadata"] and "annotations" not in slimmed["metadata"]
        assert slimmed["metadata"]["name"] == full["metadata"]["name"]
        assert slimmed["metadata"]["uid"] == full["metadata"]["uid"]  # drain Events name the node
        assert len(json.dumps(slimmed)) < len(json.dumps(full)) / 4
    # a change that alters whether a node takes work is seen from slim objects as from full ones
    for old in variants:
        for new in variants:
            assert changes.node_changed(slim_node(old), slim_node(new)) == changes.node_changed(old, new)


def test_a_round_from_slim_objects_writes_what_a_round_from_full_ones_writes(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    now = datetime.now(UTC)
    woken = now.strftime("%Y-%m-%dT%H:%M:%SZ")

    paths = {name: make_model_dir(name) for name in ("a", "b", "c")}

    def cluster(shape: Any, node_shape: Any) -> ClusterState:
        models = [llm(name, path) for name, path in paths.items()]
        models[1]["metadata"]["annotations"] = {WAKE_ANNOTATION: woken}
        models[2]["spec"]["priority"] = 7
        return ClusterState(
            [shape(m) for m in models],
            [shape(profile(n, 10**9, heartbeat=now)) for n in ("gpu-1", "gpu-2")],
            [node_shape(real_node("gpu-1", spec__unschedulable=True)), node_shape(real_node("gpu-2"))],
            [],
            node_leases=[shape(node_lease(n, now)) for n in ("gpu-1", "gpu-2")],
        )

    written = []
    for shape, node_shape in ((as_served, lambda n: n), (lambda b: slim(as_served(b)), slim_node)):
        state = cluster(shape, node_shape)
        kube = FakeKube(state)
        controller = Controller(kube, knobs(tmp_path), cache=CachedState(state))  # type: ignore[arg-type]
        report = controller.round()
        placements = {k: (p["spec"], p["metadata"]["labels"]) for k, p in kube.placements.items()}
        statuses = {
            k: {
                **{f: v for f, v in s.items() if f != "conditions"},
                "conditions": [(c["type"], c["status"], c["reason"]) for c in s.get("conditions") or []],
            }
            for k, s in kube.statuses.items()
        }
        written.append((sorted(report.created), placements, statuses))
    assert written[0][0] == ["team-a.a", "team-a.b", "team-a.c"]
    assert written[1] == written[0]
