"""SensitivityProfile: measured decode/prefill rate against resident fraction, per model and GPU type."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from residency.api.common import ApiModel, CustomResource
from residency.api.placement import ExecutionMode


class SensitivityPoint(ApiModel):
    """One measurement: rate at a resident fraction, sequence length and execution mode."""

    resident_fraction: float = Field(ge=0, le=1)
    execution_mode: ExecutionMode
    sequence_length: int = Field(ge=1, le=1_048_576)
    batch_size: int = Field(default=1, ge=1, le=1024)
    decode_tokens_per_second: float = Field(ge=0)
    prefill_tokens_per_second: float | None = Field(default=None, ge=0)
    trials: int = Field(default=1, ge=1)


class SensitivityProfileSpec(ApiModel):
    """A model's measured offload-sensitivity curve on one GPU type."""

    model_path: str = Field(min_length=1, max_length=4096)
    model_name: str | None = Field(default=None, max_length=253)
    gpu_type: str = Field(min_length=1, max_length=128)
    dtype: str = Field(default="bfloat16", max_length=32)
    weight_bytes: int = Field(ge=0)
    emulated: bool = Field(description="True when measured on an emulated GPU tier.")
    points: list[SensitivityPoint] = Field(min_length=1, max_length=4096)


class SensitivityProfile(CustomResource):
    """Measured offload sensitivity of one model on one GPU type."""

    kind_name: ClassVar[str] = "SensitivityProfile"
    plural: ClassVar[str] = "sensitivityprofiles"
    singular: ClassVar[str] = "sensitivityprofile"
    short_names: ClassVar[list[str]] = ["rsp"]
    scope: ClassVar[Literal["Namespaced", "Cluster"]] = "Namespaced"
    description: ClassVar[str] = (
        "Decode/prefill tokens/s against resident fraction for a model on a GPU type."
    )
    printer_columns: ClassVar[list[dict[str, object]]] = [
        {"name": "GPU", "type": "string", "jsonPath": ".spec.gpuType"},
        {"name": "Emulated", "type": "boolean", "jsonPath": ".spec.emulated"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]

    kind: Literal["SensitivityProfile"] = "SensitivityProfile"
    spec: SensitivityProfileSpec
