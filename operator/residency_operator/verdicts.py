"""The status each LLMModel should show after a round (pure: the plan, the inputs and its placement in, a
:class:`~residency_operator.conditions.Verdict` out)."""

from __future__ import annotations

from typing import Any

from residency.api import ConditionStatus, gpu_set_label
from residency.sizing import memory_text
from residency_operator.conditions import Verdict
from residency_operator.planner import Plan, PlannedPlacement, Unschedulable
from residency_operator.state import Inputs, decode_slo

RETRIED_LOAD_FAILURES = frozenset({"PlacementDoesNotFit"})
"""Worker refusals that resolve by themselves: the model shows Pending (with a Warning Event), not Failed."""


def _percent(fraction: float | None) -> int | None:
    return None if fraction is None else round(float(fraction) * 100)


def unschedulable_by_model(plan: Plan) -> dict[str, Unschedulable]:
    """Model -> why the plan could not place it."""
    return {u.model: u for u in plan.unschedulable}


def model_verdict(
    key: str,
    inputs: Inputs,
    plan: Plan,
    placement: dict[str, Any] | None,
    unschedulable_index: dict[str, Unschedulable] | None = None,
) -> Verdict:
    """The status one LLMModel should show after this round (``unschedulable_index``: the plan's
    :func:`unschedulable_by_model`, built once when asking for every model)."""
    if key in inputs.invalid:
        return inputs.invalid[key]
    info = inputs.infos[key]
    facts = f"{info.model_type}, {info.num_layers} layers, {memory_text(info.weight_bytes)} of weights"
    validated: tuple[str, ConditionStatus, str, str] = ("Validated", "True", "ModelValid", facts)
    base_extra: tuple[tuple[str, Any], ...] = (
        ("architecture", info.model_type),
        ("weightBytes", info.weight_bytes),
    )
    if not any(n.accepts_work for n in inputs.nodes):
        message = "no GPU node has registered a NodeProfile yet; start a worker (`residency worker`)"
        if inputs.nodes:
            message = (
                f"none of the {len(inputs.nodes)} registered GPU node(s) takes work now "
                "(not Ready, cordoned, being disrupted, or its worker stopped heartbeating)"
            )
        return Verdict(
            "Pending",
            "NoNodes",
            message,
            (validated, ("Scheduled", "False", "NoNodes", message), ("Ready", "False", "NoNodes", message)),
            base_extra,
        )
    if key in inputs.idle:
        node = (placement or {}).get("spec", {}).get("nodeName")
        message = inputs.idle[key]
        idle_conditions: tuple[tuple[str, ConditionStatus, str, str], ...] = (
            validated,
            ("Scheduled", "True", "Placed", f"placed on {node}"),
            ("Loaded", "False", "Idle", message),
            ("Ready", "False", "Idle", message),
        )
        return Verdict(
            "Idle",
            "IdleTimeout",
            message,
            idle_conditions,
            (
                *base_extra,
                ("node", node),
                ("residentFraction", 0.0),
                ("residentPercent", 0),
                ("endpoint", None),
            ),
        )
    unschedulable = (
        unschedulable_index if unschedulable_index is not None else unschedulable_by_model(plan)
    ).get(key)
    planned = plan.placements.get(key)
    if planned is None and placement is None:
        reason = unschedulable.reason if unschedulable else "AwaitingPlacement"
        message = unschedulable.message if unschedulable else "waiting for the planner"
        return Verdict(
            "Unschedulable" if unschedulable else "Pending",
            reason,
            message,
            (validated, ("Scheduled", "False", reason, message), ("Ready", "False", reason, message)),
            (
                *base_extra,
                ("node", None),
                ("residentFraction", None),
                ("residentPercent", None),
                ("endpoint", None),
            ),
        )
    return _placed_verdict(key, inputs, planned, placement, validated, base_extra)


def rejected_verdict(verdict: Verdict, message: str) -> Verdict:
    """The verdict for a model whose ModelPlacement the API server refused to write: nothing runs it."""
    validated = next((c for c in verdict.conditions if c[0] == "Validated"), None)
    text = f"the API server refused its ModelPlacement: {message}"
    return Verdict(
        "Pending",
        "PlacementRejected",
        text,
        (
            *((validated,) if validated else ()),
            ("Scheduled", "False", "PlacementRejected", text),
            ("Ready", "False", "PlacementRejected", text),
        ),
        tuple((k, v) for k, v in verdict.extra if k in ("architecture", "weightBytes")),
    )


def gpu_fields(
    node: str | None, planned: PlannedPlacement | None, spec: dict[str, Any], status: dict[str, Any]
) -> tuple[tuple[str, Any], ...]:
    """``gpuSet`` (``gpu-a/0,1``) and per-GPU ``gpus`` of a model on a multi-GPU node: the GPUs the plan
    names, with what the worker reports holding on each (its ``status.gpus``) once it does; nothing for a
    single-GPU node."""
    if planned is not None:
        shares = [(g.index, g.resident_fraction) for g in planned.gpus]
    else:
        shares = [(int(g["index"]), float(g["residentFraction"])) for g in spec.get("gpus") or []]
    if not shares or node is None:
        return ()
    reported = {int(g["index"]): g for g in status.get("gpus") or [] if "index" in g}
    same_node = spec.get("nodeName") == node
    gpus = []
    for index, share in shares:
        held = reported.get(index) if same_node else None
        gpus.append(
            dict(held) if held is not None else {"index": index, "residentFraction": round(float(share), 4)}
        )
    return (("gpuSet", gpu_set_label(node, [index for index, _ in shares])), ("gpus", gpus))


