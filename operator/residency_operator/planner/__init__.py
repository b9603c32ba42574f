"""The placement, offload and preemption planner: pure Python, no Kubernetes, no torch.

Entry point: :func:`plan`. Inputs and outputs are the plain types in :mod:`.types`.
"""

from residency_operator.planner.costs import TransitionCost
from residency_operator.planner.plan import plan
from residency_operator.planner.predictor import Predictor, calibrated_factor
from residency_operator.planner.types import (
    GIB,
    Action,
    CachedModel,
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    ObservedPoint,
    Plan,
    PlannedPlacement,
    PlannerConfig,
    ProfilePoint,
    SensitivityProfile,
    Unschedulable,
    waiting_demand,
)

__all__ = [
    "GIB",
    "Action",
    "CachedModel",
    "CurrentPlacement",
    "ModelDemand",
    "NodeCapacity",
    "ObservedPoint",
    "Plan",
    "PlannedPlacement",
    "PlannerConfig",
    "Predictor",
    "ProfilePoint",
    "SensitivityProfile",
    "TransitionCost",
    "Unschedulable",
    "calibrated_factor",
    "plan",
    "waiting_demand",
]
