"""Shared pieces of the API: group/version, the camelCase base model, Kubernetes-style conditions."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "residency.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

ConditionStatus = Literal["True", "False", "Unknown"]


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, unset optionals left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(ApiModel):
    """Status blocks tolerate fields written by newer versions (they are never user input)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ObjectMeta(BaseModel):
    """The part of metadata residency reads; everything else is kept as the API server sent it."""

    model_config = ConfigDict(extra="allow")

    name: str
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class Condition(StatusModel):
    """A Kubernetes API convention condition: the truth that phase summarises."""

    type: str = Field(max_length=128, description="Condition type, e.g. Validated, Scheduled, Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=128, description="One CamelCase word saying why.")
    message: str = Field(default="", max_length=4096, description="What happened, for a person.")
    last_transition_time: datetime | None = Field(
        default=None, description="When status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation of the spec this condition describes."
    )


class CustomResource(ApiModel):
    """Common envelope of every residency kind."""

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    singular: ClassVar[str]
    short_names: ClassVar[list[str]] = []
    scope: ClassVar[Literal["Namespaced", "Cluster"]] = "Namespaced"
    categories: ClassVar[list[str]] = ["residency"]
    description: ClassVar[str] = ""
    printer_columns: ClassVar[list[dict[str, Any]]] = []

    api_version: Literal["residency.dev/v1alpha1"] = Field(
        default="residency.dev/v1alpha1", alias="apiVersion"
    )
    kind: str
    metadata: ObjectMeta


MAX_GPUS_PER_NODE = 64
"""The most GPUs one node (and so one split placement) may have."""


class GpuResidency(StatusModel):
    """What one GPU holds of a model, as the worker measured it."""

    index: int = Field(ge=0, lt=MAX_GPUS_PER_NODE)
    resident_fraction: float | None = Field(
        default=None, ge=0, le=1, description="Share of weight bytes on it."
    )
    resident_bytes: int | None = Field(default=None, ge=0, description="Weight + KV bytes on this GPU.")
