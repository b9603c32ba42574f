"""The ModelPlacements a plan asks for (pure: the plan and the planner inputs in, manifests out), and when
and whether the controller writes each one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from residency.api import API_VERSION
from residency.modeldir import ModelDirInfo
from residency.names import label_value, placement_name
from residency_operator.planner import Plan
from residency_operator.state import (
    MODEL_NAME_LABEL,
    MODEL_NAMESPACE_LABEL,
    NODE_LABEL,
    Inputs,
    decode_slo,
)


def placement_manifest(
    key: str,
    body: dict[str, Any],
    info: ModelDirInfo,
    node: str,
    resident_fraction: float,
    mode: str,
    desired_state: str,
    reason: str | None,
    gpus: Sequence[tuple[int, float]] = (),
) -> dict[str, Any]:
    """The ModelPlacement object the operator wants for one model (``gpus``: on a multi-GPU node, its GPUs
    in pipeline order with each one's share of the weight bytes)."""
    namespace, name = key.split("/", 1)
    spec = body["spec"]
    fraction = round(float(resident_fraction), 4)
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelPlacement",
        "metadata": {
            "name": placement_name(key),
            "labels": {
                NODE_LABEL: label_value(node),
                MODEL_NAMESPACE_LABEL: namespace,
                MODEL_NAME_LABEL: label_value(name),
            },
        },
        "spec": {
            "model": {"namespace": namespace, "name": name, "uid": body["metadata"].get("uid")},
            "nodeName": node,
            "sourcePath": str(info.path),
            "dtype": spec.get("dtype", "bfloat16"),
            "residentFraction": fraction,
            **({"gpus": gpu_shares(fraction, gpus)} if gpus else {}),
            "minResidentFraction": round(
                1.0 - float((spec.get("offload") or {}).get("maxFraction", 0.75)), 4
            ),
            "executionMode": mode,
            "desiredState": desired_state,
            "maxSequenceLength": int(spec.get("maxSequenceLength", 4096)),
            "maxBatchSize": int(spec.get("maxBatchSize", 8)),
            **({"minDecodeTokensPerSecond": float(slo)} if (slo := decode_slo(spec)) is not None else {}),
            **({"reason": reason[:1024]} if reason else {}),
        },
    }


def gpu_shares(resident_fraction: float, gpus: Sequence[tuple[int, float]]) -> list[dict[str, Any]]:
    """``spec.gpus``: each GPU's share, scaled to the written (rounded) resident fraction so that the shares
    sum to it within the API's tolerance."""
    total = sum(share for _, share in gpus)
    scale = resident_fraction / total if total > 0 else 0.0
    rounded = [round(share * scale, 6) for _, share in gpus[:-1]]
    last = max(0.0, round(resident_fraction - sum(rounded), 8))
    return [
        {"index": index, "residentFraction": share}
        for (index, _), share in zip(gpus, [*rounded, last], strict=True)
    ]


def _previous_gpus(previous: dict[str, Any], node: str) -> list[tuple[int, float]]:
    """The GPUs a placement named, while it stays on that node (an idle or preempted model keeps them)."""
    if previous.get("nodeName") != node:
        return []
    return [(int(g["index"]), float(g["residentFraction"])) for g in previous.get("gpus") or []]


def _reason(previous: dict[str, Any], desired_state: str, fresh: str | None) -> str | None:
    """Why a placement is in its state: the reason of the transition into it, kept while the state holds."""
    if previous.get("desiredState") == desired_state and previous.get("reason"):
        return str(previous["reason"])
    return fresh or previous.get("reason")


def desired_placements(plan: Plan, inputs: Inputs) -> dict[str, dict[str, Any]]:
    """Placement name → the ModelPlacement the plan asks for (running models and host-cached ones)."""
    reasons: dict[str, str] = {}
    for action in plan.actions:
        # a model that leaves one node for another (an unload, then a load) is where it goes: that step's
        # reason; else its first step's
        if action.kind != "evict":
            reasons.setdefault(action.model, action.reason)
    for action in plan.actions:
        reasons.setdefault(action.model, action.reason)
    desired: dict[str, dict[str, Any]] = {}
    for key, planned in plan.placements.items():
        previous = (inputs.placements.get(key) or {}).get("spec", {})
        desired[placement_name(key)] = placement_manifest(
            key,
            inputs.bodies[key],
            inputs.infos[key],
            planned.node,
            planned.resident_fraction,
            planned.mode,
            "Loaded",
            _reason(previous, "Loaded", reasons.get(key)),
            [(g.index, g.resident_fraction) for g in planned.gpus],
        )
    for key, why in sorted(inputs.idle.items()):
        previous = inputs.placements[key]["spec"]
        desired[placement_name(key)] = placement_manifest(
            key,
            inputs.bodies[key],
            inputs.infos[key],
            previous["nodeName"],
            float(previous["residentFraction"]),
            previous.get("executionMode", "stream"),
            "Idle",
            _reason(previous, "Idle", why),
            _previous_gpus(previous, previous["nodeName"]),
        )
    current = {c.model: c for c in inputs.current}
    for cached in plan.cached:
        key = cached.model
        if key in plan.placements or key not in inputs.infos:
            continue
        previous = (inputs.placements.get(key) or {}).get("spec", {})
        now_placement = current.get(key)
        # a preempted model resumes at the residency it had: keep the fraction it was placed with
        fraction = previous.get("residentFraction", now_placement.resident_fraction if now_placement else 0.0)
        mode = previous.get("executionMode", now_placement.mode if now_placement else "stream")
        desired[placement_name(key)] = placement_manifest(
            key,
            inputs.bodies[key],
            inputs.infos[key],
            cached.node,
            float(fraction),
            mode,
            "Preempted",
            _reason(previous, "Preempted", reasons.get(key)),
            _previous_gpus(previous, cached.node) if "residentFraction" in previous else [],
        )
    return desired


def write_phase(existing: dict[str, Any] | None, wanted: dict[str, Any]) -> str:
    """When the controller writes a placement in a round: "shrink" (it only frees GPU memory on its node:
    a demotion, a preemption, going idle) before removals, "move" (frees one node, takes another) after
    them, "grow" (a new placement, a promotion, a resume, anything else) last."""
    if existing is None:
        return "grow"
    have, want = existing["spec"], wanted["spec"]
    if have.get("nodeName") != want.get("nodeName"):
        return "move"
    releases = have.get("desiredState") == "Loaded" and want.get("desiredState") in ("Preempted", "Idle")
    same_shape = all(
        have.get(k) == want.get(k) for k in ("sourcePath", "dtype", "maxSequenceLength", "maxBatchSize")
    )
    lower = float(want.get("residentFraction", 1.0)) < float(have.get("residentFraction", 1.0))
    keeps_state = want.get("desiredState") == have.get("desiredState")
    # Both modes hold the same staging buffers (prefill streams in both); a switch to cpu also moves the
    # offloaded layers' KV cache to the host, a switch to stream brings it to the GPU.
    mode = want.get("executionMode")
    mode_adds_nothing = mode == have.get("executionMode") or mode == "cpu"
    if same_shape and (releases or (keeps_state and lower and mode_adds_nothing)):
        return "shrink"
    return "grow"


def placement_needs_update(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an existing placement's spec or labels differ from what the plan wants."""
    labels = existing["metadata"].get("labels") or {}
    return existing.get("spec") != wanted["spec"] or any(
        labels.get(k) != v for k, v in wanted["metadata"]["labels"].items()
    )
