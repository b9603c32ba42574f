"""Pure translation between the cluster's objects and the planner: CRD dicts in, desired objects out.

No Kubernetes client here: the controller lists objects, calls these functions, and writes the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from residency.api import API_VERSION, ConditionStatus
from residency.modeldir import ModelDirInfo
from residency.names import label_value, placement_name
from residency.sizing import memory_text
from residency_operator.conditions import Verdict
from residency_operator.planner import (
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannedPlacement,
    ProfilePoint,
    SensitivityProfile,
    Unschedulable,
    waiting_demand,
)
from residency_operator.planner.options import cached_host_bytes, with_host_set_aside
from residency_operator.profiles import newest_profiles
from residency_operator.validation import validate_model

NODE_LABEL = "residency.dev/node"
MODEL_NAMESPACE_LABEL = "residency.dev/model-namespace"
MODEL_NAME_LABEL = "residency.dev/model-name"
UNLOAD_FINALIZER = "residency.dev/unload"
NODE_LEASE_LABEL = "residency.dev/node-lease"
"""Label of the coordination.k8s.io Lease each worker renews for its node (holderIdentity: the node)."""
DISRUPTION_TAINTS = frozenset(
    {"karpenter.sh/disrupted", "ToBeDeletedByClusterAutoscaler", "karpenter.sh/disruption"}
)
_PLACEMENT_STATE = {
    "Loaded": "loaded",
    "Loading": "loaded",
    "Pending": "loaded",
    "Preempted": "preempted",
    "Idle": "preempted",
}


def model_key(body: dict[str, Any]) -> str:
    """``namespace/name`` of an LLMModel."""
    meta = body["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return (
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        if value.endswith("Z")
        else (datetime.fromisoformat(value))
    )


@dataclass(frozen=True)
class OperatorKnobs:
    """Operator-wide settings that enter planning."""

    allowed_model_roots: list[Path]
    workspace_bytes: int = 64 * 1024
    """Extra GPU bytes per model beyond what the engine's own sizing (residency.sizing) reserves."""
    heartbeat_grace_seconds: float = 60.0
    remote_code_roots: list[Path] = field(default_factory=list)
    """Roots under which models that ship custom code (config.json auto_map) are allowed; none by default."""


@dataclass
class ClusterState:
    """Everything one planning round reads, as the API server returned it."""

    models: list[dict[str, Any]]
    node_profiles: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    placements: list[dict[str, Any]]
    sensitivity_profiles: list[dict[str, Any]] = field(default_factory=list)
    node_leases: list[dict[str, Any]] = field(default_factory=list)
    """The workers' node Leases (label :data:`NODE_LEASE_LABEL`); a node without one is judged by its
    NodeProfile's heartbeatTime (a worker from before Leases)."""


@dataclass
class Inputs:
    """Planner inputs derived from a ClusterState, with what was learned on the way."""

    demands: list[ModelDemand]
    nodes: list[NodeCapacity]
    current: list[CurrentPlacement]
    profiles: list[SensitivityProfile]
    infos: dict[str, ModelDirInfo]
    invalid: dict[str, Verdict]
    bodies: dict[str, dict[str, Any]]
    placements: dict[str, dict[str, Any]]
    idle: dict[str, str] = field(default_factory=dict)
    """Models scaled to zero (spec.idle): key → why; kept out of the plan, weights cached on their node."""


WAKE_ANNOTATION = "residency.dev/wake-time"
WAITING_ANNOTATION = "residency.dev/waiting-requests"
"""How many requests the router held for the model when it last asked for it (with the wake time)."""
MAX_WAITING_REQUESTS = 10_000
"""Anyone who may patch a model can write the annotation: a larger count is read as this."""