def observed_rates(
    last_step_rate: float | None, window: dict[str, Any] | None, planned: PlannedPlacement | None
) -> dict[str, Any]:
    """``status.observed``: the last step's aggregate rate, the median step of the worker's window (per
    sequence, at its batch), and that rate ÷ the uncorrected prediction at the same placement."""
    observed: dict[str, Any] = {}
    if last_step_rate is not None:
        observed["decodeTokensPerSecond"] = last_step_rate
    try:
        step_seconds = float((window or {})["stepSeconds"])
        batch = int((window or {})["batch"])
    except (KeyError, TypeError, ValueError):
        return observed
    if step_seconds > 0 and batch >= 1:
        observed["windowDecodeTokensPerSecond"] = round(1.0 / step_seconds, 3)
        observed["windowBatch"] = batch
    if planned is not None and planned.observed_ratio is not None:
        observed["ratioToPrediction"] = round(float(planned.observed_ratio), 3)
    return observed


def _placed_verdict(
    key: str,
    inputs: Inputs,
    planned: PlannedPlacement | None,
    placement: dict[str, Any] | None,
    validated: tuple[str, ConditionStatus, str, str],
    base_extra: tuple[tuple[str, Any], ...],
) -> Verdict:
    spec = (placement or {}).get("spec") or {}
    status = (placement or {}).get("status") or {}
    node = planned.node if planned else spec.get("nodeName")
    fraction = status.get("residentFraction")
    if fraction is None:
        fraction = planned.resident_fraction if planned else spec.get("residentFraction")
    state = status.get("state", "Pending")
    desired = spec.get("desiredState", "Loaded")
    observed_rate = status.get("observedDecodeTokensPerSecond")
    extra = (
        *base_extra,
        ("node", node),
        ("residentFraction", None if fraction is None else round(float(fraction), 4)),
        ("residentPercent", _percent(fraction)),
        ("executionMode", planned.mode if planned else spec.get("executionMode")),
        (
            "predictedDecodeTokensPerSecond",
            round(float(planned.predicted_decode_tokens_per_second), 2) if planned else None,
        ),
        ("predictionSource", planned.prediction_source if planned else None),
        ("endpoint", status.get("endpoint") if state == "Loaded" else None),
        *gpu_fields(node, planned, spec, status),
    )
    if status.get("timings"):
        extra += (("timings", status["timings"]),)
    observed = observed_rates(observed_rate, status.get("observedStep"), planned)
    if observed:
        extra += (("observed", observed),)
    where = f"on {node} at {_percent(fraction)}% GPU residency"
    scheduled: tuple[str, ConditionStatus, str, str] = ("Scheduled", "True", "Placed", f"placed {where}")
    if placement is not None and desired == "Preempted":
        message = spec.get("reason") or "preempted to make room"
        return Verdict(
            "Preempted",
            "Preempted",
            message,
            (
                validated,
                scheduled,
                ("Preempted", "True", "Preempted", message),
                ("Loaded", "False", "Preempted", message),
                ("Ready", "False", "Preempted", message),
            ),
            extra,
        )
    not_preempted: tuple[str, ConditionStatus, str, str] = ("Preempted", "False", "Running", "not preempted")
    if state == "Failed":
        reason = status.get("reason") or "LoadFailed"
        message = status.get("message") or "the worker could not load the model"
        if reason in RETRIED_LOAD_FAILURES:
            # the node had less room than planned (a budget that shrank, memory still being freed):
            # the worker retries once room frees and the next round re-plans; nothing is wrong with it
            message = f"{message}; waiting for room on {node} or a new placement"
        return Verdict(
            "Pending" if reason in RETRIED_LOAD_FAILURES else "Failed",
            reason,
            message,
            (validated, scheduled, ("Loaded", "False", reason, message), ("Ready", "False", reason, message)),
            extra,
        )
    if state == "Loaded" and spec.get("nodeName") == node:
        message = f"serving {where}"
        conditions: list[tuple[str, ConditionStatus, str, str]] = [
            validated,
            scheduled,
            not_preempted,
            ("Loaded", "True", "Loaded", message),
            ("Ready", "True", "Ready", message),
        ]
        slo = decode_slo(inputs.bodies[key]["spec"])
        if status.get("reason"):
            # the worker could not carry out the last change (it serves as before): say why
            conditions.append(
                ("Degraded", "True", str(status["reason"]), str(status.get("message") or status["reason"]))
            )
        elif slo is not None and observed_rate is not None and observed_rate < slo:
            conditions.append(
                (
                    "Degraded",
                    "True",
                    "SLONotMet",
                    f"observed {observed_rate:.1f} tok/s is below the SLO of {slo:g} tok/s",
                )
            )
        else:
            conditions.append(("Degraded", "False", "SLOMet", "observed decode rate meets the SLO"))
        return Verdict("Ready", "Ready", message, tuple(conditions), extra)
    if state in ("Loading", "Preempted") and spec.get("nodeName") == node:
        message = f"loading {where}" if state == "Loading" else f"resuming {where}"
        return Verdict(
            "Loading",
            "Loading" if state == "Loading" else "Resuming",
            message,
            (
                validated,
                scheduled,
                not_preempted,
                ("Loaded", "False", "Loading", message),
                ("Ready", "False", "Loading", message),
            ),
            extra,
        )
    message = f"scheduled {where}; waiting for the worker"
    return Verdict(
        "Scheduled",
        "Placed",
        message,
        (
            validated,
            scheduled,
            not_preempted,
            ("Loaded", "False", "WaitingForWorker", message),
            ("Ready", "False", "WaitingForWorker", message),
        ),
        extra,
    )
