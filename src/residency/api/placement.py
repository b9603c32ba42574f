"""ModelPlacement: the operator's decision for one model on one node (cluster-scoped binding)."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from residency.api.common import (
    MAX_GPUS_PER_NODE,
    ApiModel,
    Condition,
    CustomResource,
    GpuResidency,
    StatusModel,
)
from residency.api.llmmodel import DType, Operation, Timings

ExecutionMode = Literal["stream", "cpu"]
"""How a placement decodes its offloaded layers: ``stream`` copies them to the GPU each step, ``cpu`` computes
them on the host, where they live. Prefill streams them in both modes (:data:`PREFILL_MODE`)."""
PREFILL_MODE: ExecutionMode = "stream"
"""How every placement prefills its offloaded layers. A prompt is hundreds of tokens per weight read, so
prefill is compute-bound: a host CPU (about 1 TFLOPS against a GPU's hundreds) computing the offloaded
layers is slower than copying them over the link (an 8B model 10 % offloaded on an L4: about 1.8 s for a
512-token prompt on the host, 0.19 s streamed). Decode reads every weight once per token, and there the
host's memory bandwidth can beat the link: that is the only phase ``cpu`` mode changes. Both modes
therefore hold streaming's staging buffers."""
DesiredState = Literal["Loaded", "Preempted", "Idle"]


class ModelRef(ApiModel):
    """The LLMModel a placement serves."""

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    uid: str | None = Field(default=None, max_length=64)


SHARE_TOLERANCE = 1e-6
"""How far the GPUs' shares may sum from residentFraction (float rounding)."""


class GpuShare(ApiModel):
    """One GPU of a placement's pipeline and the share of the model's weight bytes it holds.

    A split model's layers run in the order of ``spec.gpus``: the first GPU holds the first layers, the
    activations pass device to device, and whatever no GPU holds stays in host memory (streamed or computed
    there, as ``executionMode`` says). A model's KV cache lives with its layers.
    """

    index: int = Field(
        ge=0, lt=MAX_GPUS_PER_NODE, description="The GPU's index on the node (as the worker numbers them)."
    )
    resident_fraction: float = Field(ge=0, le=1, description="Share of the model's weight bytes on this GPU.")


def gpu_set_label(node_name: str, gpus: list[int]) -> str:
    """``gpu-a/0,1``: where a placement runs, for ``kubectl get -o wide``."""
    return f"{node_name}/{','.join(str(index) for index in gpus)}" if gpus else node_name


class ModelPlacementSpec(ApiModel):
    """Desired state of one model on one node; the worker converges to it."""

    model: ModelRef
    node_name: str = Field(min_length=1, max_length=253)
    source_path: str = Field(min_length=1, max_length=4096)
    dtype: DType = "bfloat16"
    resident_fraction: float = Field(ge=0, le=1, description="Target share of weight bytes in GPU memory.")
    min_resident_fraction: float = Field(
        default=0.0, ge=0, le=1, description="1 - offload.maxFraction: the worker never keeps less resident."
    )
    execution_mode: ExecutionMode = Field(
        default="stream",
        description="How offloaded layers decode: stream (copied to the GPU) or cpu (computed on the host); "
        "prefill streams them in both.",
    )
    gpus: list[GpuShare] = Field(
        default_factory=list,
        max_length=MAX_GPUS_PER_NODE,
        description="The node's GPUs the model runs on, in pipeline order (the first holds the first layers),"
        " each with its share of weight bytes; the shares sum to residentFraction. Empty: GPU 0 holds "
        "residentFraction (a single-GPU placement). A placement never spans nodes.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(g, self.exists_one(h, h.index == g.index))",
                    "message": "a GPU appears at most once in spec.gpus",
                }
            ]
        },
    )
    desired_state: DesiredState = Field(default="Loaded")
    max_sequence_length: int = Field(default=4096, ge=1, le=1_048_576)
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    min_decode_tokens_per_second: float | None = Field(
        default=None,
        gt=0,
        description="The model's decode SLO: the worker paces it to this (times a headroom) while a model "
        "beside it on the GPU has requests waiting for a batch slot.",
    )
    reason: str | None = Field(default=None, max_length=1024, description="Why the planner chose this.")
    plan_generation: int | None = Field(default=None, ge=0, description="Planner round that wrote this.")

    @model_validator(mode="after")
    def _gpus_sum_to_resident_fraction(self) -> ModelPlacementSpec:
        indices = [share.index for share in self.gpus]
        if len(set(indices)) != len(indices):
            raise ValueError(f"gpus: a GPU appears more than once: {indices}")
        if self.gpus:
            total = sum(share.resident_fraction for share in self.gpus)
            if abs(total - self.resident_fraction) > SHARE_TOLERANCE:
                raise ValueError(
                    f"gpus: the shares sum to {total:.6f}, not residentFraction {self.resident_fraction:.6f}"
                )
        return self

    def gpu_indices(self) -> list[int]:
        """The GPUs in pipeline order (``[0]`` for a single-GPU placement written before splits existed)."""
        return [share.index for share in self.gpus] or [0]


