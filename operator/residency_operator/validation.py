"""Validation of an LLMModel beyond what the CRD schema can say (pure: filesystem reads only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from residency.api import ConditionStatus, LLMModelSpec
from residency.modeldir import ModelDirError, ModelDirInfo, inspect_model_dir
from residency_operator.conditions import Verdict


def validate_model(spec: dict[str, Any], allowed_roots: list[Path]) -> ModelDirInfo | Verdict:
    """The model directory's facts when it can be served, else a Failed verdict with reason and message."""
    try:
        typed = LLMModelSpec.model_validate(spec)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        return _failed("InvalidSpec", f"spec does not match the LLMModel schema: {exc}")
    try:
        return inspect_model_dir(typed.source.path, allowed_roots, typed.dtype)
    except ModelDirError as exc:
        return _failed(exc.reason, exc.message)


def _failed(reason: str, message: str) -> Verdict:
    return Verdict(
        phase="Failed",
        reason=reason,
        message=message,
        conditions=(("Validated", "False", reason, message), ("Ready", "False", reason, message)),
    )


def pending_verdict(info: ModelDirInfo, node_count: int) -> Verdict:
    """A valid model waiting for placement: NoNodes while no GPU node has registered a profile."""
    facts = f"{info.model_type}, {info.num_layers} layers, {info.weight_bytes / 2**30:.2f} GiB of weights"
    validated: tuple[str, ConditionStatus, str, str] = ("Validated", "True", "ModelValid", facts)
    extra = (("architecture", info.model_type), ("weightBytes", info.weight_bytes))
    if node_count == 0:
        message = "no GPU node has registered a NodeProfile yet; start a worker (`residency worker`)"
        return Verdict(
            phase="Pending",
            reason="NoNodes",
            message=message,
            conditions=(
                validated,
                ("Scheduled", "False", "NoNodes", message),
                ("Ready", "False", "NoNodes", message),
            ),
            extra=extra,
        )
    message = f"{node_count} node(s) available; waiting for the planner"
    return Verdict(
        phase="Pending",
        reason="AwaitingPlacement",
        message=message,
        conditions=(
            validated,
            ("Scheduled", "False", "AwaitingPlacement", message),
            ("Ready", "False", "AwaitingPlacement", message),
        ),
        extra=extra,
    )
