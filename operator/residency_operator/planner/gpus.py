"""Packing GPUs, not nodes: a multi-GPU node becomes one planning unit per GPU set.

The solvers pack *units*, each a :class:`NodeCapacity` of its own. A single-GPU node is its own unit,
unchanged. A node with several GPUs (``NodeCapacity.gpus``) is partitioned every round into disjoint GPU
sets: one unit per GPU, except where a model larger than one GPU is better split by layers across several
GPUs of the node — those GPUs form one unit (``gpu-a/0,1``) whose memory is theirs together. A model
therefore never spans nodes, by construction: a unit is part of exactly one node.

A split's predicted rate (the roofline of ``predictor.py`` on the unit): its stages read their own layers
one after another, so the HBM terms add as on one GPU of the slowest stage's bandwidth; the remainder in
host memory streams over the unit's share of its host link; every stage boundary adds one activation hop
(:func:`pipeline_hop_seconds`). Host links shared by several GPUs are shared statically: each GPU counts
on ``concurrent_host_to_device_gbps / GPUs on the link`` (never more than it measured alone), so two models
streaming through one link each get part of it. Each unit takes the node's host memory in proportion to
its GPUs.

When a split is made (:func:`partition_gpus`): a model that fits one GPU fully resident stays on one GPU (a
split only adds hops); one that does not gets the fewest GPUs that hold it fully resident (all of the
node's, with the rest in host memory, where even they do not), unless that is predicted slower than its
best offload on one GPU (``SPLIT_MIN_SPEEDUP``), where a node has the GPUs free — or held by placements
of lower priority, which then move (making room per GPU) — and only where the split is worth its GPUs:
what it serves within its SLO against the demand of other models its GPUs would leave without room
(planner/split_worth.py). Splits already running keep their GPUs while they stay worth them (with a
margin), so the partition is stable from round to round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from residency.sizing import memory_text
from residency_operator.planner.options import (
    gpu_bytes_needed,
    host_bytes_needed,
    node_class_tuple,
    usable_host_bytes,
)
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.split_worth import GpuMarket, Worth, asks_for_service, slo_capacity
from residency_operator.planner.types import (
    GB,
    CachedModel,
    CurrentPlacement,
    GpuCapacity,
    GpuShare,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannedPlacement,
    PlannerConfig,
    Unschedulable,
)

HOP_LATENCY_SECONDS = 20e-6
"""Fixed cost of one device-to-device activation copy (launch and synchronisation)."""
HOP_ACTIVATION_BYTES = 8 * 8192 * 2
"""Activation bytes one hop moves per decode step: a full batch (8) of bf16 hidden states of a 70B-class
model (8192); a stated assumption, small next to the latency on NVLink and PCIe alike."""
SPLIT_MIN_SPEEDUP = 0.95
"""A split is made unless predicted slower than this share of the model's best offload on one GPU: at equal
speed (an emulated node, whose "HBM" and link are the same DRAM) resident weights leave the host link and
host memory to others — the tie-break ``PlannerConfig.offload_penalty_per_gib`` makes within one GPU."""


def is_multi_gpu(node: NodeCapacity) -> bool:
    """Whether the planner packs this node's GPUs one by one."""
    return len(node.gpus) > 1


def link_share_gbps(node: NodeCapacity, gpu: GpuCapacity) -> float:
    """Host-to-device GB/s one GPU counts on when every GPU of its host link copies at once."""
    for link in node.host_links:
        if gpu.index in link.gpus and len(link.gpus) > 1:
            return min(gpu.host_to_device_gbps, link.concurrent_host_to_device_gbps / len(link.gpus))
    return gpu.host_to_device_gbps


def pipeline_hop_seconds(node: NodeCapacity, gpu_count: int) -> float:
    """Seconds a decode step spends passing activations across ``gpu_count - 1`` stage boundaries."""
    if gpu_count <= 1:
        return 0.0
    gbps = node.device_to_device_gbps or min(g.host_to_device_gbps for g in node.gpus)
    return (gpu_count - 1) * (HOP_LATENCY_SECONDS + HOP_ACTIVATION_BYTES / (gbps * GB))


