"""The order of a plan's actions: each step only takes memory the steps before it have freed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    caches: Mapping[str, tuple[int, int]] | None = None,
    drop_cache: Callable[[str], list[Action]] | None = None,
) -> tuple[list[Action], list[str]]:
    """``actions`` (already in their preferred order: frees before takes, priority, name) reordered so
    that no step takes GPU or host memory that an earlier step has not yet freed, on any node; and the
    models whose host cache had to be given up for that.

    Each model's steps move it from its footprint ``before`` to ``after`` as one; the first model in the
    preferred order whose move fits goes next. Where none fits, the first blocked move that a remedy
    unblocks gets it:

    - a model migrating off a node that move is short of leaves first: its migration becomes an unload
      there and a load on its new node once room is free (models trading places on full nodes);
    - else a host cache on a node short of host memory is given up (``caches``: every model the plan
      keeps cached, name -> (node, host bytes); ``drop_cache`` gives the model's actions without it,
      which replace its own where it has any): a preemption that needs host memory a later promotion
      frees, while that promotion needs the GPU memory the preemption frees, would otherwise over-commit
      host memory.

    Only where no remedy is left does the first go anyway. Linear when the preferred order fits, as it
    nearly always does. ``free_*_after``: what the whole plan leaves free per node, from which the memory
    in use now follows.
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

    def fits(name: str) -> bool:
        # Only the nodes where the model takes more than it frees can run out.
        start = before.get(name, {})
        for node, (gpu, host) in after.get(name, {}).items():
            had_gpu, had_host = start.get(node, (0, 0))
            if gpu > had_gpu and used_gpu[node] + gpu - had_gpu > capacity_gpu[node]:
                return False
            if host > had_host and used_host[node] + host - had_host > capacity_host[node]:
                return False
        return True

    def short_of(name: str) -> tuple[set[int], set[int]]:
        """The nodes where the model's move, were it next, would take GPU / host memory that is not free."""
        start = before.get(name, {})
        gpu_short: set[int] = set()
        host_short: set[int] = set()
        for node, (gpu, host) in after.get(name, {}).items():
            had_gpu, had_host = start.get(node, (0, 0))
            if gpu > had_gpu and used_gpu[node] + gpu - had_gpu > capacity_gpu[node]:
                gpu_short.add(node)
            if host > had_host and used_host[node] + host - had_host > capacity_host[node]:
                host_short.add(node)
        return gpu_short, host_short

    def split_one(gpu_short: set[int], host_short: set[int]) -> bool:
        """A migration leaving one of those nodes goes as an unload now and a load later."""
        for name in pending[:ORDER_SCAN_LIMIT]:
            steps = by_model[name]
            if len(steps) != 1 or steps[0].kind != "migrate":
                continue
            frees = before.get(name, {})
            if not any(
                (node in gpu_short and gpu > 0) or (node in host_short and host > 0)
                for node, (gpu, host) in frees.items()
            ):
                continue
            leave, arrive = split_migration(steps[0])
            for node, (gpu, host) in frees.items():
                used_gpu[node] -= gpu
                used_host[node] -= host
            before[name] = {}  # what is left of its move is the arrival
            ordered.append(leave)
            by_model[name] = [arrive]
            return True
        return False

    def drop_one(host_short: set[int]) -> bool:
        """The largest host cache kept on one of those nodes is given up."""
        if not caches or drop_cache is None:
            return False
        kept = [
            (-host, name, node)
            for name, (node, host) in caches.items()
            if node in host_short and host > 0 and name not in dropped
        ]
        if not kept:
            return False
        _, name, node = min(kept)
        host = caches[name][1]
        dropped.append(name)
        replacement = drop_cache(name)
        if name in pending:
            held = after.get(name, {})
            gpu_after, host_after = held.get(node, (0, 0))
            after[name] = {**held, node: (gpu_after, host_after - host)}
            by_model[name] = replacement
        else:
            # already ordered (its steps now only free more, earlier) or not acting at all (its cache is
            # released now); either way the host memory is free from here on
            used_host[node] -= host
            at = [k for k, action in enumerate(ordered) if action.model == name]
            if at:
                ordered[at[0] : at[-1] + 1] = replacement
            else:
                ordered.extend(replacement)
        return True

    pending = list(by_model)
    ordered: list[Action] = []
    while pending:
        # the first that fits among the next few (bounded: a plan of many moves that block each other, a
        # rotation through full nodes, would otherwise rescan every blocked one at each step)
        chosen = next((k for k, name in enumerate(pending[:ORDER_SCAN_LIMIT]) if fits(name)), None)
        if chosen is None:
            remedied = False
            for name in pending[:ORDER_SCAN_LIMIT]:
                gpu_short, host_short = short_of(name)
                if split_one(gpu_short, host_short) or (host_short and drop_one(host_short)):
                    remedied = True
                    break
            if remedied:
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
