"""Cluster autoscaler cooperation: a capacity-request pod for a model that fits nowhere, a new node, Ready."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import NodePool, model_status
from harness import SMALL_LIMITS, Process, apply, get_json, kubectl, llm, wait_for, wait_for_node_event

CAPACITY = "residency.dev/capacity-request=true"


@pytest.fixture(autouse=True)
def capacity_requests_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Placeholder Pods are off unless asked for (the chart's operator.capacityRequests.enabled): this
    module's operator asks (set before the operator fixture starts it)."""
    monkeypatch.setenv("RESIDENCY_CAPACITY_REQUESTS", "true")


def capacity_pods(namespace: str) -> list[dict[str, Any]]:
    return list(get_json("pods", "-n", namespace, "-l", CAPACITY).get("items", []))


def unschedulable(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


class StaticNodeGroupAutoscaler:
    """Behaves like cluster-autoscaler on a static node group: an unschedulable placeholder → one new node."""

    def __init__(self, pool: NodePool, gpu_memory: str) -> None:
        self.pool = pool
        self.gpu_memory = gpu_memory
        self.added: list[str] = []

    def scale_up_for(self, namespace: str) -> bool:
        pending = [p for p in capacity_pods(namespace) if unschedulable(p)]
        if not pending:
            return False
        name = f"gpu-scaled-{len(self.added) + 1}"
        node = self.pool.add(name, self.gpu_memory)
        capacity = {"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi", "pods": "110"}
        kubectl(
            "patch",
            "node",
            node.name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"capacity": capacity, "allocatable": capacity}}),
        )
        self.added.append(name)
        return True


def test_model_too_big_waits_for_capacity_then_a_new_node_serves_it(
    namespace: str, operator: Process, gpu_nodes: NodePool, models_root: Path
) -> None:
    gpu_nodes.add("gpu-small-1", "700000")
    apply(
        llm(
            "big",
            models_root / "tiny-llama",
            maxSequenceLength=256,
            maxBatchSize=4,
            offload={"maxFraction": 0.0},
        ),
        namespace,
    )
    status = wait_for(
        lambda: (s := model_status(namespace, "big")).get("phase") == "WaitingForCapacity" and s,
        90,
        what="WaitingForCapacity",
    )
    assert "capacity-request pod" in status["message"]
    # sizes in the unit that fits (a 700 kB node is not "0.0 GiB")
    assert re.search(r"\d+(\.\d)? (KiB|MiB) of GPU memory needed", status["message"]), status["message"]
    pods = wait_for(
        lambda: [p for p in capacity_pods(namespace) if unschedulable(p)],
        90,
        what="kube-scheduler to mark the placeholder Unschedulable",
    )
    pod = pods[0]
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "LLMModel"
    assert pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["priorityClassName"] == "residency-capacity-request"

    autoscaler = StaticNodeGroupAutoscaler(gpu_nodes, "64MiB")
    assert autoscaler.scale_up_for(namespace)
    ready = wait_for(
        lambda: (s := model_status(namespace, "big")).get("phase") == "Ready" and s,
        120,
        what="Ready on the new node",
    )
    assert ready["node"] == autoscaler.added[0]
    wait_for(lambda: not capacity_pods(namespace), 60, what="placeholder deleted")