def unit_label(node_name: str, gpus: Sequence[int]) -> str:
    """``gpu-a/0,1``: the unit's name, as ``kubectl get llm -o wide`` shows where a model runs."""
    return f"{node_name}/{','.join(str(g) for g in gpus)}"


def gpu_unit(node: NodeCapacity, gpus: Sequence[int], stage_workspace_bytes: int = 0) -> NodeCapacity:
    """The planning unit of a GPU set of a multi-GPU node: what the solvers see of those GPUs. Each stage
    past the first sets aside ``stage_workspace_bytes`` (the workspace of the model the set is formed for:
    a model's footprint counts one)."""
    by_index = {g.index: g for g in node.gpus}
    members = [by_index[i] for i in gpus]
    total = len(node.gpus)
    # Memory reserved at node level beyond the GPUs' own reserves (other pods' use) is spread evenly.
    node_reserve = max(0, node.reserved_gpu_bytes - sum(g.reserved_bytes for g in node.gpus))
    return dataclasses.replace(
        node,
        name=unit_label(node.name, gpus),
        gpu_memory_bytes=sum(g.memory_bytes for g in members),
        reserved_gpu_bytes=sum(g.reserved_bytes for g in members)
        + node_reserve * len(members) // total
        + (len(members) - 1) * stage_workspace_bytes,
        host_memory_bytes=node.host_memory_bytes * len(members) // total,
        reserved_host_bytes=node.reserved_host_bytes * len(members) // total,
        hbm_gbps=min(g.hbm_gbps for g in members),
        host_to_device_gbps=min(link_share_gbps(node, g) for g in members),
        gpus=(),
        host_links=(),
        pipeline_hop_seconds=pipeline_hop_seconds(node, len(members)),
        machine=node.name,
    )


def _usable_gpu(unit: NodeCapacity) -> int:
    return max(0, unit.gpu_memory_bytes - unit.reserved_gpu_bytes)


def _levels(model: ModelDemand, config: PlannerConfig) -> list[float]:
    floor = model.min_resident_fraction
    return sorted({level for level in config.residency_levels if level >= floor - 1e-9} | {1.0, floor})


def fitting_levels(model: ModelDemand, unit: NodeCapacity, config: PlannerConfig) -> list[float]:
    """Resident fractions of the model that fit an empty unit within ``offload.maxFraction``."""
    gpu, host = _usable_gpu(unit), usable_host_bytes(unit)
    return [
        level
        for level in _levels(model, config)
        if gpu_bytes_needed(model, level, "stream") <= gpu and host_bytes_needed(model, level) <= host
    ]


def best_rate(
    predictor: Predictor, model: ModelDemand, unit: NodeCapacity, config: PlannerConfig
) -> tuple[float, float] | None:
    """(resident fraction, decode tokens/s) of the model's fastest placement that fits an empty unit within
    ``offload.maxFraction``; ``None`` where none fits."""
    best: tuple[float, float] | None = None
    for level in fitting_levels(model, unit, config):
        rate = max(
            predictor.decode_tokens_per_second(model, unit, level, mode) for mode in model.allowed_modes
        )
        if best is None or rate > best[1]:
            best = (level, rate)
    return best


def split_size(model: ModelDemand, node: NodeCapacity) -> int:
    """GPUs of ``node`` a split of the model takes: the fewest that hold it fully resident, else all."""
    need = gpu_bytes_needed(model, 1.0, "stream")
    usable = sorted((g.usable_bytes for g in node.gpus), reverse=True)
    for count in range(2, len(usable) + 1):
        if sum(usable[:count]) - (count - 1) * model.workspace_bytes >= need:
            return count
    return len(usable)


@dataclass(frozen=True, slots=True)
class _Holder:
    model: str
    priority: int
    preemptible: bool


