"""Which SensitivityProfiles the planner uses, and why a profile is not used: pure, from API objects.

The schema refuses malformed curves at apply (fractions outside [0, 1], negative rates, a curve that
falls as residency rises; see residency.api.sensitivity). What only the cluster can tell lands here as a
``Used`` condition: no LLMModel of the profile's namespace is served from its model directory, no node
reports its GPU type, or a newer profile of the same model, GPU type and dtype supersedes it (a profile
applied by hand wins over one a worker measured only if it is newer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

USED = "Used"


@dataclass(frozen=True, slots=True)
class ProfileUse:
    """Whether the planner uses a profile, why, and its point count (status.pointCount)."""

    used: bool
    reason: str
    message: str
    point_count: int


def _path(text: str) -> str:
    return str(PurePosixPath(text))


def _key(body: dict[str, Any]) -> tuple[str, str, str, str]:
    spec = body.get("spec") or {}
    return (
        str((body.get("metadata") or {}).get("namespace", "")),
        _path(str(spec.get("modelPath", ""))),
        str(spec.get("gpuType", "")),
        str(spec.get("dtype", "bfloat16")),
    )


def measured_time(body: dict[str, Any]) -> str:
    """When the curve was measured: spec.measuredAt, else the object's creation time (RFC 3339 strings of
    one format compare in time order)."""
    spec = body.get("spec") or {}
    return str(spec.get("measuredAt") or (body.get("metadata") or {}).get("creationTimestamp") or "")


def newest_profiles(bodies: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per namespace, model directory, GPU type and dtype, the most recently measured profile only."""
    newest: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for body in bodies:
        key = _key(body)
        kept = newest.get(key)
        if kept is None or (measured_time(body), body["metadata"].get("name", "")) > (
            measured_time(kept),
            kept["metadata"].get("name", ""),
        ):
            newest[key] = body
    return [newest[key] for key in sorted(newest)]


def profile_use(
    body: dict[str, Any],
    all_profiles: Iterable[dict[str, Any]],
    models: Iterable[dict[str, Any]],
    gpu_types: Iterable[str],
) -> ProfileUse:
    """Whether the planner uses ``body``, given every profile, LLMModel and node GPU type of the cluster."""
    namespace, model_path, gpu_type, _ = _key(body)
    points = len((body.get("spec") or {}).get("points") or [])
    served_from = {
        _path(str(((m.get("spec") or {}).get("source") or {}).get("path", "")))
        for m in models
        if (m.get("metadata") or {}).get("namespace") == namespace
    }
    if model_path not in served_from:
        return ProfileUse(
            False,
            "UnknownModel",
            f"no LLMModel in namespace {namespace} is served from {model_path}: the profile is kept but "
            "unused until one is",
            points,
        )
    known_gpus = sorted(set(gpu_types))
    if gpu_type not in known_gpus:
        return ProfileUse(
            False,
            "UnknownGPUType",
            f"no node reports GPU type {gpu_type!r} (known: {', '.join(known_gpus) or 'none yet'}): "
            "spec.gpuType must name a NodeProfile's spec.gpuType",
            points,
        )
    uid = (body.get("metadata") or {}).get("uid")
    name = (body.get("metadata") or {}).get("name")
    for newest in newest_profiles(all_profiles):
        if _key(newest) == _key(body) and (
            (newest["metadata"].get("uid"), newest["metadata"].get("name")) != (uid, name)
        ):
            return ProfileUse(
                False,
                "Superseded",
                f"SensitivityProfile {newest['metadata'].get('name')} of the same model, GPU type and dtype "
                f"was measured later ({measured_time(newest)})",
                points,
            )
    return ProfileUse(True, "InUse", f"the planner uses these {points} points for {gpu_type}", points)