class ObservedDemand(StatusModel):
    """Traffic the worker saw for the model over its last window: what the planner sizes GPU time for."""

    decode_tokens_per_second: float = Field(
        ge=0, description="Output tokens/s asked for (finished requests' tokens, in-flight ones' expected)."
    )
    prompt_tokens_per_second: float = Field(ge=0, description="Prompt tokens/s to prefill.")
    typical_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Mean prompt length of the window's requests (none without one)."
    )
    window_seconds: float = Field(gt=0, description="Seconds the rates are averaged over.")


class ObservedStep(StatusModel):
    """The model's median decode step over the worker's last window, at the window's most common batch: the
    observed point the planner anchors the model's predicted curve to (see docs/profiles.md)."""

    batch: int = Field(ge=1, le=1024, description="Sequences decoded per step.")
    sequence_tokens: int = Field(ge=1, description="Mean context tokens of those sequences.")
    step_seconds: float = Field(gt=0, description="Median seconds of one decode step (pacing left out).")
    steps: int = Field(ge=1, description="Decode steps the median is over.")
    window_seconds: float = Field(gt=0, description="Seconds of serving those steps span.")
    resident_fraction: float = Field(ge=0, le=1, description="Residency the steps ran at.")
    execution_mode: ExecutionMode = Field(description="How the offloaded layers decoded.")


class ModelPlacementStatus(StatusModel):
    """What the worker did."""

    state: Literal["Pending", "Loading", "Loaded", "Preempted", "Idle", "Failed", "Unloaded"] = "Pending"
    resident_fraction: float | None = Field(default=None, ge=0, le=1)
    execution_mode: ExecutionMode | None = Field(
        default=None, description="How the worker runs the offloaded layers now (may lag the spec's)."
    )
    resident_bytes: int | None = Field(default=None, ge=0)
    gpus: list[GpuResidency] = Field(
        default_factory=list,
        max_length=MAX_GPUS_PER_NODE,
        description="Per-GPU residency, in pipeline order.",
    )
    observed_decode_tokens_per_second: float | None = Field(default=None, ge=0)
    observed_step: ObservedStep | None = Field(
        default=None, description="The median decode step of the last window (what the planner learns from)."
    )
    timings: Timings | None = None
    last_operation: Operation | None = Field(
        default=None,
        description="The last load, reload, demotion, promotion, preemption or resume, measured.",
    )
    endpoint: str | None = Field(default=None, max_length=2048)
    last_active_time: datetime | None = Field(
        default=None, description="When the model last had a request or a running sequence (idle scale-down)."
    )
    queued_requests: int | None = Field(
        default=None,
        ge=0,
        description="Requests waiting for a batch slot when last reported (the planner swaps nothing onto a "
        "node whose models queue).",
    )
    demand: ObservedDemand | None = Field(
        default=None, description="Traffic seen while Loaded (the planner's demand estimate for the model)."
    )
    reason: str | None = Field(default=None, max_length=128)
    message: str | None = Field(default=None, max_length=4096)
    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class ModelPlacement(CustomResource):
    """Binding of an LLMModel to a node with a resident fraction and a desired state."""

    kind_name: ClassVar[str] = "ModelPlacement"
    plural: ClassVar[str] = "modelplacements"
    singular: ClassVar[str] = "modelplacement"
    short_names: ClassVar[list[str]] = ["mpl"]
    scope: ClassVar[Literal["Namespaced", "Cluster"]] = "Cluster"
    description: ClassVar[str] = "Where one LLMModel runs and how much of it is resident (operator-written)."
    printer_columns: ClassVar[list[dict[str, object]]] = [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
        {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
        {
            "name": "Resident",
            "type": "number",
            "jsonPath": ".spec.residentFraction",
            "description": "Share of weight bytes the planner keeps in GPU memory",
        },
        {
            "name": "Mode",
            "type": "string",
            "jsonPath": ".spec.executionMode",
            "description": "How offloaded layers decode: stream (copied to the GPU) or cpu (on the host)",
        },
        {"name": "Desired", "type": "string", "jsonPath": ".spec.desiredState"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Namespace", "type": "string", "jsonPath": ".spec.model.namespace", "priority": 1},
        {
            "name": "Held",
            "type": "number",
            "jsonPath": ".status.residentFraction",
            "priority": 1,
            "description": "Share of weight bytes the worker holds in GPU memory now",
        },
        {"name": "Reason", "type": "string", "jsonPath": ".spec.reason", "priority": 1},
    ]

    kind: Literal["ModelPlacement"] = "ModelPlacement"
    spec: ModelPlacementSpec
    status: ModelPlacementStatus | None = None