def _holders(
    node: NodeCapacity, current: Sequence[CurrentPlacement], models: dict[str, ModelDemand]
) -> dict[int, _Holder]:
    """GPU index → the running single-GPU placement of a wanted model on it."""
    held: dict[int, _Holder] = {}
    for placement in current:
        if placement.node != node.name or not placement.is_running or len(placement.gpus) > 1:
            continue
        model = models.get(placement.model)
        if model is not None:
            held[(placement.gpus or (0,))[0]] = _Holder(
                model.name, model.declared_priority, model.preemptible
            )
    return held


def partition_gpus(
    models: Sequence[ModelDemand],
    nodes: Sequence[NodeCapacity],
    current: Sequence[CurrentPlacement],
    predictor: Predictor,
    config: PlannerConfig,
) -> tuple[dict[str, list[tuple[int, ...]]], dict[tuple[str, tuple[int, ...]], str], dict[str, str]]:
    """Each multi-GPU node's GPU sets for this round (see the module docstring), in index order, the model
    each split's GPU set is formed for, and why a model that only a split holds got none this round. The
    model each split's GPU set is formed for (only it may run there: a model that fits one GPU is never
    split, and the GPUs of a split are not filled with small models that would leave its model no room).
    Splits are formed only for models that fit no single GPU of the fleet fully resident."""
    wanted = {m.name: m for m in models if m.wanted}
    multi = [n for n in nodes if is_multi_gpu(n)]
    free: dict[str, set[int]] = {n.name: {g.index for g in n.gpus} for n in multi}
    groups: dict[str, list[tuple[int, ...]]] = {n.name: [] for n in multi}
    owners: dict[tuple[str, tuple[int, ...]], str] = {}
    running: dict[str, tuple[str, tuple[int, ...]]] = {}
    for placement in sorted(current, key=lambda p: p.model):
        gpus = placement.gpus
        if (
            len(gpus) > 1
            and placement.is_running
            and placement.model in wanted
            and config.allow_gpu_splits
            and placement.node in free
            and set(gpus) <= free[placement.node]
        ):
            running[placement.model] = (placement.node, gpus)
    unseated: dict[str, str] = {}
    if not (config.allow_gpu_splits and multi):
        for node in multi:
            groups[node.name].extend((index,) for index in sorted(free[node.name]))
        return groups, owners, unseated
    holders = {n.name: _holders(n, current, wanted) for n in multi}
    for name, (node_name, gpus) in running.items():  # a running split holds each of its GPUs
        model = wanted[name]
        for index in gpus:
            holders[node_name][index] = _Holder(name, model.declared_priority, model.preemptible)
    largest_gpu = max(
        [g.usable_bytes for n in nodes if n.accepts_work for g in n.gpus]
        + [max(0, n.gpu_memory_bytes - n.reserved_gpu_bytes) for n in nodes if n.accepts_work and not n.gpus]
        + [0]
    )
    # Highest priority first, a running split before a newcomer of its priority: a running split keeps its
    # GPUs unless a model of higher priority needs them (it may then take them, as it takes a single GPU
    # from a lower-priority model; the displaced split looks for other GPUs in its turn).
    splitters = sorted(
        (
            m
            for m in wanted.values()
            if m.name in running or (asks_for_service(m) and gpu_bytes_needed(m, 1.0, "stream") > largest_gpu)
        ),
        key=lambda m: (-m.declared_priority, m.name not in running, -_demand_key(m), m.name),
    )
    rates = RateCache(predictor, config)
    market = _market(wanted.values(), nodes, largest_gpu, config)
    by_name = {n.name: n for n in multi}
    for model in splitters:
        kept = running.get(model.name)
        chosen: tuple[str, tuple[int, ...]] | None
        if kept is not None and set(kept[1]) <= free[kept[0]]:
            chosen = kept
        else:
            for gpus_by_node in holders.values():  # its old GPUs (some taken) no longer hold it
                for index in [i for i, h in gpus_by_node.items() if h.model == model.name]:
                    del gpus_by_node[index]
            chosen = _place_split(model, multi, free, holders, rates)
        if chosen is None:
            unseated[model.name] = _unseated_message(model, multi)
            continue
        node_name, gpus = chosen
        worth, taken = _worth(model, by_name[node_name], gpus, market, rates)
        if not worth.wins(running=chosen == kept):
            unseated[model.name] = _unworthy_message(model, worth)
            for gpus_by_node in holders.values():  # a running split that lost holds no GPU any more
                for index in [i for i, h in gpus_by_node.items() if h.model == model.name]:
                    del gpus_by_node[index]
            continue
        market.take(taken)
        groups[node_name].append(gpus)
        owners[(node_name, gpus)] = model.name
        free[node_name] -= set(gpus)
        for index in gpus:
            holders[node_name].pop(index, None)
    for node in multi:
        groups[node.name].extend((index,) for index in sorted(free[node.name]))
        groups[node.name].sort()
    return groups, owners, unseated


