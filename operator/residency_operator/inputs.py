"""The cluster as the planner's inputs, each model's share kept from round to round while its objects stay.

At fleet size most of a round that re-plans a few models went into converting every model (10 000 at the
scale goal) into planner inputs again. :class:`ModelRows` keeps each model's conversion while its LLMModel
and ModelPlacement are the same objects (the informers store a new object for every new version), its
directory's facts are the same and its node's GPU type is the same; what depends on the time (requests
waiting, a loaded model gone quiet) is applied to the kept conversion every round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from residency.modeldir import ModelDirInfo
from residency_operator.conditions import Verdict
from residency_operator.observations import with_observed_point
from residency_operator.planner import CurrentPlacement, ModelDemand, waiting_demand
from residency_operator.planner.options import cached_host_bytes, with_host_set_aside
from residency_operator.profiles import newest_profiles
from residency_operator.state import (
    ClusterState,
    Inputs,
    OperatorKnobs,
    at_time,
    current_placement,
    demand,
    idle_reason,
    lease_renewals,
    liveness_suspended,
    node_capacity,
    placement_commitment,
    sensitivity_profiles,
    waiting_requests,
    woken_at,
)
from residency_operator.validation import validate_model

Validate = Callable[[dict[str, Any]], "ModelDirInfo | Verdict"]
"""An LLMModel body -> its model directory's facts, or why it cannot be served."""


@dataclass(frozen=True)
class ModelRow:
    """One model's planner inputs whatever the time, and what they were made from."""

    body: dict[str, Any]
    placement: dict[str, Any] | None
    info: ModelDirInfo
    gpu_type: str | None
    """The GPU type of the placement's node (the observed point is read on it)."""
    demand: ModelDemand
    """With no request waiting, and the worker's observed point."""
    unmeasured: ModelDemand
    """:attr:`demand` valued by its waiting requests (see :func:`planner_inputs`)."""
    current: CurrentPlacement | None
    quiet_since: datetime | None
    may_wait: bool
    """Whether requests may wait for it (its worker queues some, or the router asked for it)."""
    parts: tuple[Any, ...]
    """The objects' parts as they were (:func:`parts`)."""

    def made_from(
        self, body: dict[str, Any], placement: dict[str, Any] | None, info: ModelDirInfo, gpu_type: str | None
    ) -> bool:
        return (
            self.body is body
            and self.placement is placement
            and all(a is b for a, b in zip(self.parts, parts(body, placement), strict=True))
            and (self.info is info or self.info == info)
            and self.gpu_type == gpu_type
        )

    def demand_at(self, now: datetime) -> ModelDemand:
        if not self.may_wait:
            return self.demand
        waiting = waiting_requests(self.body, self.placement, now)
        return self.demand if not waiting else replace(self.demand, waiting_requests=waiting)


def parts(body: dict[str, Any], placement: dict[str, Any] | None) -> tuple[Any, ...]:
    """The parts of a model and its placement that a row reads. The informers never modify an object they
    hold (a new version is a new object), but a caller that does (a test's fake API) replaces a part."""
    meta = body["metadata"]
    return (
        meta,
        meta.get("annotations"),
        body.get("spec"),
        body.get("status"),
        None if placement is None else placement.get("spec"),
        None if placement is None else placement.get("status"),
    )


class ModelRows:
    """Each model's :class:`ModelRow`, from the last round that read it (the operator keeps one)."""

    def __init__(self) -> None:
        self._rows: dict[str, ModelRow] = {}
        self._knobs: OperatorKnobs | None = None
        self.made = 0
        """Rows made (not reused) so far."""

    def begin(self, knobs: OperatorKnobs) -> dict[str, ModelRow]:
        """This round's rows start empty; the last round's are returned to be reused."""
        if self._knobs is not knobs:
            self._rows, self._knobs = {}, knobs
        last, self._rows = self._rows, {}
        return last

    def row(
        self,
        last: dict[str, ModelRow],
        key: str,
        body: dict[str, Any],
        placement: dict[str, Any] | None,
        info: ModelDirInfo,
        gpu_type: str | None,
        knobs: OperatorKnobs,
    ) -> ModelRow:
        """The model's row: the last round's where made from the same objects, else a new one."""
        kept = last.get(key)
        if kept is not None and kept.made_from(body, placement, info, gpu_type):
            self._rows[key] = kept
            return kept
        self.made += 1
        gpu_types = {} if placement is None or gpu_type is None else {placement["spec"]["nodeName"]: gpu_type}
        base = with_observed_point(demand(key, body, info, knobs, placement), placement, gpu_types)
        spec = (placement or {}).get("spec") or {}
        status = (placement or {}).get("status") or {}
        queued = status.get("state") == "Loaded" and spec.get("desiredState", "Loaded") == "Loaded"
        woken = woken_at(body)
        current, quiet_since = (None, None) if placement is None else placement_commitment(placement, woken)
        made = self._rows[key] = ModelRow(
            body=body,
            placement=placement,
            info=info,
            gpu_type=gpu_type,
            demand=base,
            unmeasured=replace(base, demand_decode_tokens_per_second=waiting_demand(base)),
            current=current,
            quiet_since=quiet_since,
            may_wait=bool(status.get("queuedRequests")) if queued else woken is not None,
            parts=parts(body, placement),
        )
        return made


