"""The typed API of residency: pydantic models of the CRDs, one source for schema, operator and worker."""

from residency.api.common import API_VERSION, GROUP, VERSION, Condition, ConditionStatus
from residency.api.llmmodel import (
    DType,
    IdleSpec,
    LLMModel,
    LLMModelSpec,
    LLMModelStatus,
    ModelSource,
    ObservedRates,
    OffloadSpec,
    Phase,
    SLOSpec,
    Timings,
)
from residency.api.nodeprofile import NodeProfile, NodeProfileSpec, NodeProfileStatus
from residency.api.placement import (
    DesiredState,
    ExecutionMode,
    ModelPlacement,
    ModelPlacementSpec,
    ModelPlacementStatus,
    ModelRef,
)
from residency.api.sensitivity import SensitivityPoint, SensitivityProfile, SensitivityProfileSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "DType",
    "DesiredState",
    "ExecutionMode",
    "IdleSpec",
    "LLMModel",
    "LLMModelSpec",
    "LLMModelStatus",
    "ModelPlacement",
    "ModelPlacementSpec",
    "ModelPlacementStatus",
    "ModelRef",
    "ModelSource",
    "NodeProfile",
    "NodeProfileSpec",
    "NodeProfileStatus",
    "ObservedRates",
    "OffloadSpec",
    "Phase",
    "SLOSpec",
    "SensitivityPoint",
    "SensitivityProfile",
    "SensitivityProfileSpec",
    "Timings",
]