def _unseated_message(model: ModelDemand, nodes: Sequence[NodeCapacity]) -> str:
    """Why a model that only a split holds has no GPUs this round."""
    need = gpu_bytes_needed(model, 1.0, "stream")
    counts = sorted({split_size(model, node) for node in nodes if node.accepts_work})
    many = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (
        f"needs {many} GPUs of one node ({memory_text(need)} wholly resident; no single GPU holds it), "
        "and no node has that many GPUs free of models of its priority or above, or a split there is "
        "predicted slower than offloading it on one GPU"
    )


def _market(
    wanted: Iterable[ModelDemand], nodes: Sequence[NodeCapacity], largest_gpu: int, config: PlannerConfig
) -> GpuMarket:
    """The fleet's single GPUs and the wanted models that fit one of them fully resident (split_worth.py)."""
    free = sum(g.usable_bytes for n in nodes if n.accepts_work for g in n.gpus) + sum(
        max(0, n.gpu_memory_bytes - n.reserved_gpu_bytes) for n in nodes if n.accepts_work and not n.gpus
    )
    others = [m for m in wanted if gpu_bytes_needed(m, 1.0, "stream") <= largest_gpu]
    return GpuMarket(others, free, largest_gpu, config)


def _worth(
    model: ModelDemand, node: NodeCapacity, gpus: tuple[int, ...], market: GpuMarket, rates: RateCache
) -> tuple[Worth, int]:
    """The split on ``gpus`` weighed against their other use, and the single-GPU bytes it takes beyond the
    one GPU its offload would take anyway (where that offload serves anything within SLO)."""
    split = rates.slo_capacity(model, node, gpus)
    alone = rates.slo_capacity(model, node, (node.gpus[0].index,))
    usable = {g.index: g.usable_bytes for g in node.gpus}
    taken = sum(usable[i] for i in gpus) - (usable[gpus[0]] if alone > 0 else 0)
    return market.worth(model, split, alone, taken), sum(usable[i] for i in gpus)


def _unworthy_message(model: ModelDemand, worth: Worth) -> str:
    """Why a split that fits was not made: its GPUs serve more of other models' demand."""
    whose = "other models" if worth.whole_fleet else f"models of priority {model.priority} or above"
    demand = model.demand_decode_tokens_per_second
    asked = "it is idle" if not asks_for_service(model) else f"asked {demand:.1f} tokens/s" if demand else ""
    return (
        f"a split across GPUs would serve {worth.gain:.1f} tokens/s more within its SLO than offloading on "
        f"one GPU{f' ({asked})' if asked else ''}, and its GPUs would leave {worth.displaced:.1f} tokens/s "
        f"of {whose} without room"
    )


def _demand_key(model: ModelDemand) -> float:
    demand = model.demand_decode_tokens_per_second
    return float("inf") if demand is None else demand


