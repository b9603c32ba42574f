"""Capacity requests for cluster autoscalers (pure builders).

When a model cannot be placed for lack of GPU capacity, the operator creates a placeholder Pod sized to
what the model needs, at a low PriorityClass, owned by the LLMModel. kube-scheduler marks it
Unschedulable, which is the signal cluster-autoscaler and Karpenter scale up on; once the model is
placed, the placeholder is deleted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from residency.modeldir import ModelDirInfo
from residency.names import label_value
from residency.sizing import memory_text
from residency_operator.conditions import Verdict

CAPACITY_LABEL = "residency.dev/capacity-request"
MODEL_LABEL = "residency.dev/model-name"
GPU_BYTES_ANNOTATION = "residency.dev/gpu-bytes"
CAPACITY_REASONS = frozenset(
    {"InsufficientGPUMemory", "InsufficientHostMemory", "InsufficientGPUTime", "HeldForPinnedModel"}
)


@dataclass(frozen=True)
class CapacityConfig:
    """How placeholder Pods look: the GPU node pool's selector and tolerations come from the chart."""

    enabled: bool = False  # the chart turns it on (operator.capacityRequests.enabled); --capacity-requests
    gpu_resource: str = "nvidia.com/gpu"
    priority_class: str = "residency-capacity-request"
    image: str = "registry.k8s.io/pause:3.10"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


def needs_capacity(reason: str) -> bool:
    """Whether an Unschedulable reason is a lack of capacity (more nodes would help), not bad input."""
    return reason in CAPACITY_REASONS


def full_residency_gpu_bytes(info: ModelDirInfo, max_sequence_length: int, max_batch_size: int) -> int:
    """GPU bytes the model needs fully resident: the size to ask a new node for."""
    kv_bytes = info.kv_bytes_per_token * max_sequence_length * max_batch_size
    return info.weight_bytes + kv_bytes + info.workspace_bytes(max_sequence_length, max_batch_size)


def pod_name(model_name: str) -> str:
    """A DNS-label pod name for a model's placeholder (hashed when the model name is long)."""
    name = f"capacity-{model_name}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-.')}-{digest}"


def capacity_pod(
    body: dict[str, Any], gpu_bytes: int, host_bytes: int, config: CapacityConfig
) -> dict[str, Any]:
    """The placeholder Pod for one LLMModel."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {CAPACITY_LABEL: "true", MODEL_LABEL: label_value(meta["name"])},
            "annotations": {
                GPU_BYTES_ANNOTATION: str(gpu_bytes),
                "residency.dev/reason": "capacity request for an LLMModel that fits no GPU node",
                # the autoscaler may remove the node again once the model runs elsewhere
                "cluster-autoscaler.kubernetes.io/safe-to-evict": "true",
            },
            "ownerReferences": [
                {
                    "apiVersion": "residency.dev/v1alpha1",
                    "kind": "LLMModel",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "priorityClassName": config.priority_class,
            "nodeSelector": dict(config.node_selector),
            "tolerations": list(config.tolerations),
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "restartPolicy": "Always",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65535},
            "containers": [
                {
                    "name": "capacity-request",
                    "image": config.image,
                    "resources": {
                        "requests": {config.gpu_resource: "1", "memory": str(max(host_bytes, 64 * 2**20))},
                        "limits": {config.gpu_resource: "1"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def pod_is_unschedulable(pod: dict[str, Any]) -> bool:
    """kube-scheduler found no node for it (the autoscalers' scale-up signal)."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return bool(condition.get("reason") == "Unschedulable")
    return False


def waiting_verdict(verdict: Verdict, pod: dict[str, Any], gpu_bytes: int, config: CapacityConfig) -> Verdict:
    """An Unschedulable verdict turned WaitingForCapacity: the cluster was asked for a node."""
    meta = pod["metadata"]
    message = (
        "asked the cluster autoscaler for a GPU node: "
        f"capacity-request pod {meta['namespace']}/{meta['name']} "
        f"(1 {config.gpu_resource}, {memory_text(gpu_bytes)} of GPU memory needed); {verdict.message}"
    )
    conditions = tuple(
        (c[0], c[1], "WaitingForCapacity", message) if c[0] in ("Scheduled", "Ready") else c
        for c in verdict.conditions
    )
    return Verdict("WaitingForCapacity", "WaitingForCapacity", message, conditions, verdict.extra)
