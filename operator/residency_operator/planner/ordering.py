"""The order of a plan's actions: each step only takes memory the steps before it have freed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from residency_operator.planner.options import (
    cached_host_bytes,
    gpu_bytes_needed,
    host_bytes_needed,
    usable_gpu_bytes,
    usable_host_bytes,
)
from residency_operator.planner.types import (
    Action,
    CachedModel,
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    PlannedPlacement,
)

ORDER_SCAN_LIMIT = 64
"""Pending models looked at for the next step (in preferred order) before the first goes regardless."""
Footprint = dict[int, tuple[int, int]]
"""Node index -> (GPU bytes, host bytes) one model holds there."""


def footprint_now(
    model: ModelDemand, current: CurrentPlacement | None, node_index: Mapping[str, int]
) -> Footprint:
    """What a model holds before the plan: its running placement, or the host cache of a preempted one."""
    if current is None or current.node not in node_index:
        return {}
    node = node_index[current.node]
    if current.is_running:
        return {
            node: (
                gpu_bytes_needed(model, current.resident_fraction, current.mode),
                host_bytes_needed(model, current.resident_fraction),
            )
        }
    if current.state == "preempted":
        return {node: (0, cached_host_bytes(model, current.kv_cache_bytes))}
    return {}


def footprint_planned(
    placement: PlannedPlacement | None, cached: CachedModel | None, node_index: Mapping[str, int]
) -> Footprint:
    """What a model holds once the plan is carried out: its placement, or the host cache it keeps."""
    held: Footprint = {}
    if placement is not None and placement.node in node_index:
        held[node_index[placement.node]] = (placement.gpu_bytes, placement.host_bytes)
    if cached is not None and cached.node in node_index:
        gpu, host = held.get(node_index[cached.node], (0, 0))
        held[node_index[cached.node]] = (gpu, host + cached.host_bytes)
    return held


def order_by_room(
    actions: Sequence[Action],
    before: Mapping[str, Footprint],
    after: Mapping[str, Footprint],
    nodes: Sequence[NodeCapacity],
    free_gpu_after: Sequence[int],
    free_host_after: Sequence[int],
    uncached: Mapping[str, Footprint] | None = None,
) -> tuple[list[Action], list[str]]:
    """``actions`` (already in their preferred order: frees before takes, priority, name) reordered so
    that no step takes GPU or host memory that an earlier step has not yet freed, on any node; and the
    models whose host cache had to be given up for that.

    Each model's steps move it from its footprint ``before`` to ``after`` as one; the first model in the
    preferred order whose move fits goes next. Where none fits, a preempted model whose host cache is
    what blocks (``uncached``: its footprint were it not kept) goes without its cache: a preemption that
    needs host memory a later promotion frees, while that promotion needs the GPU memory the preemption
    frees, would otherwise over-commit host memory. Where still none fits (models trading places on full
    nodes), a migrating model leaves its node first: its migration becomes an unload there and a load on
    its new node once room is free. Only where no model migrates does the first go anyway. Linear when
    the preferred order fits, as it nearly always does. ``free_*_after``: what the whole plan leaves
    free per node, from which the memory in use now follows.
    """
    by_model: dict[str, list[Action]] = {}
    for action in actions:
        by_model.setdefault(action.model, []).append(action)
    if len(by_model) < 2:
        return list(actions), []
    capacity_gpu = [usable_gpu_bytes(n) for n in nodes]
    capacity_host = [usable_host_bytes(n) for n in nodes]
    used_gpu = [cap - free for cap, free in zip(capacity_gpu, free_gpu_after, strict=True)]
    used_host = [cap - free for cap, free in zip(capacity_host, free_host_after, strict=True)]

    def move(name: str, sign: int) -> None:
        """Apply (sign 1) or undo (sign -1) the model's move on the running totals."""
        for node, (gpu, host) in after.get(name, {}).items():
            used_gpu[node] += sign * gpu
            used_host[node] += sign * host
        for node, (gpu, host) in before.get(name, {}).items():
            used_gpu[node] -= sign * gpu
            used_host[node] -= sign * host

    # Back to the memory in use now; and what it would be were every growth taken before any release.
    peak_gpu, peak_host = list(used_gpu), list(used_host)
    for name in by_model:
        start, end = before.get(name, {}), after.get(name, {})
        for node, (gpu, host) in end.items():
            used_gpu[node] -= gpu
            used_host[node] -= host
            had_gpu, had_host = start.get(node, (0, 0))
            peak_gpu[node] += max(0, gpu - had_gpu) - gpu
            peak_host[node] += max(0, host - had_host) - host
        for node, (gpu, host) in start.items():
            used_gpu[node] += gpu
            used_host[node] += host
            peak_gpu[node] += gpu
            peak_host[node] += host
    if all(peak <= cap for peak, cap in zip(peak_gpu, capacity_gpu, strict=True)) and all(
        peak <= cap for peak, cap in zip(peak_host, capacity_host, strict=True)
    ):
        return list(actions), []  # any order fits (a first plan on an empty cluster, most re-plans)
    before, after = dict(before), dict(after)
    dropped: list[str] = []

    def fits(name: str, end: Footprint | None = None) -> bool:
        # Only the nodes where the model takes more than it frees can run out.
        start = before.get(name, {})
        for node, (gpu, host) in (after.get(name, {}) if end is None else end).items():
            had_gpu, had_host = start.get(node, (0, 0))
            if gpu > had_gpu and used_gpu[node] + gpu - had_gpu > capacity_gpu[node]:
                return False
            if host > had_host and used_host[node] + host - had_host > capacity_host[node]:
                return False
        return True

    pending = list(by_model)
    ordered: list[Action] = []
    while pending:
        # the first that fits among the next few (bounded: a plan of many moves that block each other, a
        # rotation through full nodes, would otherwise rescan every blocked one at each step)
        chosen = next((k for k, name in enumerate(pending[:ORDER_SCAN_LIMIT]) if fits(name)), None)
        if chosen is None and uncached:
            chosen = next(
                (
                    k
                    for k, name in enumerate(pending[:ORDER_SCAN_LIMIT])
                    if name in uncached and fits(name, uncached[name])
                ),
                None,
            )
            if chosen is not None:
                after[pending[chosen]] = uncached[pending[chosen]]
                dropped.append(pending[chosen])
        if chosen is None:
            migrating = next(
                (
                    name
                    for name in pending[:ORDER_SCAN_LIMIT]
                    if len(by_model[name]) == 1 and by_model[name][0].kind == "migrate"
                ),
                None,
            )
            if migrating is not None:
                # Models trading places on full nodes: one of them leaves its node first and arrives
                # once room is free (the migration as its two halves, an unload and a load).
                leave, arrive = split_migration(by_model[migrating][0])
                for node, (gpu, host) in before.get(migrating, {}).items():
                    used_gpu[node] -= gpu
                    used_host[node] -= host
                before[migrating] = {}  # what is left of its move is the arrival
                ordered.append(leave)
                by_model[migrating] = [arrive]
                continue
        name = pending.pop(chosen or 0)
        move(name, 1)
        ordered.extend(by_model[name])
    return ordered, dropped


def split_migration(action: Action) -> tuple[Action, Action]:
    """A migration as an unload from its node and a later load on the new one."""
    leave = replace(
        action,
        kind="evict",
        to_node=None,
        to_resident_fraction=0.0,
        bytes_moved=0,
        predicted_seconds=0.0,
        reason=f"unload from {action.from_node} first, to make room for a model that moves there; "
        f"it loads on {action.to_node} once that frees room",
    )
    arrive = replace(action, kind="load", from_node=None, from_resident_fraction=0.0)
    return leave, arrive