def with_wake_requests(
    models: list[dict[str, Any]], wakes: dict[str, tuple[str, str]]
) -> list[dict[str, Any]]:
    """The models with the router's wake requests (model key → (time, waiting), read from its wake ConfigMap)
    as their wake annotations, where newer than an annotation the model already carries: the planner reads
    one source, and the router needs no right to patch anybody's models."""
    if not wakes:
        return models
    merged: list[dict[str, Any]] = []
    for body in models:
        wake = wakes.get(model_key(body))
        if wake is not None:
            try:
                asked = parse_time(wake[0])
            except ValueError:
                asked = None
            current = woken_at(body)
            if asked is not None and (current is None or asked.replace(tzinfo=UTC) > current):
                annotations = {
                    **(body["metadata"].get("annotations") or {}),
                    WAKE_ANNOTATION: wake[0],
                    WAITING_ANNOTATION: wake[1],
                }
                body = {**body, "metadata": {**body["metadata"], "annotations": annotations}}
        merged.append(body)
    return merged


def idle_reason(body: dict[str, Any], placement: dict[str, Any] | None, now: datetime) -> str | None:
    """Why a model should be Idle now (no requests for spec.idle.afterSeconds), or None."""
    after_seconds = (body["spec"].get("idle") or {}).get("afterSeconds")
    if not after_seconds or placement is None:
        return None
    status = placement.get("status") or {}
    if status.get("state") not in ("Loaded", "Idle", "Preempted"):
        return None
    if placement["spec"].get("desiredState") == "Preempted":
        return None
    last_active = parse_time(status.get("lastActiveTime"))
    if last_active is None:
        return None
    woken = woken_at(body)
    latest = max(last_active, woken) if woken else last_active
    quiet_seconds = (now - latest).total_seconds()
    if quiet_seconds < after_seconds:
        return None
    return (
        f"no requests for {quiet_seconds:.0f} s (idle.afterSeconds {after_seconds}): GPU memory released, "
        f"weights kept in host memory on {placement['spec']['nodeName']}; the next request resumes it"
    )


def node_accepts(node: dict[str, Any] | None) -> tuple[bool, bool, bool]:
    """(ready, cordoned, disrupting) of a Node object; a missing Node is neither ready nor schedulable.

    Ready=Unknown only says that the node controller lost contact with the node (a partition, or a
    kubelet gone quiet): it does not stop work by itself. The worker's own heartbeat decides, within the
    operator's configurable grace period, so that a short partition never double-places a model.
    """
    if node is None:
        return False, False, False
    spec = node.get("spec") or {}
    conditions = {c.get("type"): c.get("status") for c in (node.get("status") or {}).get("conditions") or []}
    ready = conditions.get("Ready", "True") != "False"
    taints = {t.get("key") for t in spec.get("taints") or []}
    disrupting = bool(taints & DISRUPTION_TAINTS) or bool(node["metadata"].get("deletionTimestamp"))
    return ready, bool(spec.get("unschedulable")), disrupting


def lease_renewals(leases: Iterable[dict[str, Any]]) -> dict[str, datetime]:
    """Node name -> when its worker last renewed its node Lease."""
    renewed: dict[str, datetime] = {}
    for lease in leases:
        spec = lease.get("spec") or {}
        holder, when = spec.get("holderIdentity"), spec.get("renewTime") or spec.get("acquireTime")
        try:  # a MicroTime: 2006-01-02T15:04:05.000000Z
            at = datetime.fromisoformat(when.replace("Z", "+00:00")) if isinstance(when, str) else None
        except ValueError:
            continue
        if holder and at is not None:
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
            renewed[holder] = max(at, renewed.get(holder, at))
    return renewed


def live_nodes(state: ClusterState, now: datetime, knobs: OperatorKnobs) -> frozenset[str]:
    """The NodeProfiles whose worker renewed its Lease (or, without one, heartbeated) within the grace."""
    renewed = lease_renewals(state.node_leases)
    return frozenset(
        p["spec"]["nodeName"] for p in state.node_profiles if _fresh(_last_seen(p, renewed), now, knobs)
    )


def _last_seen(profile: dict[str, Any], renewed: dict[str, datetime]) -> datetime | None:
    node = profile["spec"]["nodeName"]
    if node in renewed:
        return renewed[node]
    return parse_time((profile.get("status") or {}).get("heartbeatTime"))


