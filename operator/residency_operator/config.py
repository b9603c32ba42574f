"""Operator settings, from the command line or the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs to know that is not in the cluster."""

    allowed_model_roots: list[Path] = field(default_factory=list)
    resync_seconds: float = 20.0
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """RESIDENCY_MODEL_ROOTS (os.pathsep-separated) and RESIDENCY_RESYNC_SECONDS."""
        roots = [Path(p) for p in os.environ.get("RESIDENCY_MODEL_ROOTS", "").split(os.pathsep) if p]
        return cls(
            allowed_model_roots=roots,
            resync_seconds=float(os.environ.get("RESIDENCY_RESYNC_SECONDS", "20")),
        )