class RateCache:
    """:func:`best_rate` of a model on a node's GPU set, computed once per kind of node: identical nodes
    with the same GPUs free give the same answer (a fleet of a hundred 8-GPU nodes asks it thousands of
    times a round)."""

    def __init__(self, predictor: Predictor, config: PlannerConfig) -> None:
        self.predictor, self.config = predictor, config
        self._class: dict[str, tuple[object, ...]] = {}
        self._rates: dict[tuple[object, ...], tuple[float, float] | None] = {}
        self._capacities: dict[tuple[object, ...], float] = {}

    def best_rate(
        self, model: ModelDemand, node: NodeCapacity, gpus: tuple[int, ...]
    ) -> tuple[float, float] | None:
        node_class = self._class.get(node.name)
        if node_class is None:
            node_class = self._class[node.name] = node_class_tuple(node)
        key = (model.name, node_class, gpus)
        if key not in self._rates:
            workspace = model.workspace_bytes if len(gpus) > 1 else 0
            self._rates[key] = best_rate(self.predictor, model, gpu_unit(node, gpus, workspace), self.config)
        return self._rates[key]

    def slo_capacity(self, model: ModelDemand, node: NodeCapacity, gpus: tuple[int, ...]) -> float:
        """:func:`split_worth.slo_capacity` of the model on a node's GPU set (0 where it fits no level)."""
        node_class = self._class.get(node.name)
        if node_class is None:
            node_class = self._class[node.name] = node_class_tuple(node)
        key = (model.name, node_class, gpus)
        if key not in self._capacities:
            unit = gpu_unit(node, gpus, model.workspace_bytes if len(gpus) > 1 else 0)
            levels = fitting_levels(model, unit, self.config)
            self._capacities[key] = slo_capacity(self.predictor, model, unit, levels)
        return self._capacities[key]


def _place_split(
    model: ModelDemand,
    nodes: Sequence[NodeCapacity],
    free: dict[str, set[int]],
    holders: dict[str, dict[int, _Holder]],
    rates: RateCache,
) -> tuple[str, tuple[int, ...]] | None:
    """The node and GPUs of a split that beats the model's best single-GPU offload, or ``None``."""
    best: tuple[tuple[int, float, int, str], str, tuple[int, ...]] | None = None
    need = gpu_bytes_needed(model, 1.0, "stream")
    for node in nodes:
        if not node.accepts_work:
            continue
        if need <= max(g.usable_bytes for g in node.gpus):
            continue  # fits one GPU fully resident: a split only adds hops
        count = split_size(model, node)
        available = free[node.name]
        open_gpus = sorted(i for i in available if i not in holders[node.name])
        movable = sorted(
            (i for i in available if i in holders[node.name] and _yields_to(holders[node.name][i], model)),
            key=lambda i: (holders[node.name][i].priority, i),
        )
        if len(open_gpus) + len(movable) < count:
            continue
        taken = open_gpus[:count]
        displaced = max(0, count - len(taken))
        gpus = tuple(sorted(taken + movable[:displaced]))
        split = rates.best_rate(model, node, gpus)
        if split is None:
            continue
        alone = rates.best_rate(model, node, (node.gpus[0].index,))
        if alone is not None and split[1] < SPLIT_MIN_SPEEDUP * alone[1]:
            continue
        # Fewest placements displaced, then the fastest, then the tightest fit (fewest GPUs left open).
        key = (displaced, -round(split[1], 6), len(open_gpus) - len(taken), node.name)
        if best is None or key < best[0]:
            best = (key, node.name, gpus)
    return None if best is None else (best[1], best[2])


def _yields_to(holder: _Holder, model: ModelDemand) -> bool:
    return holder.preemptible and holder.priority < model.declared_priority and holder.model != model.name


