"""How well the planner's predictor foretells the measured decode rates of the report's curves.

Three predictions per measured point, all through `residency_operator.planner.Predictor`:
  roofline       no profile: the node's measured bandwidths alone (what a model gets before profiling)
  profile (LOO)  the model's own profile at that sequence length with this point left out: interpolation
                 between neighbours, roofline-scaled below the lowest measured fraction
  other length   the profile measured at the other sequence length, roofline-scaled through KV bytes
"""

from __future__ import annotations

import statistics
from typing import Any

from residency_operator.planner import ModelDemand, NodeCapacity, Predictor, ProfilePoint, SensitivityProfile
from residency_worker.engine.types import ExecutionMode

METHODS = ("roofline", "profile_loo", "other_length")


def node_capacity(
    bandwidths: dict[str, Any], gpu_type: str, gpu_memory_bytes: int, host_memory_bytes: int
) -> NodeCapacity:
    return NodeCapacity(
        name="report",
        gpu_type=gpu_type,
        gpu_memory_bytes=gpu_memory_bytes,
        host_memory_bytes=host_memory_bytes,
        host_to_device_gbps=bandwidths["pinned_host_to_device"]["gbps"],
        hbm_gbps=bandwidths["device_read_gbps"],
        host_memory_gbps=bandwidths["host_read_gbps"],
    )


def _profile(
    name: str, gpu: str, mode: ExecutionMode, length: int, points: list[dict[str, Any]]
) -> SensitivityProfile:
    return SensitivityProfile(
        model=name,
        gpu_type=gpu,
        points=tuple(
            ProfilePoint(
                p["achieved_resident_fraction"], p["decode_tokens_per_second"], p["prefill_tokens_per_second"]
            )
            for p in points
        ),
        mode=mode,
        sequence_length=length,
        batch=1,
    )


def predictions(results: list[dict[str, Any]], node: NodeCapacity) -> list[dict[str, Any]]:
    """One row per measured curve point: observed rate and each method's prediction (None: not possible)."""
    rows: list[dict[str, Any]] = []
    roofline = Predictor()
    for result in results:
        name = result["shape"]["label"]
        groups: dict[tuple[ExecutionMode, int], list[dict[str, Any]]] = {}
        for point in result["curve_points"]:
            groups.setdefault((point["execution_mode"], point["sequence_length"]), []).append(point)
        for (mode, length), points in groups.items():
            demand = ModelDemand(
                name=name,
                weight_bytes=result["weight_bytes"],
                kv_bytes_per_token=result["kv_bytes_per_token"],
                max_sequence_length=length + 64,
                max_batch=1,
                layer_count=result["layers"],
                typical_sequence_length=length,
            )
            others = [g for (m, n), g in groups.items() if m == mode and n != length]
            for point in points:
                fraction = point["achieved_resident_fraction"]
                predicted: dict[str, float | None] = {
                    "roofline": roofline.decode_tokens_per_second(demand, node, fraction, mode, 1, length)
                }
                rest = [p for p in points if p is not point]
                predicted["profile_loo"] = (
                    Predictor([_profile(name, node.gpu_type, mode, length, rest)]).decode_tokens_per_second(
                        demand, node, fraction, mode, 1, length
                    )
                    if len(rest) >= 2
                    else None
                )
                predicted["other_length"] = (
                    Predictor(
                        [_profile(name, node.gpu_type, mode, others[0][0]["sequence_length"], others[0])]
                    ).decode_tokens_per_second(demand, node, fraction, mode, 1, length)
                    if others
                    else None
                )
                rows.append(
                    {
                        "shape": name,
                        "mode": mode,
                        "sequence_length": length,
                        "resident_fraction": fraction,
                        "observed": point["decode_tokens_per_second"],
                        "predicted": predicted,
                    }
                )
    return rows


def median_errors(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median |predicted - observed| ÷ observed per method, over the points it could predict."""
    errors: dict[str, float | None] = {}
    for method in METHODS:
        values = [
            abs(row["predicted"][method] - row["observed"]) / row["observed"]
            for row in rows
            if row["predicted"].get(method) is not None and row["observed"] > 0
        ]
        errors[method] = statistics.median(values) if values else None
    return errors