def test_worker_pod_is_protected_from_scale_down_while_it_serves(
    namespace: str, operator: Process, gpu_nodes: NodePool, models_root: Path
) -> None:
    # the worker's own Pod, as the DaemonSet would create it (no kubelet here: the object never runs)
    kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "worker-pod"},
                "spec": {"nodeName": "gpu-guarded", "containers": [{"name": "w", "image": "residency:dev"}]},
            }
        ),
    )
    gpu_nodes.add(
        "gpu-guarded", "64MiB", extra_args=("--pod-name", "worker-pod", "--pod-namespace", namespace)
    )

    def annotations() -> dict[str, str]:
        return dict(get_json("pod", "worker-pod", "-n", namespace)["metadata"].get("annotations") or {})

    apply(llm("busy", models_root / "tiny-llama", **SMALL_LIMITS), namespace)
    wait_for(lambda: annotations().get("karpenter.sh/do-not-disrupt") == "true", 120, what="protected")
    assert annotations()["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    kubectl("delete", "llm", "busy", "-n", namespace, "--timeout=120s")
    wait_for(
        lambda: "karpenter.sh/do-not-disrupt" not in annotations(), 60, what="protection removed when idle"
    )
    assert "cluster-autoscaler.kubernetes.io/safe-to-evict" not in annotations()


def test_idle_model_releases_gpu_memory_and_resumes_on_the_next_request(
    namespace: str, operator: Process, gpu_nodes: NodePool, router: str, models_root: Path
) -> None:
    node = gpu_nodes.add("gpu-sleepy", "64MiB")
    apply(llm("sleepy", models_root / "tiny-llama", **SMALL_LIMITS, idle={"afterSeconds": 4}), namespace)
    wait_for(lambda: model_status(namespace, "sleepy").get("phase") == "Ready", 120, what="Ready")
    first = httpx.post(
        f"{router}/v1/completions",
        timeout=60,
        json={"model": f"{namespace}/sleepy", "prompt": "Wake up", "max_tokens": 8, "temperature": 0},
    )
    assert first.status_code == 200, first.text
    idle = wait_for(
        lambda: (s := model_status(namespace, "sleepy")).get("phase") == "Idle" and s,
        60,
        what="Idle after 4 s without requests",
    )
    assert idle["reason"] == "IdleTimeout" and "host memory" in idle["message"]
    wait_for(
        lambda: ((node.profile() or {}).get("status") or {}).get("residentBytes") == 0,
        30,
        what="GPU memory released",
    )
    started = time.monotonic()
    again = httpx.post(
        f"{router}/v1/completions",
        timeout=90,
        json={"model": f"{namespace}/sleepy", "prompt": "Wake up", "max_tokens": 8, "temperature": 0},
    )
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    print(f"idle resume through the router: {time.monotonic() - started:.2f} s")
    status = wait_for(
        lambda: (s := model_status(namespace, "sleepy")).get("phase") == "Ready" and s, 60, what="Ready again"
    )
    assert status["timings"]["reloadSeconds"] > 0


def test_scale_down_drains_the_node_before_it_goes_with_no_failed_request(
    namespace: str, operator: Process, gpu_nodes: NodePool, router: str, models_root: Path
) -> None:
    gpu_nodes.add("gpu-keep", "64MiB")
    doomed = gpu_nodes.add("gpu-doomed", "64MiB")
    kubectl("cordon", "gpu-keep")  # so that the model lands on the node the autoscaler will remove
    apply(llm("tenant", models_root / "tiny-llama", **SMALL_LIMITS), namespace)
    wait_for(
        lambda: model_status(namespace, "tenant").get("node") == "gpu-doomed"
        and model_status(namespace, "tenant").get("phase") == "Ready",
        120,
        what="Ready on gpu-doomed",
    )
    kubectl("uncordon", "gpu-keep")
    outcomes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            response = httpx.post(
                f"{router}/v1/completions",
                timeout=120,
                json={
                    "model": f"{namespace}/tenant",
                    "prompt": "Still there?",
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            outcomes.append(response.status_code)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        # what cluster-autoscaler does to a node it removes: taint, then wait for residency to drain it
        taint = {
            "spec": {
                "taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}],
                "unschedulable": True,
            }
        }
        kubectl("patch", "node", doomed.name, "--type=merge", "-p", json.dumps(taint))
        drained = wait_for_node_event(doomed.name, "Drained", 120)
        assert "moved every model off gpu-doomed" in drained
        wait_for(lambda: model_status(namespace, "tenant").get("node") == "gpu-keep", 60, what="moved")
        doomed.process.stop()
        kubectl("delete", "node", doomed.name)
        wait_for(lambda: model_status(namespace, "tenant").get("phase") == "Ready", 60, what="still Ready")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert outcomes and all(code == 200 for code in outcomes), outcomes
