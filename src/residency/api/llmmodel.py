"""LLMModel: the kind users write. Field names follow DESIGN.md's user-facing contract."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, JsonValue

from residency.api.common import (
    MAX_GPUS_PER_NODE,
    ApiModel,
    Condition,
    CustomResource,
    GpuResidency,
    StatusModel,
)

DType = Literal["float16", "bfloat16", "float32"]
Phase = Literal[
    "Pending",
    "Scheduled",
    "Loading",
    "Ready",
    "Idle",
    "Preempted",
    "Unschedulable",
    "Failed",
    "WaitingForCapacity",
]
MAX_PRIORITY = 1_000_000

# A model path is absolute and normalised: no empty, "." or ".." segments, no trailing slash.
_PATH_RULES: list[JsonValue] = [
    {"rule": "self.startsWith('/')", "message": "source.path must be an absolute path (start with '/')"},
    {
        "rule": "!self.matches('(^|/)[.][.]?(/|$)')",
        "message": "source.path must be normalised: no '.' or '..' segments",
    },
    {"rule": "!self.contains('//')", "message": "source.path must be normalised: no empty segments ('//')"},
    {"rule": "self == '/' || !self.endsWith('/')", "message": "source.path must not end with '/'"},
]


class ModelSource(ApiModel):
    """Where the weights are: a Hugging Face format directory on the node."""

    path: str = Field(
        min_length=1,
        max_length=4096,
        # no control characters, and none of the invisible or bidirectional format characters that make
        # a path read as something else (zero-width spaces, RTL overrides, BOM)
        pattern=r"^[^\x00-\x1f\x7f-\x9f\x{200b}-\x{200f}\x{2028}-\x{202e}\x{2060}-\x{2069}\x{feff}]+$",
        description="Absolute path of a Hugging Face model dir (config.json, *.safetensors, tokenizer).",
        json_schema_extra={"x-kubernetes-validations": _PATH_RULES},
    )


class SLOSpec(ApiModel):
    """Service level the placement must keep."""

    min_decode_tokens_per_second: float = Field(
        gt=0, le=1_000_000, description="Placement keeps the predicted decode rate at or above this."
    )
    max_time_to_first_token_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="The router admits as many concurrent requests as the model serves within this time to "
        "first token and answers the rest 429 with Retry-After at once (default: the router's, 2 s).",
    )


class OffloadSpec(ApiModel):
    """How much of the weights may live in host memory instead of GPU memory."""

    max_fraction: float = Field(
        default=0.75, ge=0, le=1, description="At most this share of weight bytes may be offloaded to host."
    )


class IdleSpec(ApiModel):
    """Scale to zero: release GPU memory after a quiet period, resume on the next request."""

    after_seconds: int = Field(
        ge=1, le=30 * 24 * 3600, description="Seconds without requests after which the model goes Idle."
    )


class LLMModelSpec(ApiModel):
    """What a user asks for."""

    source: ModelSource = Field(description="The model directory.")
    dtype: DType = Field(default="bfloat16", description="Weight dtype: float16, bfloat16 or float32.")
    priority: int = Field(
        default=0, ge=0, le=MAX_PRIORITY, description=f"0..{MAX_PRIORITY}; higher may preempt lower."
    )
    preemptible: bool = Field(default=True, description="May be preempted by higher-priority models.")
    slo: SLOSpec | None = Field(default=None, description="Decode-rate objective used by the planner.")
    offload: OffloadSpec = Field(default_factory=OffloadSpec, description="Offload limits.")
    max_sequence_length: int = Field(
        default=4096, ge=1, le=1_048_576, description="Longest prompt + output, in tokens (KV reservation)."
    )
    max_batch_size: int = Field(default=8, ge=1, le=1024, description="Concurrent sequences per batch.")
    idle: IdleSpec | None = Field(default=None, description="Release GPU memory when idle (scale to zero).")


class ObservedRates(StatusModel):
    """Rates measured by the worker."""

    decode_tokens_per_second: float | None = Field(default=None, ge=0)
    prefill_tokens_per_second: float | None = Field(default=None, ge=0)
    window_decode_tokens_per_second: float | None = Field(
        default=None,
        ge=0,
        description="Per-sequence decode rate of the median step of the worker's last window.",
    )
    window_batch: int | None = Field(default=None, ge=1, description="Batch size of those steps.")
    ratio_to_prediction: float | None = Field(
        default=None,
        ge=0,
        description="windowDecodeTokensPerSecond ÷ what the profile, fit or roofline predicted at the same "
        "residency, mode, batch and context (below 1: slower than predicted; the planner plans with it).",
    )


class Timings(StatusModel):
    """Transfers and loads measured by the worker (device synchronised before each clock read)."""

    load_seconds: float | None = Field(default=None, ge=0)
    reload_seconds: float | None = Field(default=None, ge=0)
    kv_transfer_seconds: float | None = Field(default=None, ge=0)
    weight_bytes: int | None = Field(default=None, ge=0)
    kv_bytes: int | None = Field(default=None, ge=0)
    host_to_device_gbps: float | None = Field(
        default=None,
        ge=0,
        alias="hostToDeviceGBps",  # the contract's spelling (DESIGN.md), not the camel-case generator's
        description="GB/s of the last weight transfer.",
    )
    host_to_device_bytes: int | None = Field(
        default=None, ge=0, description="Bytes of the last weight transfer."
    )
    host_to_device_seconds: float | None = Field(default=None, ge=0, description="Seconds of that transfer.")
    transfer_path: str | None = Field(default=None, max_length=64, description="pinned or pageable.")
    emulated: bool | None = Field(default=None, description="True when measured on an emulated GPU tier.")


OperationAction = Literal["Load", "Reload", "Demote", "Promote", "Preempt", "Resume"]


class Operation(StatusModel):
    """The last lifecycle operation a worker carried out on the model, as it measured it."""

    action: OperationAction = Field(description="Load, Reload, Demote, Promote, Preempt or Resume.")
    seconds: float = Field(ge=0, description="Wall seconds the operation took on the worker.")
    node: str | None = Field(default=None, max_length=253)
    from_fraction: float | None = Field(default=None, ge=0, le=1, description="Resident share before.")
    to_fraction: float | None = Field(default=None, ge=0, le=1, description="Resident share after.")
    moved_bytes: int | None = Field(
        default=None, ge=0, description="Bytes copied to the GPU (weights; KV saved for a preemption)."
    )
    gbps: float | None = Field(default=None, ge=0, description="GB/s of that copy.")
    requests: int | None = Field(
        default=None, ge=0, description="Requests parked (preempt) or continued (resume)."
    )
    time: str | None = Field(default=None, max_length=64, description="When it finished (RFC 3339).")


class LLMModelStatus(StatusModel):
    """What residency decided and observed."""

    phase: Phase = Field(default="Pending", description="Summary of the conditions.")
    reason: str | None = Field(default=None, max_length=128, description="Why the model is in this phase.")
    message: str | None = Field(default=None, max_length=4096)
    node: str | None = Field(default=None, max_length=253, description="Node that holds the model.")
    resident_fraction: float | None = Field(
        default=None, ge=0, le=1, description="Share of weight bytes resident in GPU memory."
    )
    gpu_set: str | None = Field(
        default=None,
        max_length=512,
        description="Node and GPUs that hold the model in pipeline order, e.g. gpu-a/0,1.",
    )
    gpus: list[GpuResidency] = Field(
        default_factory=list,
        max_length=MAX_GPUS_PER_NODE,
        description="Per-GPU residency of the model, in pipeline order.",
    )
    resident_percent: int | None = Field(
        default=None, ge=0, le=100, description="residentFraction as a whole percent (for kubectl get)."
    )
    execution_mode: Literal["stream", "cpu"] | None = Field(default=None)
    predicted_decode_tokens_per_second: float | None = Field(default=None, ge=0)
    prediction_source: Literal["observed", "profile", "fitted", "roofline"] | None = Field(
        default=None,
        description="Where predictedDecodeTokensPerSecond came from: the model's own decode steps observed "
        "on this GPU type (scaled to other residencies by the curve below it), its measured profile, "
        "the engine model fitted per GPU type, or the node's bandwidth roofline.",
    )
    observed: ObservedRates | None = None
    timings: Timings | None = None
    last_operation: Operation | None = Field(
        default=None, description="The last load, reload, demotion, promotion, preemption or resume."
    )
    endpoint: str | None = Field(default=None, max_length=2048, description="URL that serves the model.")
    architecture: str | None = Field(default=None, max_length=128, description="config.json model_type.")
    weight_bytes: int | None = Field(default=None, ge=0, description="Total weight bytes at spec.dtype.")
    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class LLMModel(CustomResource):
    """An LLM that should be served somewhere in the fleet."""

    kind_name: ClassVar[str] = "LLMModel"
    plural: ClassVar[str] = "llmmodels"
    singular: ClassVar[str] = "llmmodel"
    short_names: ClassVar[list[str]] = ["llm"]
    description: ClassVar[str] = (
        "An LLM served by residency: where it runs and how much of it stays resident in GPU memory."
    )
    printer_columns: ClassVar[list[dict[str, object]]] = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Node", "type": "string", "jsonPath": ".status.node"},
        {
            "name": "Resident%",
            "type": "integer",
            "jsonPath": ".status.residentPercent",
            "description": "Percent of weight bytes resident in GPU memory",
        },
        {
            "name": "Tok/s",
            "type": "number",
            "jsonPath": ".status.observed.decodeTokensPerSecond",
            "description": "Observed decode tokens per second",
        },
        {
            "name": "Predicted",
            "type": "string",
            "jsonPath": ".status.predictionSource",
            "description": "Where the decode prediction came from: profile, fitted or roofline",
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority", "priority": 1},
        {"name": "GPUs", "type": "string", "jsonPath": ".status.gpuSet", "priority": 1},
        {
            "name": "Mode",
            "type": "string",
            "jsonPath": ".status.executionMode",
            "priority": 1,
            "description": "How offloaded layers decode: stream or cpu",
        },
        {
            "name": "SLO",
            "type": "number",
            "jsonPath": ".spec.slo.minDecodeTokensPerSecond",
            "priority": 1,
            "description": "Minimum decode tokens per second",
        },
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    ]

    kind: Literal["LLMModel"] = "LLMModel"
    spec: LLMModelSpec
    status: LLMModelStatus | None = None
