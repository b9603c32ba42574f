"""SensitivityProfile: measured decode/prefill rate against resident fraction, per model and GPU type."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, JsonValue, model_validator

from residency.api.common import ApiModel, Condition, CustomResource, StatusModel
from residency.api.placement import ExecutionMode

MAX_POINTS = 128
"""A compact curve is tens of points; the cap also bounds the cost of the monotonicity rule below."""
MONOTONE_TOLERANCE = 1.5
"""A point may be faster than one of the same curve at a higher resident fraction by at most this factor.
Measurement noise makes real curves wobble (the committed H100 report has 1.29x); a curve entered the wrong
way round, or a rate typed ten times too large, does not pass."""

_MONOTONE_RULE = (
    "self.all(p, self.all(q, !(p.executionMode == q.executionMode"
    " && p.sequenceLength == q.sequenceLength && p.batchSize == q.batchSize"
    " && p.residentFraction < q.residentFraction"
    f" && p.decodeTokensPerSecond > {MONOTONE_TOLERANCE} * q.decodeTokensPerSecond)))"
)
_POINT_RULES: list[JsonValue] = [
    {
        "rule": _MONOTONE_RULE,
        "message": (
            "decodeTokensPerSecond must not fall as residentFraction rises: a point is more than "
            f"{MONOTONE_TOLERANCE}x faster than a point of the same executionMode, sequenceLength and "
            "batchSize at a higher residentFraction"
        ),
    }
]


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
    points: list[SensitivityPoint] = Field(
        min_length=1, max_length=MAX_POINTS, json_schema_extra={"x-kubernetes-validations": _POINT_RULES}
    )
    measured_at: datetime | None = Field(default=None, description="When the curve was measured.")
    measured_by: str | None = Field(
        default=None,
        max_length=253,
        description="Who measured it: a worker's node name, or absent (by hand).",
    )

    @model_validator(mode="after")
    def _monotone(self) -> SensitivityProfileSpec:
        """The schema's rule, for profiles built in Python (``residency profile``, the worker)."""
        problem = non_monotone_points(self.points)
        if problem:
            raise ValueError(f"points: {problem}")
        return self


def non_monotone_points(points: list[SensitivityPoint]) -> str | None:
    """Why ``points`` break :data:`MONOTONE_TOLERANCE` (the first pair found), or None."""
    for slower in points:
        for faster in points:
            if (
                slower.execution_mode == faster.execution_mode
                and slower.sequence_length == faster.sequence_length
                and slower.batch_size == faster.batch_size
                and slower.resident_fraction < faster.resident_fraction
                and slower.decode_tokens_per_second > MONOTONE_TOLERANCE * faster.decode_tokens_per_second
            ):
                return (
                    f"decodeTokensPerSecond {slower.decode_tokens_per_second:g} at residentFraction "
                    f"{slower.resident_fraction:g} is more than {MONOTONE_TOLERANCE}x the "
                    f"{faster.decode_tokens_per_second:g} at {faster.resident_fraction:g} "
                    f"({slower.execution_mode}, sequence {slower.sequence_length}, batch {slower.batch_size})"
                )
    return None


class SensitivityProfileStatus(StatusModel):
    """What the operator made of the profile."""

    point_count: int | None = Field(default=None, ge=0, description="Measured points in spec.points.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


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
        {"name": "Model", "type": "string", "jsonPath": ".spec.modelPath"},
        {"name": "GPU", "type": "string", "jsonPath": ".spec.gpuType"},
        {"name": "Points", "type": "integer", "jsonPath": ".status.pointCount"},
        {"name": "Used", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Used")].status'},
        {"name": "Emulated", "type": "boolean", "jsonPath": ".spec.emulated", "priority": 1},
        {"name": "Measured", "type": "date", "jsonPath": ".spec.measuredAt", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]

    kind: Literal["SensitivityProfile"] = "SensitivityProfile"
    spec: SensitivityProfileSpec
    status: SensitivityProfileStatus | None = None
