"""NodeProfile: what a worker measured about its node (cluster-scoped, named after the Node)."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from residency.api.common import MAX_GPUS_PER_NODE, ApiModel, Condition, CustomResource, StatusModel


class GpuDevice(ApiModel):
    """One GPU of a node, as its worker measured it."""

    index: int = Field(
        ge=0, lt=MAX_GPUS_PER_NODE, description="The GPU's index on the node (the worker's numbering)."
    )
    name: str = Field(min_length=1, max_length=128, description="GPU model (pynvml) or 'emulated-cpu'.")
    memory_bytes: int = Field(ge=0, description="GPU memory budget residency may use on this GPU.")
    hbm_gbps: float = Field(gt=0, description="Measured device memory GB/s.")
    host_to_device_gbps: float = Field(
        gt=0, description="Measured pinned host-to-device GB/s, this GPU alone."
    )
    host_link: int = Field(
        default=0,
        ge=0,
        description="The host link (PCIe root/switch) it copies through; GPUs with one id share it.",
    )
    numa_node: int | None = Field(default=None, ge=0, description="NUMA node of its host link, when known.")


class HostLink(ApiModel):
    """A host link several GPUs copy through, and what it carries when they all copy at once."""

    id: int = Field(ge=0)
    gpus: list[int] = Field(
        min_length=1, max_length=MAX_GPUS_PER_NODE, description="Indices of the GPUs behind this link."
    )
    concurrent_host_to_device_gbps: float = Field(
        gt=0, description="Measured aggregate host-to-device GB/s with all its GPUs copying at the same time."
    )


class NodeProfileSpec(ApiModel):
    """Capacity and measured bandwidths of one GPU node.

    The node-level GPU fields describe the whole node: ``gpuMemoryBytes`` is the sum over its GPUs, the
    bandwidths are one GPU's. ``gpus`` (written by workers that drive several GPUs) describes each; a profile
    without it is a node of ``gpuCount`` identical GPUs sharing ``gpuMemoryBytes`` equally.
    """

    node_name: str = Field(min_length=1, max_length=253, description="The Node this profile describes.")
    gpu_type: str = Field(min_length=1, max_length=128, description="GPU model (pynvml) or 'emulated-cpu'.")
    gpu_count: int = Field(default=1, ge=1, le=64)
    gpu_memory_bytes: int = Field(ge=0, description="GPU memory budget residency may use on this node.")
    host_memory_bytes: int = Field(ge=0, description="Host memory budget for offloaded and cached weights.")
    host_to_device_gbps: float = Field(gt=0, description="Measured pinned host-to-device GB/s.")
    device_to_host_gbps: float | None = Field(default=None, gt=0, description="Measured device-to-host GB/s.")
    hbm_gbps: float = Field(gt=0, description="Measured device memory GB/s.")
    host_memory_gbps: float | None = Field(default=None, gt=0, description="Measured host memory GB/s.")
    emulated: bool = Field(description="True when the GPU tier is emulated on the CPU.")
    model_workspace_bytes: int | None = Field(
        default=None, ge=0, description="GPU bytes the engine keeps per model beside weights and KV."
    )
    gpus: list[GpuDevice] = Field(
        default_factory=list,
        max_length=MAX_GPUS_PER_NODE,
        description="Each GPU the worker drives, measured (empty: see gpuCount).",
    )
    host_links: list[HostLink] = Field(
        default_factory=list,
        max_length=MAX_GPUS_PER_NODE,
        description="Host links shared by several GPUs, with concurrent GB/s.",
    )
    device_to_device_gbps: float | None = Field(
        default=None,
        gt=0,
        description="Measured GPU-to-GPU copy GB/s (activations between a split's stages).",
    )
    worker_endpoint: str | None = Field(default=None, max_length=2048, description="Worker's base URL.")


class NodeProfileStatus(StatusModel):
    """What the worker currently holds."""

    resident_bytes: int | None = Field(default=None, ge=0, description="Weight + KV bytes in GPU memory now.")
    host_cached_bytes: int | None = Field(default=None, ge=0)
    heartbeat_time: datetime | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class NodeProfile(CustomResource):
    """A GPU node as residency sees it."""

    kind_name: ClassVar[str] = "NodeProfile"
    plural: ClassVar[str] = "nodeprofiles"
    singular: ClassVar[str] = "nodeprofile"
    short_names: ClassVar[list[str]] = ["rnp"]
    scope: ClassVar[Literal["Namespaced", "Cluster"]] = "Cluster"
    description: ClassVar[str] = "Measured capacity and bandwidth of one GPU node, written by its worker."
    printer_columns: ClassVar[list[dict[str, object]]] = [
        {"name": "GPU", "type": "string", "jsonPath": ".spec.gpuType"},
        {"name": "GPUs", "type": "integer", "jsonPath": ".spec.gpuCount"},
        {"name": "Memory", "type": "integer", "jsonPath": ".spec.gpuMemoryBytes"},
        {"name": "H2D GB/s", "type": "number", "jsonPath": ".spec.hostToDeviceGbps"},
        {"name": "Emulated", "type": "boolean", "jsonPath": ".spec.emulated"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]

    kind: Literal["NodeProfile"] = "NodeProfile"
    spec: NodeProfileSpec
    status: NodeProfileStatus | None = None
