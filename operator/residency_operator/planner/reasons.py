"""Words for people: why a model could not be placed, and why each action is taken."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from residency.sizing import memory_text
from residency_operator.planner.options import (
    MODES,
    BoolArray,
    ClassTables,
    FloatArray,
    usable_gpu_bytes,
    usable_host_bytes,
)
from residency_operator.planner.types import ModelDemand, NodeCapacity, Unschedulable


def percent(fraction: float) -> str:
    """A fraction as a whole percentage, e.g. ``62%``."""
    return f"{fraction * 100:.0f}%"


def slo_text(model: ModelDemand) -> str:
    """``SLO 20 tok/s`` or ``no SLO``."""
    slo = model.min_decode_tokens_per_second
    return "no SLO" if slo is None else f"SLO {slo:g} tok/s"


class ReasonContext:
    """Per-plan facts about nodes, computed once so that each explanation costs microseconds."""

    def __init__(
        self,
        nodes: Sequence[NodeCapacity],
        class_of_node: Sequence[int],
        free_gpu_bytes: Sequence[int],
        free_host_bytes: Sequence[int],
        free_time: Sequence[float],
    ) -> None:
        self.nodes = nodes
        self.accepting = np.array([i for i, node in enumerate(nodes) if node.accepts_work], dtype=np.intp)
        self.cordoned = sum(1 for n in nodes if n.cordoned or not n.schedulable)
        self.disrupting = sum(1 for n in nodes if n.disrupting)
        self.classes = sorted({class_of_node[i] for i in self.accepting})
        self.free_gpu = np.array(free_gpu_bytes, dtype=np.float64)[self.accepting]
        self.free_host = np.array(free_host_bytes, dtype=np.float64)[self.accepting]
        self.free_time = np.array(free_time, dtype=np.float64)[self.accepting]
        accepting_classes = np.array([class_of_node[i] for i in self.accepting], dtype=np.intp)
        self.accepting_classes = accepting_classes
        """Class of each accepting node (in ``accepting`` order)."""
        self.members = {c: np.flatnonzero(accepting_classes == c) for c in self.classes}
        self.class_max = {
            c: (
                float(self.free_gpu[members].max()),
                float(self.free_host[members].max()),
                float(self.free_time[members].max()),
            )
            for c, members in self.members.items()
        }
        self._gpu_sorted: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.capacity_gpu = max((usable_gpu_bytes(nodes[i]) for i in self.accepting), default=0)
        self.capacity_host = max((usable_host_bytes(nodes[i]) for i in self.accepting), default=0)
        self.closed_models: dict[str, list[str]] = {}
        """The nodes (accepting work) closed to each model (``NodeCapacity.closed_to``)."""
        for i in self.accepting:
            for name in nodes[i].closed_to:
                self.closed_models.setdefault(name, []).append(nodes[i].name)

    def gpu_sorted(self, node_class: int) -> tuple[np.ndarray, np.ndarray]:
        """The class's free GPU bytes in ascending order, and for each position the most free host bytes
        among the nodes from there up (one more entry, -inf, past the end)."""
        cached = self._gpu_sorted.get(node_class)
        if cached is None:
            members = self.members[node_class]
            order = np.argsort(self.free_gpu[members], kind="stable")
            host = self.free_host[members][order]
            host_from_top = np.append(np.maximum.accumulate(host[::-1])[::-1], -np.inf)
            cached = (self.free_gpu[members][order], host_from_top)
            self._gpu_sorted[node_class] = cached
        return cached


def for_slo(model: ModelDemand) -> str:
    """`` for SLO 20 tok/s`` or nothing."""
    return "" if model.min_decode_tokens_per_second is None else f" for {slo_text(model)}"


def unschedulable_reason(
    model_index: int,
    model: ModelDemand,
    context: ReasonContext,
    tables: ClassTables,
    preempted_for: tuple[str, int] | None,
) -> Unschedulable:
    """Explain why a wanted model has no placement, naming the binding resource and the numbers."""
    return unschedulable_reasons([(model_index, model, preempted_for)], context, tables)[0]


def _any(values: BoolArray, axis: int | tuple[int, ...]) -> BoolArray:
    """``values.any(axis)``, typed as an array."""
    return np.asarray(np.any(values, axis=axis), dtype=bool)


REASON_CHUNK = 256
"""Models explained together: their checks against every node are [models x nodes] arrays."""


def unschedulable_reasons(
    cases: Sequence[tuple[int, ModelDemand, tuple[str, int] | None]],
    context: ReasonContext,
    tables: ClassTables,
) -> list[Unschedulable]:
    """:func:`unschedulable_reason` for many models at once (model index, model, who preempted it),
    vectorised over models: each check is one array operation instead of one per model."""
    results: list[Unschedulable] = []
    for start in range(0, len(cases), REASON_CHUNK):
        results.extend(_reasons_chunk(cases[start : start + REASON_CHUNK], context, tables))
    return results


def _reasons_chunk(
    cases: Sequence[tuple[int, ModelDemand, tuple[str, int] | None]],
    context: ReasonContext,
    tables: ClassTables,
) -> list[Unschedulable]:
    if not cases:
        return []
    models = [model for _, model, _ in cases]
    if len(context.accepting) == 0:
        return [
            Unschedulable(
                model.name,
                "NoSchedulableNode",
                f"no node accepts work ({len(context.nodes)} nodes: {context.cordoned} cordoned, "
                f"{context.disrupting} disrupting)",
            )
            for model in models
        ]
    prefixes = [
        ""
        if preempted_for is None
        else f"idle, so it yielded its memory to busy {preempted_for[0]} (priority {preempted_for[1]}); "
        "its next request brings it back; "
        if model.yielded_priority
        else f"preempted for higher-priority {preempted_for[0]} (priority {preempted_for[1]}); "
        if preempted_for[1] > model.priority
        else f"preempted for {preempted_for[0]} (same priority, worth at least twice as much); "
        for _, model, preempted_for in cases
    ]
    indices = np.array([index for index, _, _ in cases], dtype=np.intp)
    classes = np.array(context.classes, dtype=np.intp)
    levels = tables.levels
    level_count = len(levels)
    min_resident = np.array([model.min_resident_fraction for model in models], dtype=np.float64)
    allowed_levels = levels[None, :] >= min_resident[:, None] - 1e-9  # [model, level]
    allowed_modes = np.array(
        [[mode in model.allowed_modes for mode in MODES] for model in models], dtype=bool
    )
    valid: list[bool] = (_any(allowed_modes, 1) & _any(allowed_levels, 1)).tolist()
    # [model, 1, mode, level]
    allowed: BoolArray = allowed_modes[:, None, :, None] & allowed_levels[:, None, None, :]
    rates: FloatArray = tables.decode_tokens_per_second[classes][:, :, indices, :].transpose(2, 0, 1, 3)
    slo = np.array([model.min_decode_tokens_per_second or 0.0 for model in models], dtype=np.float64)
    meets: BoolArray = (rates >= slo[:, None, None, None] - 1e-9) & allowed  # [model, class, mode, level]
    # The options tables judge the SLO with the model's own prefills taking their turn, for every option
    # that fits a node of its class; only one too big for any node is judged on its decode rate alone.
    feasible = tables.feasible[classes][:, :, indices, :].transpose(2, 0, 1, 3)
    class_gpu = np.array([usable_gpu_bytes(tables.classes[c]) for c in context.classes], dtype=np.float64)
    class_host = np.array([usable_host_bytes(tables.classes[c]) for c in context.classes], dtype=np.float64)
    footprint_gpu = tables.gpu_bytes[:, indices, :].transpose(1, 0, 2)[
        :, None, :, :
    ]  # [model, 1, mode, level]
    footprint_host = tables.host_bytes[indices][:, None, None, :]
    too_big = (footprint_gpu > class_gpu[None, :, None, None]) | (
        footprint_host > class_host[None, :, None, None]
    )
    meets &= feasible | too_big
    class_meets = _any(meets, (2, 3))  # [model, class position]
    meets_any: list[bool] = _any(class_meets, 1).tolist()
    best_rates: list[float] = np.where(allowed, rates, 0.0).max(axis=(1, 2, 3)).tolist()
    best_positions: list[int] = (
        np.argmax(rates[:, :, :, -1].reshape(len(models), -1), axis=1) // len(MODES)
    ).tolist()
    # Per class, the smallest GPU footprint that meets the SLO.
    gpu = tables.gpu_bytes[:, indices, :].transpose(1, 0, 2)  # [model, mode, level]
    gpu_needed = np.where(meets, gpu[:, None, :, :], np.inf).reshape(len(models), len(classes), -1)
    flat_choice = np.argmin(gpu_needed, axis=2)  # [model, class position]
    need_mode, need_level = flat_choice // level_count, flat_choice % level_count
    need_gpu = np.take_along_axis(gpu_needed, flat_choice[:, :, None], axis=2)[:, :, 0]
    need_host = tables.host_bytes[indices[:, None], need_level]
    need_busy = tables.busy_fraction[classes[None, :], need_mode, indices[:, None], need_level]
    # Per class, the least GPU time an SLO-meeting option takes (a fuller residency may take less).
    busy = tables.busy_fraction[classes][:, :, indices, :].transpose(2, 0, 1, 3)
    least_busy = np.where(meets, busy, np.inf).min(axis=(2, 3))  # [model, class position]
    # Whether some node of the class has room for that footprint (then loading was merely deferred).
    room = np.zeros(class_meets.shape, dtype=bool)
    for position, node_class in enumerate(context.classes):
        members = context.members[node_class]
        most_gpu, most_host, most_time = context.class_max[node_class]
        gpu_c, host_c, busy_c = need_gpu[:, position], need_host[:, position], need_busy[:, position]
        plausible = (gpu_c <= most_gpu) & (host_c <= most_host) & (busy_c <= most_time + 1e-9)
        if not plausible.any():
            continue
        room[:, position] = plausible & (
            (context.free_gpu[members][None, :] >= gpu_c[:, None])
            & (context.free_host[members][None, :] >= host_c[:, None])
            & (context.free_time[members][None, :] >= busy_c[:, None] - 1e-9)
        ).any(axis=1)
    room &= class_meets
    deferred: list[bool] = _any(room, 1).tolist()
    deferred_position = np.argmax(room, axis=1).tolist()
    smallest = np.argmin(np.where(class_meets, need_gpu, np.inf), axis=1)
    rows = np.arange(len(models))
    smallest_gpu = need_gpu[rows, smallest]
    smallest_host = need_host[rows, smallest]
    # Over the nodes of every class where the SLO is reachable: the most free GPU memory, and the most
    # free host memory beside enough GPU memory for the smallest footprint (per class, from its nodes
    # sorted by free GPU memory with the running maximum of free host memory from the top).
    largest_gpu_by_class = np.full(class_meets.shape, -np.inf)
    largest_host_by_class = np.full(class_meets.shape, -np.inf)
    for position, node_class in enumerate(context.classes):
        sorted_gpu, host_from_top = context.gpu_sorted(node_class)
        largest_gpu_by_class[:, position] = sorted_gpu[-1]
        largest_host_by_class[:, position] = host_from_top[np.searchsorted(sorted_gpu, smallest_gpu)]
    largest_gpu_array = np.where(class_meets, largest_gpu_by_class, -np.inf).max(axis=1)
    largest_host_array = np.where(class_meets, largest_host_by_class, -np.inf).max(axis=1)
    any_fits_gpu = (largest_gpu_array >= smallest_gpu).tolist()
    any_fits_host = (largest_host_array >= smallest_host).tolist()
    largest_gpu, largest_host = largest_gpu_array.tolist(), largest_host_array.tolist()
    # The most idle node of the smallest footprint's class with memory for it.
    idle = np.zeros(len(models))
    room_in_class = np.zeros(len(models), dtype=bool)
    largest_in_class = np.zeros(len(models))
    for position, node_class in enumerate(context.classes):
        rows = np.flatnonzero(smallest == position)
        if not len(rows):
            continue
        members = context.members[node_class]
        with_room = (context.free_gpu[members][None, :] >= smallest_gpu[rows, None]) & (
            context.free_host[members][None, :] >= smallest_host[rows, None]
        )
        most = np.where(with_room, context.free_time[members][None, :], -np.inf).max(axis=1)
        idle[rows] = np.where(with_room.any(axis=1), np.maximum(0.0, most), 0.0)
        room_in_class[rows] = with_room.any(axis=1)
        largest_in_class[rows] = context.free_gpu[members].max() if len(members) else 0.0
    idle_share = idle.tolist()
    room_in_class_list, largest_in_class_list = room_in_class.tolist(), largest_in_class.tolist()
    need_gpu_list, need_host_list = need_gpu.tolist(), need_host.tolist()
    least_busy_list = least_busy.tolist()
    need_fraction_list = levels[need_level].tolist()
    smallest_list = smallest.tolist()

    results: list[Unschedulable] = []
    for k, model in enumerate(models):
        prefix = prefixes[k]
        if not valid[k]:
            results.append(
                Unschedulable(
                    model.name, "InvalidOffloadSettings", prefix + "no execution mode or residency allowed"
                )
            )
            continue
        if model.name in context.closed_models:
            nodes = ", ".join(context.closed_models[model.name])
            results.append(
                Unschedulable(
                    model.name,
                    "HeldForPinnedModel",
                    prefix + f"the room on {nodes} is kept for an idle preemptible: false model of a higher "
                    "priority, its copy in host memory there: placed, this pinned model could never give it "
                    "back; no other node took it",
                )
            )
            continue
        if not meets_any[k]:
            gpu_type = tables.classes[context.classes[best_positions[k]]].gpu_type
            why = f"best predicted is {best_rates[k]:.1f} tok/s at 100% resident on {gpu_type}"
            if best_rates[k] >= slo[k] - 1e-9:
                # fast enough to decode, but its own prefills take too much of the GPU's time
                why = (
                    f"prefilling its {model.prompt_tokens_per_second or 0:.0f} prompt tok/s leaves less than "
                    f"that for decoding on every GPU (decoding alone: {best_rates[k]:.1f} tok/s on "
                    f"{gpu_type})"
                )
            results.append(
                Unschedulable(model.name, "SLOUnreachable", prefix + f"{slo_text(model)} unreachable: {why}")
            )
            continue
        if deferred[k]:
            position = deferred_position[k]
            gpu_type = tables.classes[context.classes[position]].gpu_type
            results.append(
                Unschedulable(
                    model.name,
                    "Deferred",
                    prefix + f"{memory_text(need_gpu_list[k][position])} would fit on a free {gpu_type}, "
                    "but loading it now costs more than it would serve over the planning horizon",
                )
            )
            continue
        position = smallest_list[k]
        gpu_needed_k, host_needed_k = need_gpu_list[k][position], need_host_list[k][position]
        fraction = need_fraction_list[k][position]
        if gpu_needed_k > context.capacity_gpu:
            results.append(
                Unschedulable(
                    model.name,
                    "InsufficientGPUMemory",
                    prefix + f"needs {memory_text(gpu_needed_k)} on the GPU ({percent(fraction)} resident)"
                    f"{for_slo(model)}; the largest node has {memory_text(context.capacity_gpu)}",
                )
            )
        elif host_needed_k > context.capacity_host:
            results.append(
                Unschedulable(
                    model.name,
                    "InsufficientHostMemory",
                    prefix + f"needs {memory_text(host_needed_k)} of host memory for offloaded weights; "
                    f"the largest node has {memory_text(context.capacity_host)}",
                )
            )
        elif not any_fits_gpu[k]:
            results.append(
                Unschedulable(
                    model.name,
                    "InsufficientGPUMemory",
                    prefix + f"needs {memory_text(gpu_needed_k)} resident{for_slo(model)}; "
                    f"largest free is {memory_text(largest_gpu[k])}",
                )
            )
        elif not any_fits_host[k]:
            results.append(
                Unschedulable(
                    model.name,
                    "InsufficientHostMemory",
                    prefix + f"needs {memory_text(host_needed_k)} of host memory for offloaded weights "
                    f"at {percent(fraction)} resident; largest free beside enough GPU memory is "
                    f"{memory_text(largest_host[k])}",
                )
            )
        elif not room_in_class_list[k]:
            # its cheapest way to meet the SLO is on a kind of GPU none of which has that much free (other
            # kinds have the memory but cannot meet the SLO with it)
            gpu_type = tables.classes[context.classes[position]].gpu_type
            results.append(
                Unschedulable(
                    model.name,
                    "InsufficientGPUMemory",
                    prefix + f"needs {memory_text(gpu_needed_k)} resident{for_slo(model)} on an {gpu_type} "
                    f"({percent(fraction)} resident); the {gpu_type} with the most free has "
                    f"{memory_text(largest_in_class_list[k])}",
                )
            )
        else:
            demand = model.demand_decode_tokens_per_second
            gpu_type = tables.classes[context.classes[position]].gpu_type
            wanted = (
                "its full batch (demand not measured yet)"
                if demand is None
                else f"{demand:.0f} tok/s of demand"
            )
            results.append(
                Unschedulable(
                    model.name,
                    "InsufficientGPUTime",
                    prefix + f"needs {percent(least_busy_list[k][position])} of an {gpu_type}'s time for "
                    f"{wanted}; the most idle {gpu_type} with memory for it has "
                    f"{percent(idle_share[k])} left",
                )
            )
    return results