def _fresh(seen: datetime | None, now: datetime, knobs: OperatorKnobs) -> bool:
    return seen is not None and (now - seen).total_seconds() <= knobs.heartbeat_grace_seconds


def node_capacity(
    profile: dict[str, Any],
    node: dict[str, Any] | None,
    now: datetime,
    knobs: OperatorKnobs,
    renewed: dict[str, datetime] | None = None,
) -> NodeCapacity:
    """A NodeProfile and its Node as the planner's NodeCapacity (``renewed``: the node Leases' renewals)."""
    spec = profile["spec"]
    ready, cordoned, disrupting = node_accepts(node)
    heartbeat = _last_seen(profile, renewed or {})
    fresh = heartbeat is not None and (now - heartbeat).total_seconds() <= knobs.heartbeat_grace_seconds
    return NodeCapacity(
        name=spec["nodeName"],
        gpu_type=spec["gpuType"],
        gpu_memory_bytes=int(spec["gpuMemoryBytes"]),
        host_memory_bytes=int(spec["hostMemoryBytes"]),
        host_to_device_gbps=float(spec["hostToDeviceGbps"]),
        hbm_gbps=float(spec["hbmGbps"]),
        host_memory_gbps=float(spec.get("hostMemoryGbps") or 20.0),
        device_to_host_gbps=spec.get("deviceToHostGbps"),
        schedulable=ready and fresh,
        cordoned=cordoned,
        disrupting=disrupting,
    )


IDLE_AFTER_SECONDS = 10.0
"""A loaded model with no request (none running, none queued) for this long may give way to a model that
has requests waiting (planner/swapin.py); it resumes from host memory on its next request."""
WAITING_WINDOW_SECONDS = 30.0
"""A model that is not running counts as having requests waiting this long after the router last asked for
it (the wake annotation; the router re-asks every 2 s while it holds a request)."""


def waiting_requests(body: dict[str, Any], placement: dict[str, Any] | None, now: datetime) -> int:
    """Requests waiting for a model: its worker's queue while it runs, else whether the router holds any."""
    spec = (placement or {}).get("spec") or {}
    status = (placement or {}).get("status") or {}
    if status.get("state") == "Loaded" and spec.get("desiredState", "Loaded") == "Loaded":
        return int(status.get("queuedRequests") or 0)
    woken = woken_at(body)
    if woken is None:
        return 0
    # a request the model served since is no longer waiting
    last_active = parse_time(status.get("lastActiveTime"))
    if last_active is not None and woken <= last_active:
        return 0
    # while its placement loads, the router holds the request without asking again: still waiting
    loading = (
        placement is not None
        and spec.get("desiredState", "Loaded") == "Loaded"
        and status.get("state") in (None, "Pending", "Loading")
    )
    if not (loading or 0 <= (now - woken).total_seconds() <= WAITING_WINDOW_SECONDS):
        return 0
    return held_requests(body)


def held_requests(body: dict[str, Any]) -> int:
    """Requests the router said it holds for a model (at least one: it asked for it); a count that is not
    a whole number counts as one."""
    value = (body["metadata"].get("annotations") or {}).get(WAITING_ANNOTATION)
    try:
        count = int(value) if isinstance(value, str) and value.strip().isdigit() else 1
    except ValueError:
        count = 1
    return min(max(1, count), MAX_WAITING_REQUESTS)


def woken_at(body: dict[str, Any]) -> datetime | None:
    """When the router last asked for a model that was not running (its wake annotation); ``None`` for
    none, or one that is not a time (anyone who may patch the model can write it)."""
    value = (body["metadata"].get("annotations") or {}).get(WAKE_ANNOTATION)
    try:
        woken = parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return woken.replace(tzinfo=UTC) if woken is not None and woken.tzinfo is None else woken


