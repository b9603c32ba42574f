"""Words for people: why a model could not be placed, and why each action is taken."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from residency_operator.planner.options import MODES, ClassTables, usable_gpu_bytes, usable_host_bytes
from residency_operator.planner.types import GIB, ModelDemand, NodeCapacity, Unschedulable


def gib(value_bytes: float) -> str:
    """Bytes as GiB with one decimal, e.g. ``17.2 GiB``."""
    return f"{value_bytes / GIB:.1f} GiB"


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
        self.members = {c: np.flatnonzero(accepting_classes == c) for c in self.classes}
        self.class_max = {
            c: (
                float(self.free_gpu[members].max()),
                float(self.free_host[members].max()),
                float(self.free_time[members].max()),
            )
            for c, members in self.members.items()
        }
        self.capacity_gpu = max((usable_gpu_bytes(nodes[i]) for i in self.accepting), default=0)
        self.capacity_host = max((usable_host_bytes(nodes[i]) for i in self.accepting), default=0)


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
    if len(context.accepting) == 0:
        return Unschedulable(
            model.name,
            "NoSchedulableNode",
            f"no node accepts work ({len(context.nodes)} nodes: {context.cordoned} cordoned, "
            f"{context.disrupting} disrupting)",
        )
    prefix = ""
    if preempted_for is not None:
        prefix = f"preempted for higher-priority {preempted_for[0]} (priority {preempted_for[1]}); "
    classes = context.classes
    levels = tables.levels
    allowed_levels = levels >= model.min_resident_fraction - 1e-9
    allowed_modes = np.array([mode in model.allowed_modes for mode in MODES])
    if not allowed_modes.any() or not allowed_levels.any():
        return Unschedulable(
            model.name, "InvalidOffloadSettings", prefix + "no execution mode or residency allowed"
        )
    rates = tables.decode_tokens_per_second[:, :, model_index, :][classes]
    slo = model.min_decode_tokens_per_second or 0.0
    meets = (rates >= slo - 1e-9) & allowed_levels[None, None, :] & allowed_modes[None, :, None]
    if not meets.any():
        best_rate = float(
            np.where(allowed_levels[None, None, :] & allowed_modes[None, :, None], rates, 0.0).max()
        )
        best_class = classes[int(np.unravel_index(np.argmax(rates[:, :, -1]), rates[:, :, -1].shape)[0])]
        gpu_type = tables.classes[best_class].gpu_type
        return Unschedulable(
            model.name,
            "SLOUnreachable",
            prefix + f"{slo_text(model)} unreachable: best predicted is {best_rate:.1f} tok/s "
            f"at 100% resident on {gpu_type}",
        )
    # Per node class, the smallest footprint that meets the SLO, and whether any node of it has room.
    smallest_need: tuple[float, float, float, float, int] | None = None  # gpu, host, busy, fraction, class
    candidates: list[np.ndarray] = []
    for position, node_class in enumerate(classes):
        class_meets = meets[position]
        if not class_meets.any():
            continue
        candidates.append(context.members[node_class])
        gpu_needed = np.where(class_meets, tables.gpu_bytes[:, model_index, :], np.inf)
        mode_index, level_index = np.unravel_index(np.argmin(gpu_needed), gpu_needed.shape)
        need = (
            float(gpu_needed[mode_index, level_index]),
            float(tables.host_bytes[model_index, level_index]),
            float(tables.busy_fraction[node_class, mode_index, model_index, level_index]),
            float(levels[level_index]),
            node_class,
        )
        members = context.members[node_class]
        most_gpu, most_host, most_time = context.class_max[node_class]
        plausible = need[0] <= most_gpu and need[1] <= most_host and need[2] <= most_time + 1e-9
        if (
            plausible
            and (
                (context.free_gpu[members] >= need[0])
                & (context.free_host[members] >= need[1])
                & (context.free_time[members] >= need[2] - 1e-9)
            ).any()
        ):
            return Unschedulable(
                model.name,
                "Deferred",
                prefix
                + f"{gib(need[0])} would fit on a free {tables.classes[node_class].gpu_type}, but loading "
                "it now costs more than it would serve over the planning horizon",
            )
        if smallest_need is None or need[0] < smallest_need[0]:
            smallest_need = need
    assert smallest_need is not None
    need_gpu, need_host, need_busy, need_fraction, need_class = smallest_need
    if need_gpu > context.capacity_gpu:
        return Unschedulable(
            model.name,
            "InsufficientGPUMemory",
            prefix + f"needs {gib(need_gpu)} on the GPU ({percent(need_fraction)} resident){for_slo(model)}; "
            f"the largest node has {gib(context.capacity_gpu)}",
        )
    if need_host > context.capacity_host:
        return Unschedulable(
            model.name,
            "InsufficientHostMemory",
            prefix + f"needs {gib(need_host)} of host memory for offloaded weights; "
            f"the largest node has {gib(context.capacity_host)}",
        )
    # Only nodes of a type where the SLO is reachable at all are worth naming.
    usable = np.concatenate(candidates)
    free_gpu, free_host = context.free_gpu[usable], context.free_host[usable]
    fits_gpu = free_gpu >= need_gpu
    if not fits_gpu.any():
        return Unschedulable(
            model.name,
            "InsufficientGPUMemory",
            prefix + f"needs {gib(need_gpu)} resident{for_slo(model)}; "
            f"largest free is {gib(float(free_gpu.max()))}",
        )
    fits_host = fits_gpu & (free_host >= need_host)
    if not fits_host.any():
        return Unschedulable(
            model.name,
            "InsufficientHostMemory",
            prefix + f"needs {gib(need_host)} of host memory for offloaded weights "
            f"at {percent(need_fraction)} resident; largest free beside enough GPU memory is "
            f"{gib(float(free_host[fits_gpu].max()))}",
        )
    demand = model.demand_decode_tokens_per_second or 0.0
    members = context.members[need_class]
    with_room = members[(context.free_gpu[members] >= need_gpu) & (context.free_host[members] >= need_host)]
    gpu_type = tables.classes[need_class].gpu_type
    idle_share = max(0.0, float(context.free_time[with_room].max())) if len(with_room) else 0.0
    return Unschedulable(
        model.name,
        "InsufficientGPUTime",
        prefix + f"needs {percent(need_busy)} of an {gpu_type}'s time for {demand:.0f} tok/s of demand; "
        f"the most idle {gpu_type} with memory for it has {percent(idle_share)} left",
    )
