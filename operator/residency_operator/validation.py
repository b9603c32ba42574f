"""Validation of an LLMModel beyond what the CRD schema can say (pure: filesystem reads only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from residency.api import LLMModelSpec
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