def planner_inputs(
    state: ClusterState,
    now: datetime,
    knobs: OperatorKnobs,
    validate: Validate | None = None,
    rows: ModelRows | None = None,
) -> Inputs:
    """Validates every model and converts the cluster into the planner's inputs (deterministic order).
    ``validate`` (default: :func:`validate_model` on each) lets the caller reuse earlier verdicts, and
    ``rows`` the models' conversions of earlier rounds."""
    check: Validate = validate or (
        lambda body: validate_model(body["spec"], knobs.allowed_model_roots, knobs.remote_code_roots)
    )
    rows = rows or ModelRows()
    last = rows.begin(knobs)
    bodies = {f"{b['metadata']['namespace']}/{b['metadata']['name']}": b for b in state.models}
    placements = {
        f"{p['spec']['model']['namespace']}/{p['spec']['model']['name']}": p for p in state.placements
    }
    nodes_by_name = {n["metadata"]["name"]: n for n in state.nodes}
    renewed = lease_renewals(state.node_leases)
    suspended = liveness_suspended(state.node_profiles, renewed, now, knobs)
    capacities = [
        node_capacity(p, nodes_by_name.get(p["spec"]["nodeName"]), now, knobs, renewed, suspended)
        for p in sorted(state.node_profiles, key=lambda p: p["spec"]["nodeName"])
    ]
    gpu_types = {c.name: c.gpu_type for c in capacities}
    infos: dict[str, ModelDirInfo] = {}
    invalid: dict[str, Verdict] = {}
    idle: dict[str, str] = {}
    idle_cache_bytes: dict[str, int] = {}
    kept: list[ModelRow] = []
    for key in sorted(bodies):
        body = bodies[key]
        checked = check(body)
        if isinstance(checked, Verdict):
            invalid[key] = checked
            continue
        infos[key] = checked
        placement = placements.get(key)
        reason = idle_reason(body, placement, now)
        if reason is not None:
            idle[key] = reason
            # Kept out of the plan, but its worker keeps the weights pinned in host memory: set that aside.
            cache = current_placement(placement) if placement is not None else None
            if cache is not None:
                cached = cached_host_bytes(demand(key, body, checked, knobs), cache.kv_cache_bytes)
                idle_cache_bytes[cache.node] = idle_cache_bytes.get(cache.node, 0) + cached
            continue
        node = None if placement is None else placement["spec"]["nodeName"]
        kept.append(rows.row(last, key, body, placement, checked, gpu_types.get(node or ""), knobs))
    demands = [row.demand_at(now) for row in kept]
    # Once any model reports its traffic, a model without a report (not running, or not yet) is valued by
    # the requests waiting for it (planner.waiting_demand: each at its SLO; none when none waits) instead
    # of an unknown demand, which the planner values as unbounded: it would outbid every model whose
    # traffic is measured (the simulator plans the same way). With no report anywhere (a cold start, or
    # workers that do not measure) demands stay unknown.
    if any(d.demand_decode_tokens_per_second is not None for d in demands):
        demands = [
            d
            if d.demand_decode_tokens_per_second is not None
            else row.unmeasured
            if d is row.demand
            else replace(d, demand_decode_tokens_per_second=waiting_demand(d))
            for d, row in zip(demands, kept, strict=True)
        ]
    current = [c for row in kept if (c := at_time(row.current, row.quiet_since, now)) is not None]
    return Inputs(
        demands=demands,
        nodes=with_host_set_aside(capacities, idle_cache_bytes),
        current=current,
        profiles=sensitivity_profiles(newest_profiles(state.sensitivity_profiles), infos),
        infos=infos,
        invalid=invalid,
        bodies=bodies,
        placements=placements,
        idle=idle,
    )
