"""Validation of an LLMModel beyond what the CRD schema can say (pure: filesystem reads only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from residency.api import LLMModelSpec
from residency.modeldir import ModelDirError, ModelDirInfo, inspect_model_dir
from residency_operator.conditions import Verdict


def validate_model(
    spec: dict[str, Any],
    allowed_roots: list[Path],
    remote_code_roots: list[Path] | None = None,
    inspect: Callable[..., ModelDirInfo] = inspect_model_dir,
) -> ModelDirInfo | Verdict:
    """The model directory's facts when it can be served, else a Failed verdict with reason and message.

    Never raises: one model's directory, however broken, must not stop the planning of the others.
    ``inspect`` reads the directory (a caller that checks many models of one directory may reuse it).
    """
    try:
        typed = LLMModelSpec.model_validate(spec)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        return _failed("InvalidSpec", f"spec does not match the LLMModel schema: {exc}")
    try:
        return inspect(typed.source.path, allowed_roots, typed.dtype, remote_code_roots or [])
    except ModelDirError as exc:
        return _failed(exc.reason, exc.message)
    except Exception as exc:  # an unforeseen failure still gets a reason, not a failed planning round
        return _failed("ValidationFailed", f"cannot check {typed.source.path[:300]}: {exc!r}"[:1024])


def _failed(reason: str, message: str) -> Verdict:
    return Verdict(
        phase="Failed",
        reason=reason,
        message=message,
        conditions=(("Validated", "False", reason, message), ("Ready", "False", reason, message)),
    )