@dataclass(slots=True)
class GpuUnits:
    """A round's planning units and the way back from them to nodes and GPUs."""

    units: list[NodeCapacity]
    current: list[CurrentPlacement]
    unit_gpus: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]
    """Unit name → (node name, GPU indices in pipeline order, each GPU's usable bytes)."""
    too_large: list[Unschedulable]
    staging_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per model, the stream staging buffers a partial split keeps on its last GPU (residency.split)."""
    unseated: dict[str, str] = dataclasses.field(default_factory=dict)
    """Models that only a split holds and that got no GPUs this round → why (the solvers' own reason for
    them would speak of single GPUs)."""


def split_into_units(
    models: Sequence[ModelDemand],
    nodes: Sequence[NodeCapacity],
    current: Sequence[CurrentPlacement],
    predictor: Predictor,
    config: PlannerConfig,
) -> GpuUnits:
    """The planning units of this round, the current placements renamed to them, and the wanted models
    that fit no node at all (``offload.maxFraction`` honoured within one node's GPUs and host memory)."""
    groups, owners, unseated = partition_gpus(models, nodes, current, predictor, config)
    workspace = {m.name: m.workspace_bytes for m in models}
    units: list[NodeCapacity] = []
    unit_gpus: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
    for node in nodes:
        if node.name not in groups:
            units.append(node)
            continue
        usable = {g.index: g.usable_bytes for g in node.gpus}
        for gpus in groups[node.name]:
            owner = owners.get((node.name, gpus)) if len(gpus) > 1 else None
            unit = gpu_unit(node, gpus, workspace.get(owner, 0) if owner else 0)
            if owner is not None:
                unit = dataclasses.replace(unit, reserved_for=frozenset({owner}))
            units.append(unit)
            unit_gpus[unit.name] = (node.name, gpus, tuple(usable[i] for i in gpus))
    units = _shared_reservations(units)
    renamed = [_on_unit(placement, groups) for placement in current]
    too_large = [
        Unschedulable(m.name, "ExceedsNodeCapacity", _too_large_message(m, nodes, config))
        for m in models
        if m.wanted and not any(_fits_node(m, n, config) for n in nodes)
    ]
    staging = {m.name: 2 * m.effective_bytes_per_layer for m in models}
    return GpuUnits(units, renamed, unit_gpus, too_large, staging, unseated)


def _shared_reservations(units: list[NodeCapacity]) -> list[NodeCapacity]:
    """Split GPU sets of the same shape reserved for all of their models together: one node class for all
    of them (a class per split made a fleet of 159 splits plan 30 times slower), and any of those models
    may take any of those sets — each set holds one of them, as it was formed to."""
    owners: dict[tuple[object, ...], set[str]] = {}
    for unit in units:
        if unit.reserved_for:
            owners.setdefault(node_class_tuple(dataclasses.replace(unit, reserved_for=None)), set()).update(
                unit.reserved_for
            )
    if not owners:
        return units
    return [
        dataclasses.replace(
            unit,
            reserved_for=frozenset(owners[node_class_tuple(dataclasses.replace(unit, reserved_for=None))]),
        )
        if unit.reserved_for
        else unit
        for unit in units
    ]


def _on_unit(placement: CurrentPlacement, groups: dict[str, list[tuple[int, ...]]]) -> CurrentPlacement:
    """A current placement on a multi-GPU node, renamed to the unit holding its GPUs (a placement whose GPUs
    were regrouped keeps a name no unit has: the solvers move it, as from a node that went away)."""
    node_groups = groups.get(placement.node)
    if node_groups is None:
        return placement
    gpus = placement.gpus or (0,)
    if placement.state == "preempted":  # cached in the node's host memory: resumes on the unit of its GPU
        unit = next((g for g in node_groups if gpus[0] in g), node_groups[0])
        return dataclasses.replace(placement, node=unit_label(placement.node, unit))
    return dataclasses.replace(placement, node=unit_label(placement.node, gpus))


def _fits_node(model: ModelDemand, node: NodeCapacity, config: PlannerConfig) -> bool:
    unit = node
    if is_multi_gpu(node):
        largest = max(node.gpus, key=lambda g: g.usable_bytes)
        gpus = [g.index for g in node.gpus] if config.allow_gpu_splits else [largest.index]
        unit = gpu_unit(node, gpus, model.workspace_bytes)
    gpu, host = _usable_gpu(unit), usable_host_bytes(node)
    return any(
        gpu_bytes_needed(model, level, "stream") <= gpu and host_bytes_needed(model, level) <= host
        for level in _levels(model, config)
    )


def _too_large_message(model: ModelDemand, nodes: Sequence[NodeCapacity], config: PlannerConfig) -> str:
    largest = max(nodes, key=lambda n: n.gpu_memory_bytes + n.host_memory_bytes, default=None)
    where = (
        f"; the largest node, {largest.name}, has {memory_text(largest.gpu_memory_bytes)} of GPU memory "
        f"over {max(1, len(largest.gpus))} GPU(s) and {memory_text(largest.host_memory_bytes)} of host "
        "memory"
        if largest is not None
        else ""
    )
    splits = "split across the GPUs of one node" if config.allow_gpu_splits else "on one GPU"
    return (
        f"{memory_text(model.weight_bytes)} of weights with at most {model.max_offload_fraction:.0%} "
        f"offloaded fit no node, even {splits} with the rest in its host memory (a model never spans "
        f"nodes){where}"
    )


def shares(resident_fraction: float, usable: Sequence[int]) -> tuple[float, ...]:
    """Each GPU's share of the weight bytes: the resident fraction spread in proportion to the GPUs' memory,
    the last GPU taking the rounding so that the shares sum to it exactly."""
    total = sum(usable) or 1
    parts = [resident_fraction * u / total for u in usable[:-1]]
    return (*parts, max(0.0, resident_fraction - sum(parts)))


def _with_split_reason(refused: Unschedulable, unseated: dict[str, str]) -> Unschedulable:
    """The solvers' reason for a model that only a split holds, told in GPUs (what made room for whom, if
    anything, is kept: ``preempted for higher-priority ns/x (priority 100); ``)."""
    why = unseated.get(refused.model)
    if why is None:
        return refused
    head = refused.message.split("; ", 1)[0] + "; " if refused.message.startswith("preempted for") else ""
    return dataclasses.replace(refused, reason="InsufficientGPUMemory", message=head + why)


def plan_on_nodes(planned: Plan, units: GpuUnits) -> Plan:
    """The solvers' plan over units, told in nodes and GPUs (what the operator writes, the worker runs)."""

    def node_of(name: str | None) -> str | None:
        return units.unit_gpus[name][0] if name in units.unit_gpus else name

    placements: dict[str, PlannedPlacement] = {}
    for name, placement in planned.placements.items():
        found = units.unit_gpus.get(placement.node)
        if found is None:
            placements[name] = placement
            continue
        node_name, gpus, usable = found
        if len(usable) > 1 and placement.resident_fraction < 1.0:
            # the offloaded layers stream through staging buffers on the last GPU (residency.split): it
            # holds that much less of the weights
            staging = units.staging_bytes.get(name, 0)
            usable = (*usable[:-1], max(0, usable[-1] - staging))
        gpu_shares = tuple(
            GpuShare(index, share)
            for index, share in zip(gpus, shares(placement.resident_fraction, usable), strict=True)
        )
        placements[name] = dataclasses.replace(placement, node=node_name, gpus=gpu_shares)
    actions = tuple(
        dataclasses.replace(a, from_node=node_of(a.from_node), to_node=node_of(a.to_node))
        for a in planned.actions
    )
    cached = tuple(CachedModel(c.model, node_of(c.node) or c.node, c.host_bytes) for c in planned.cached)
    splits = sum(1 for p in placements.values() if len(p.gpus) > 1)
    notes = planned.notes + ((f"{splits} model(s) split across GPUs of one node",) if splits else ())
    return dataclasses.replace(
        planned,
        placements=placements,
        actions=actions,
        cached=cached,
        unschedulable=tuple(_with_split_reason(u, units.unseated) for u in planned.unschedulable)
        + tuple(units.too_large),
        notes=notes,
    )
