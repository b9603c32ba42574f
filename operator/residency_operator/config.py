"""Operator settings, from the command line or the environment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from residency_operator.capacity import CapacityConfig


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs to know that is not in the cluster."""

    allowed_model_roots: list[Path] = field(default_factory=list)
    remote_code_roots: list[Path] = field(default_factory=list)  # models with custom code allowed: none
    resync_seconds: float = 20.0
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    workspace_bytes: int = 64 * 1024  # extra per-model slack beyond the engine's own sizing
    heartbeat_grace_seconds: float = 60.0
    lease_namespace: str = "default"
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    metrics_port: int = 0  # 0: no metrics endpoint
    write_qps: float = 200.0  # the operator's API writes per second after a burst (0: unlimited)
    write_burst: int = 400
    incremental_min_models: int = 2000  # single-model changes planned incrementally from this fleet size

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """RESIDENCY_MODEL_ROOTS (os.pathsep-separated), RESIDENCY_RESYNC_SECONDS, RESIDENCY_WORKSPACE_BYTES,
        RESIDENCY_HEARTBEAT_GRACE_SECONDS, RESIDENCY_NAMESPACE (where the leader Lease lives),
        RESIDENCY_REMOTE_CODE_ROOTS (os.pathsep-separated roots where trust_remote_code is allowed),
        RESIDENCY_CAPACITY_*
        (placeholder pods for autoscalers; selector and tolerations as JSON), RESIDENCY_METRICS_PORT,
        RESIDENCY_API_WRITE_QPS and RESIDENCY_API_WRITE_BURST (the operator's write rate limit),
        RESIDENCY_INCREMENTAL_MIN_MODELS (the fleet size from which single-model changes are planned
        incrementally)."""
        roots = [Path(p) for p in os.environ.get("RESIDENCY_MODEL_ROOTS", "").split(os.pathsep) if p]
        remote = [Path(p) for p in os.environ.get("RESIDENCY_REMOTE_CODE_ROOTS", "").split(os.pathsep) if p]
        return cls(
            allowed_model_roots=roots,
            remote_code_roots=remote,
            resync_seconds=float(os.environ.get("RESIDENCY_RESYNC_SECONDS", "20")),
            workspace_bytes=int(os.environ.get("RESIDENCY_WORKSPACE_BYTES", str(64 * 1024))),
            heartbeat_grace_seconds=float(os.environ.get("RESIDENCY_HEARTBEAT_GRACE_SECONDS", "60")),
            lease_namespace=os.environ.get("RESIDENCY_NAMESPACE", "default"),
            capacity=CapacityConfig(
                enabled=os.environ.get("RESIDENCY_CAPACITY_REQUESTS", "false").lower() == "true",
                gpu_resource=os.environ.get("RESIDENCY_GPU_RESOURCE", "nvidia.com/gpu"),
                priority_class=os.environ.get(
                    "RESIDENCY_CAPACITY_PRIORITY_CLASS", "residency-capacity-request"
                ),
                image=os.environ.get("RESIDENCY_CAPACITY_IMAGE", "registry.k8s.io/pause:3.10"),
                node_selector=json.loads(os.environ.get("RESIDENCY_CAPACITY_NODE_SELECTOR", "{}")),
                tolerations=json.loads(os.environ.get("RESIDENCY_CAPACITY_TOLERATIONS", "[]")),
            ),
            metrics_port=int(os.environ.get("RESIDENCY_METRICS_PORT", "0")),
            write_qps=float(os.environ.get("RESIDENCY_API_WRITE_QPS", "200")),
            write_burst=int(os.environ.get("RESIDENCY_API_WRITE_BURST", "400")),
            incremental_min_models=int(os.environ.get("RESIDENCY_INCREMENTAL_MIN_MODELS", "2000")),
        )
