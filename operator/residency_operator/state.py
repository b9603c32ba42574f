"""Pure translation between the cluster's objects and the planner: CRD dicts in, desired objects out.

No Kubernetes client here: the controller lists objects, calls these functions, and writes the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from residency.modeldir import ModelDirInfo
from residency_operator.conditions import Verdict
from residency_operator.nodegpus import profile_gpus
from residency_operator.planner import (
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    ProfilePoint,
    SensitivityProfile,
)

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
    if value.endswith("Z"):  # (the API server's form: 2006-01-02T15:04:05Z)
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    return datetime.fromisoformat(value)


@dataclass(frozen=True)
class OperatorKnobs:
    """Operator-wide settings that enter planning."""

    allowed_model_roots: list[Path]
    workspace_bytes: int = 64 * 1024
    """Extra GPU bytes per model beyond what the engine's own sizing (residency.sizing) reserves."""
    heartbeat_grace_seconds: float = 60.0
    remote_code_roots: list[Path] = field(default_factory=list)
    """Roots under which models that ship custom code (config.json auto_map) are allowed; none by default."""
    mass_stale_fraction: float = 0.5
    mass_stale_min_nodes: int = 20
    """When more than this share of the nodes, and at least this many, stopped renewing at once, the
    control plane (or the path to it) is the likelier failure than the nodes: liveness is not acted on
    (kube-controller-manager's node lifecycle controller stops evicting in a full disruption the same way)."""


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
    """The NodeProfiles whose worker renewed its Lease (or, without one, heartbeated) within the grace;
    every NodeProfile while liveness is suspended (:func:`liveness_suspended`)."""
    renewed = lease_renewals(state.node_leases)
    if liveness_suspended(state.node_profiles, renewed, now, knobs):
        return frozenset(p["spec"]["nodeName"] for p in state.node_profiles)
    return frozenset(
        p["spec"]["nodeName"] for p in state.node_profiles if _fresh(_last_seen(p, renewed), now, knobs)
    )


def liveness_suspended(
    profiles: list[dict[str, Any]], renewed: dict[str, datetime], now: datetime, knobs: OperatorKnobs
) -> bool:
    """Whether so many nodes went stale that the API server, not the nodes, is the likely failure (an
    overloaded control plane stops taking Lease renewals from every node at once): then no node is judged
    dead, and no model is moved or dropped for it, until renewals come through again."""
    stale = len(stale_nodes(profiles, renewed, now, knobs))
    return stale >= knobs.mass_stale_min_nodes and stale > knobs.mass_stale_fraction * len(profiles)


def stale_nodes(
    profiles: list[dict[str, Any]], renewed: dict[str, datetime], now: datetime, knobs: OperatorKnobs
) -> frozenset[str]:
    """The nodes that renewed (or heartbeated) once and then stopped for longer than the grace; a node
    that never renewed, one registering now, has not stopped renewing."""
    return frozenset(
        p["spec"]["nodeName"]
        for p in profiles
        if (at := _last_seen(p, renewed)) is not None and not _fresh(at, now, knobs)
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
    assume_fresh: bool = False,
) -> NodeCapacity:
    """A NodeProfile and its Node as the planner's NodeCapacity (``renewed``: the node Leases' renewals;
    ``assume_fresh``: liveness is suspended, see :func:`liveness_suspended`)."""
    spec = profile["spec"]
    ready, cordoned, disrupting = node_accepts(node)
    fresh = assume_fresh or _fresh(_last_seen(profile, renewed or {}), now, knobs)
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
        **profile_gpus(spec),
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
        min_decode_tokens_per_second=decode_slo(spec),
        max_offload_fraction=float((spec.get("offload") or {}).get("maxFraction", 0.75)),
        layer_count=info.num_layers,
        # the planner sizes two stream staging buffers from this: use the largest streamable unit
        bytes_per_layer=max(1, info.largest_unit_bytes),
        unit_bytes=info.unit_bytes,  # the engine's units: partial placements counted exactly
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


def current_placement(
    placement: dict[str, Any], now: datetime | None = None, woken: datetime | None = None
) -> CurrentPlacement | None:
    """What a ModelPlacement commits now: its observed state, or its spec while the worker converges. A
    loaded model with no request for :data:`IDLE_AFTER_SECONDS` (by ``now``; a request the router holds
    for it, ``woken``, counts) is ``idle``."""
    current, quiet_since = placement_commitment(placement, woken)
    return at_time(current, quiet_since, now)


def at_time(
    current: CurrentPlacement | None, quiet_since: datetime | None, now: datetime | None
) -> CurrentPlacement | None:
    """A placement's commitment (:func:`placement_commitment`) as of ``now``: ``idle`` once quiet for
    :data:`IDLE_AFTER_SECONDS`."""
    if (
        current is None
        or now is None
        or quiet_since is None
        or (now - quiet_since).total_seconds() < IDLE_AFTER_SECONDS
    ):
        return current
    return replace(current, state="idle")


def placement_commitment(
    placement: dict[str, Any], woken: datetime | None = None
) -> tuple[CurrentPlacement | None, datetime | None]:
    """What a ModelPlacement commits whatever the time (``None``: nothing), and since when a loaded model
    with nothing queued has had no request (``None``: it is not such a model, or never served one)."""
    spec = placement["spec"]
    status = placement.get("status") or {}
    state = status.get("state", "Pending")
    if state in ("Failed", "Unloaded"):
        return None, None
    desired = spec.get("desiredState", "Loaded")
    # an idle model released its GPU memory and keeps weights in host memory, like a preempted one
    released = desired in ("Preempted", "Idle") and state != "Loaded"
    kind = "preempted" if released else _PLACEMENT_STATE.get(state, "loaded")
    last_active = parse_time(status.get("lastActiveTime"))
    if last_active is not None and woken is not None:
        last_active = max(last_active, woken)
    # (also while a preemption is on its way: until the worker acts the model still holds its memory, and
    # the next round must see it as the swap-in that released it did, or it flips the decision back)
    quiet_since = last_active if state == "Loaded" and not status.get("queuedRequests") else None
    # the fraction placed, not the one reported: the worker keeps whole layers, so it reports a fraction
    # near the planner's level, which the next round would otherwise "promote" back to (or write back).
    # Unless the change to it failed (a reason on a loaded model): then what it still holds.
    failed_change = state == "Loaded" and bool(status.get("reason"))
    fraction = status.get("residentFraction") if failed_change else None
    if fraction is None:
        fraction = spec.get("residentFraction", status.get("residentFraction"))
    current = CurrentPlacement(
        model=f"{spec['model']['namespace']}/{spec['model']['name']}",
        node=spec["nodeName"],
        resident_fraction=float(fraction if fraction is not None else 1.0),
        mode=(failed_change and status.get("executionMode")) or spec.get("executionMode", "stream"),
        state=kind,  # type: ignore[arg-type]
        kv_cache_bytes=int((status.get("timings") or {}).get("kvBytes") or 0),
        gpus=tuple(int(g["index"]) for g in spec.get("gpus") or []),
    )
    return current, quiet_since


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


def decode_slo(spec: dict[str, Any]) -> float | None:
    """An LLMModel's decode SLO in tokens/s (``None``: it has none)."""
    slo = (spec.get("slo") or {}).get("minDecodeTokensPerSecond")
    return None if slo is None else float(slo)
