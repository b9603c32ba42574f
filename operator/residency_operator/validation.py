"""Validation of an LLMModel beyond what the CRD schema can say (pure: filesystem reads only), and its
verdicts reused across planning rounds."""

from __future__ import annotations

import time
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


class ValidationCache:
    """:func:`validate_model` with each verdict reused per model generation for ``seconds`` (reading ten
    thousand model directories every round would be most of the round), and each directory read once per
    round however many models use it."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self._verdicts: dict[tuple[str, Any], tuple[float, ModelDirInfo | Verdict]] = {}

    def validator(
        self, allowed_roots: list[Path], remote_code_roots: list[Path]
    ) -> Callable[[dict[str, Any]], ModelDirInfo | Verdict]:
        """This round's validate(model body)."""
        now = time.monotonic()
        self._verdicts = {k: v for k, v in self._verdicts.items() if now - v[0] < self.seconds}
        directories: dict[tuple[Any, ...], Any] = {}  # this round's reads: many models share a directory

        def inspect(path: str, *args: Any) -> Any:
            key = (path, args[1] if len(args) > 1 else None)
            if key not in directories:
                try:
                    directories[key] = inspect_model_dir(path, *args)
                except Exception as exc:  # the same failure for every model of the directory
                    directories[key] = exc
            found = directories[key]
            if isinstance(found, Exception):
                raise found
            return found

        def validate(body: dict[str, Any]) -> ModelDirInfo | Verdict:
            meta = body["metadata"]
            key = (
                str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"),
                meta.get("generation"),
            )
            hit = self._verdicts.get(key)
            if hit is None:
                hit = self._verdicts[key] = (
                    now,
                    validate_model(body["spec"], allowed_roots, remote_code_roots, inspect),
                )
            return hit[1]

        return validate