def observed_demand(placement: dict[str, Any] | None) -> tuple[float, float, int | None] | None:
    """(output tokens/s, prompt tokens/s, typical prompt tokens) the worker saw for a model that runs or is
    being loaded to run (a move or reload keeps the last report: its new window starts empty), or
    ``None`` where none is reported (preempted or idle, or a worker that does not measure it)."""
    spec = (placement or {}).get("spec") or {}
    status = (placement or {}).get("status") or {}
    seen = status.get("demand")
    running = status.get("state", "Pending") in ("Pending", "Loading", "Loaded")
    if not running or spec.get("desiredState", "Loaded") != "Loaded" or not seen:
        return None
    try:
        decode = float(seen["decodeTokensPerSecond"])
        prompt = float(seen.get("promptTokensPerSecond") or 0.0)
        typical = seen.get("typicalPromptTokens")
        typical_tokens = int(typical) if typical is not None else None
    except (KeyError, TypeError, ValueError):
        return None  # the schema forbids this; an older or broken writer is ignored, not trusted
    if not (decode >= 0 and prompt >= 0) or (typical_tokens is not None and typical_tokens < 1):
        return None
    return decode, prompt, typical_tokens


def demand(
    key: str,
    body: dict[str, Any],
    info: ModelDirInfo,
    knobs: OperatorKnobs,
    placement: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> ModelDemand:
    """An LLMModel as the planner's ModelDemand."""
    spec = body["spec"]
    timings = (body.get("status") or {}).get("timings") or {}
    max_sequence_length = int(spec.get("maxSequenceLength", 4096))
    max_batch = int(spec.get("maxBatchSize", 8))
    seen = observed_demand(placement)
    return ModelDemand(
        name=key,
        weight_bytes=info.weight_bytes,
        kv_bytes_per_token=info.kv_bytes_per_token,
        max_sequence_length=max_sequence_length,
        max_batch=max_batch,
        priority=int(spec.get("priority", 0)),
        preemptible=bool(spec.get("preemptible", True)),
        min_decode_tokens_per_second=_slo(spec),
        max_offload_fraction=float((spec.get("offload") or {}).get("maxFraction", 0.75)),
        layer_count=info.num_layers,
        # the planner sizes two stream staging buffers from this: use the largest streamable unit
        bytes_per_layer=max(1, info.largest_unit_bytes),
        parameter_count=info.parameter_count,
        workspace_bytes=knobs.workspace_bytes + info.workspace_bytes(max_sequence_length, max_batch),
        last_reload_seconds=timings.get("reloadSeconds"),
        wanted=not body["metadata"].get("deletionTimestamp"),
        has_served=timings.get("loadSeconds") is not None or seen is not None,
        waiting_requests=0 if now is None else waiting_requests(body, placement, now),
        demand_decode_tokens_per_second=None if seen is None else seen[0],
        prompt_tokens_per_second=None if seen is None else seen[1],
        typical_prompt_tokens=None if seen is None else seen[2],
    )


def with_known_demand(demands: list[ModelDemand]) -> list[ModelDemand]:
    """Once any model reports its traffic, a model without a report (not running, or not yet) is valued by
    the requests waiting for it (planner.waiting_demand: each at its SLO; none when none waits) instead of
    an unknown demand, which the planner values as unbounded: it would outbid every model whose traffic is
    measured (the simulator plans the same way). With no report anywhere (a cold start, or workers that do
    not measure) demands stay unknown, as before."""
    if all(d.demand_decode_tokens_per_second is None for d in demands):
        return demands
    return [
        d
        if d.demand_decode_tokens_per_second is not None
        else replace(d, demand_decode_tokens_per_second=waiting_demand(d))
        for d in demands
    ]


def current_placement(
    placement: dict[str, Any], now: datetime | None = None, woken: datetime | None = None
) -> CurrentPlacement | None:
    """What a ModelPlacement commits now: its observed state, or its spec while the worker converges. A
    loaded model with no request for :data:`IDLE_AFTER_SECONDS` (by ``now``; a request the router holds
    for it, ``woken``, counts) is ``idle``."""
    spec = placement["spec"]
    status = placement.get("status") or {}
    state = status.get("state", "Pending")
    if state in ("Failed", "Unloaded"):
        return None
    desired = spec.get("desiredState", "Loaded")
    # an idle model released its GPU memory and keeps weights in host memory, like a preempted one
    released = desired in ("Preempted", "Idle") and state != "Loaded"
    kind = "preempted" if released else _PLACEMENT_STATE.get(state, "loaded")
    last_active = parse_time(status.get("lastActiveTime"))
    if last_active is not None and woken is not None:
        last_active = max(last_active, woken)
    # (also while a preemption is on its way: until the worker acts the model still holds its memory, and
    # the next round must see it as the swap-in that released it did, or it flips the decision back)
    if (
        now is not None
        and state == "Loaded"
        and last_active is not None
        and (now - last_active).total_seconds() >= IDLE_AFTER_SECONDS
        and not status.get("queuedRequests")
    ):
        kind = "idle"
    # the fraction placed, not the one reported: the worker keeps whole layers, so it reports a fraction
    # near the planner's level, which the next round would otherwise "promote" back to (or write back).
    # Unless the change to it failed (a reason on a loaded model): then what it still holds.
    failed_change = state == "Loaded" and bool(status.get("reason"))
    fraction = status.get("residentFraction") if failed_change else None
    if fraction is None:
        fraction = spec.get("residentFraction", status.get("residentFraction"))
    return CurrentPlacement(
        model=f"{spec['model']['namespace']}/{spec['model']['name']}",
        node=spec["nodeName"],
        resident_fraction=float(fraction if fraction is not None else 1.0),
        mode=(failed_change and status.get("executionMode")) or spec.get("executionMode", "stream"),
        state=kind,  # type: ignore[arg-type]
        kv_cache_bytes=int((status.get("timings") or {}).get("kvBytes") or 0),
    )


def sensitivity_profiles(
    bodies: Iterable[dict[str, Any]], infos: dict[str, ModelDirInfo]
) -> list[SensitivityProfile]:
    """Measured curves, attached to every model of the profile's namespace whose directory they were
    measured on (one tenant's profile never changes how another tenant's model is placed)."""
    by_path: dict[tuple[str, str], list[str]] = {}
    for key, info in infos.items():
        by_path.setdefault((key.split("/", 1)[0], str(info.path)), []).append(key)
    result: list[SensitivityProfile] = []
    for body in bodies:
        spec = body["spec"]
        namespace = body.get("metadata", {}).get("namespace", "")
        keys = by_path.get((namespace, str(Path(spec["modelPath"]))), [])
        groups: dict[tuple[str, int], list[ProfilePoint]] = {}
        for point in spec["points"]:
            groups.setdefault((point["executionMode"], int(point["sequenceLength"])), []).append(
                ProfilePoint(
                    resident_fraction=float(point["residentFraction"]),
                    decode_tokens_per_second=float(point["decodeTokensPerSecond"]),
                    prefill_tokens_per_second=point.get("prefillTokensPerSecond"),
                )
            )
        for key in keys:
            for (mode, seq), points in sorted(groups.items()):
                result.append(SensitivityProfile(key, spec["gpuType"], tuple(points), mode, seq))  # type: ignore[arg-type]
    return result


Validate = Callable[[dict[str, Any]], "ModelDirInfo | Verdict"]
"""An LLMModel body -> its model directory's facts, or why it cannot be served."""


def planner_inputs(
    state: ClusterState, now: datetime, knobs: OperatorKnobs, validate: Validate | None = None
) -> Inputs:
    """Validates every model and converts the cluster into the planner's inputs (deterministic order).
    ``validate`` (default: :func:`validate_model` on each) lets the caller reuse earlier verdicts."""
    check: Validate = validate or (
        lambda body: validate_model(body["spec"], knobs.allowed_model_roots, knobs.remote_code_roots)
    )
    bodies = {model_key(b): b for b in state.models}
    infos: dict[str, ModelDirInfo] = {}
    invalid: dict[str, Verdict] = {}
    demands: list[ModelDemand] = []
    placements = {
        f"{p['spec']['model']['namespace']}/{p['spec']['model']['name']}": p for p in state.placements
    }
    idle: dict[str, str] = {}
    idle_cache_bytes: dict[str, int] = {}
    for key in sorted(bodies):
        checked = check(bodies[key])
        if isinstance(checked, Verdict):
            invalid[key] = checked
            continue
        infos[key] = checked
        placement = placements.get(key)
        reason = idle_reason(bodies[key], placement, now)
        if reason is not None:
            idle[key] = reason
            # Kept out of the plan, but its worker keeps the weights pinned in host memory: set that aside.
            cache = current_placement(placement) if placement is not None else None
            if cache is not None:
                cached = cached_host_bytes(demand(key, bodies[key], checked, knobs), cache.kv_cache_bytes)
                idle_cache_bytes[cache.node] = idle_cache_bytes.get(cache.node, 0) + cached
            continue
        demands.append(demand(key, bodies[key], checked, knobs, placement, now))
    nodes_by_name = {n["metadata"]["name"]: n for n in state.nodes}
    renewed = lease_renewals(state.node_leases)
    capacities = with_host_set_aside(
        [
            node_capacity(p, nodes_by_name.get(p["spec"]["nodeName"]), now, knobs, renewed)
            for p in sorted(state.node_profiles, key=lambda p: p["spec"]["nodeName"])
        ],
        idle_cache_bytes,
    )
    current = [
        c
        for key, p in placements.items()
        if (c := current_placement(p, now, woken_at(bodies[key]) if key in bodies else None)) is not None
        and c.model in infos
        and c.model not in idle
    ]
    return Inputs(
        demands=with_known_demand(demands),
        nodes=capacities,
        current=sorted(current, key=lambda c: c.model),
        profiles=sensitivity_profiles(newest_profiles(state.sensitivity_profiles), infos),
        infos=infos,
        invalid=invalid,
        bodies=bodies,
        placements=placements,
        idle=idle,
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
) -> dict[str, Any]:
    """The ModelPlacement object the operator wants for one model."""
    namespace, name = key.split("/", 1)
    spec = body["spec"]
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
            "residentFraction": round(resident_fraction, 4),
            "minResidentFraction": round(
                1.0 - float((spec.get("offload") or {}).get("maxFraction", 0.75)), 4
            ),
            "executionMode": mode,
            "desiredState": desired_state,
            "maxSequenceLength": int(spec.get("maxSequenceLength", 4096)),
            "maxBatchSize": int(spec.get("maxBatchSize", 8)),
            **({"minDecodeTokensPerSecond": float(slo)} if (slo := _slo(spec)) is not None else {}),
            **({"reason": reason[:1024]} if reason else {}),
        },
    }


def _slo(spec: dict[str, Any]) -> float | None:
    """An LLMModel's decode SLO in tokens/s (``None``: it has none)."""
    slo = (spec.get("slo") or {}).get("minDecodeTokensPerSecond")
    return None if slo is None else float(slo)


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
        )
    return desired


RETRIED_LOAD_FAILURES = frozenset({"PlacementDoesNotFit"})
"""Worker refusals that resolve by themselves: the model shows Pending (with a Warning Event), not Failed."""


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


def _percent(fraction: float | None) -> int | None:
    return None if fraction is None else round(fraction * 100)


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
            round(planned.predicted_decode_tokens_per_second, 2) if planned else None,
        ),
        ("predictionSource", planned.prediction_source if planned else None),
        ("endpoint", status.get("endpoint") if state == "Loaded" else None),
    )
    if status.get("timings"):
        extra += (("timings", status["timings"]),)
    if observed_rate is not None:
        extra += (("observed", {"decodeTokensPerSecond": observed_rate}),)
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
        slo = _slo(inputs.bodies[key]["spec"])
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
