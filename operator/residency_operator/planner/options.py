"""Candidate placements of each model: memory footprint, predicted rate and value per residency level.

Nodes with identical hardware form a *class*; predictions depend only on the class, so they are computed
once per (class, mode) for all models and levels at the same time with numpy. That is what lets the
greedy plan ten thousand models on a thousand nodes in well under a second.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from residency.sizing import resident_units, staging_bytes
from residency_operator.planner.costs import (
    ZERO_COST,
    TransitionCost,
    amortised_cost_tokens_per_second,
    demote_cost,
    load_cost,
    migrate_cost,
    promote_cost,
    reconfigure_cost,
    resume_cost,
)
from residency_operator.planner.predictor import PREFILL_COMPUTE_EFFICIENCY, Predictor, offload_gbps
from residency_operator.planner.types import (
    GB,
    GIB,
    ActionKind,
    CurrentPlacement,
    ExecutionMode,
    ModelDemand,
    NodeCapacity,
    PlannerConfig,
)
from residency_operator.planner.value import (
    excess_value,
    gpu_busy_fraction,
    meets_slo_with_prefill,
    prefill_share,
    served_values,
    sharing_tolerance,
    time_capacity,
)

MODES: tuple[ExecutionMode, ...] = ("stream", "cpu")
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

LEVEL_EPSILON = 1e-9


@functools.lru_cache(maxsize=65536)
def _exact_weights(
    unit_bytes: tuple[int, ...], layers: int, resident_fraction: float, min_fraction: float
) -> tuple[int, int]:
    """(resident weight bytes, staging bytes) of the engine's choice of units (``sizing.resident_units``):
    a placement that streams anything (a layer or the head; an untied embedding is looked up where it lives)
    stages its largest streamed piece twice; the head streams in chunks no bigger than a layer, so a layer
    bounds the largest piece (exact unless the head alone streams). One cache entry per shape and level."""
    chosen, resident = resident_units(unit_bytes, resident_fraction, min_fraction)
    streamed = set(range(1 + layers)) - chosen  # an untied embedding (the last unit) is never streamed
    if not streamed:
        return resident, 0
    return resident, staging_bytes(max(unit_bytes[1 : 1 + layers], default=0))


@functools.lru_cache(maxsize=4096)
def _exact_rows(
    unit_bytes: tuple[int, ...], layers: int, min_fraction: float, levels: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`_exact_weights` at every level: (resident bytes, staging bytes) rows of one model shape."""
    layers = layers or max(0, len(unit_bytes) - 2)
    pairs = [_exact_weights(unit_bytes, layers, level, min_fraction) for level in levels]
    return tuple(float(p[0]) for p in pairs), tuple(float(p[1]) for p in pairs)


def exact_weights(model: ModelDemand, resident_fraction: float) -> tuple[int, int]:
    """(resident weight bytes, staging bytes) the worker will hold; needs ``model.unit_bytes``."""
    layers = model.layer_count or max(0, len(model.unit_bytes) - 2)
    return _exact_weights(model.unit_bytes, layers, resident_fraction, model.min_resident_fraction)


def resident_weight_bytes(model: ModelDemand, resident_fraction: float) -> int:
    """Weight bytes a placement keeps on the GPU: exactly the engine's whole units when the model's unit
    sizes are known, else the fraction of its weights."""
    if model.unit_bytes:
        return exact_weights(model, resident_fraction)[0]
    return round(resident_fraction * model.weight_bytes)


def gpu_bytes_needed(model: ModelDemand, resident_fraction: float, mode: ExecutionMode) -> int:
    """GPU bytes a placement takes: resident weights + KV reservation + workspace (+ stream buffers); the
    same in both modes (``mode`` is kept for the callers, which index options by mode).

    With the model's unit sizes the resident weights and staging buffers are the engine's own. Without,
    a partial placement also counts one more unit (layer): the engine keeps whole units resident, as close
    to the fraction as they allow, so it may hold up to one unit more than the fraction says.
    """
    if model.unit_bytes:
        resident_bytes, staging = exact_weights(model, resident_fraction)
        return resident_bytes + model.kv_reservation_bytes + model.workspace_bytes + staging
    resident_bytes = round(resident_fraction * model.weight_bytes)
    partial = resident_fraction < 1.0
    # Streaming needs a double buffer of one layer so the next layer's copy overlaps this one's compute;
    # both modes stream for prefill (see ``ExecutionMode``), so both hold it.
    stream_buffer_bytes = 2 * model.effective_bytes_per_layer if partial else 0
    granularity_bytes = model.effective_bytes_per_layer if partial else 0
    return (
        resident_bytes
        + model.kv_reservation_bytes
        + model.workspace_bytes
        + stream_buffer_bytes
        + granularity_bytes
    )


def host_bytes_needed(model: ModelDemand, resident_fraction: float) -> int:
    """Pinned host bytes a running placement takes: the offloaded weights."""
    return model.weight_bytes - resident_weight_bytes(model, resident_fraction)


def cached_host_bytes(model: ModelDemand, kv_cache_bytes: int) -> int:
    """Host bytes a preempted model keeps pinned for a fast resume: all weights plus its saved KV."""
    return model.weight_bytes + kv_cache_bytes


def unserved_tokens_per_second(
    model: ModelDemand, decode_tokens_per_second: float, config: PlannerConfig
) -> float:
    """How much of a running model's demand (with its headroom) a full batch at this per-sequence decode rate
    cannot serve: > 0 where the demand outgrew the placement (0 for an unknown demand)."""
    demand = model.demand_decode_tokens_per_second
    if demand is None:
        return 0.0
    return config.demand_headroom * demand - decode_tokens_per_second * max(1, model.max_batch)


def with_host_set_aside(
    nodes: Sequence[NodeCapacity], bytes_by_node: Mapping[str, int]
) -> list[NodeCapacity]:
    """The nodes with host memory set aside for what the plan does not place: the cached weights of models
    scaled to zero by ``spec.idle``, which their workers keep pinned until the next request."""
    return [
        dataclasses.replace(n, reserved_host_bytes=n.reserved_host_bytes + bytes_by_node[n.name])
        if bytes_by_node.get(n.name)
        else n
        for n in nodes
    ]


def usable_gpu_bytes(node: NodeCapacity) -> int:
    """GPU bytes the planner may fill on this node."""
    return max(0, node.gpu_memory_bytes - node.reserved_gpu_bytes)


def usable_host_bytes(node: NodeCapacity) -> int:
    """Host bytes the planner may fill on this node."""
    return max(0, node.host_memory_bytes - node.reserved_host_bytes)


def node_class_key(node: NodeCapacity) -> NodeCapacity:
    """Everything about a node that predictions and capacity depend on (the node minus its identity)."""
    return dataclasses.replace(
        node, name="", schedulable=True, cordoned=False, disrupting=False, machine=None
    )


_IDENTITY_FIELDS = frozenset({"name", "schedulable", "cordoned", "disrupting", "machine"})
_CLASS_FIELDS = tuple(f.name for f in dataclasses.fields(NodeCapacity) if f.name not in _IDENTITY_FIELDS)


def node_class_tuple(node: NodeCapacity) -> tuple[object, ...]:
    """The fields of :func:`node_class_key` as a plain tuple: a cheap key for grouping nodes by class."""
    return tuple(getattr(node, name) for name in _CLASS_FIELDS)


@dataclass(frozen=True, slots=True)
class OptionEval:
    """One (model, node, resident fraction, mode) candidate, fully evaluated."""

    resident_fraction: float
    mode: ExecutionMode
    gpu_bytes: int
    host_bytes: int
    decode_tokens_per_second: float
    throughput_tokens_per_second: float
    busy_fraction: float
    tolerance: float
    """Share of the GPU's time other models may take before this placement misses its SLO."""
    primary_value: float
    value: float
    meets_slo: bool
    allowed: bool
    """Within ``offload.maxFraction`` and an allowed execution mode."""


def evaluate_option(
    predictor: Predictor,
    model: ModelDemand,
    node: NodeCapacity,
    resident_fraction: float,
    mode: ExecutionMode,
    config: PlannerConfig,
) -> OptionEval:
    """Evaluate one candidate with the scalar predictor (profiles included)."""
    rate = predictor.decode_tokens_per_second(model, node, resident_fraction, mode)
    throughput = rate * model.max_batch
    gpu = gpu_bytes_needed(model, resident_fraction, mode)
    slo = model.min_decode_tokens_per_second
    demand = model.demand_decode_tokens_per_second
    prefill = 0.0
    if model.prompt_tokens_per_second:
        prefill = float(
            prefill_share(
                model.prompt_tokens_per_second,
                predictor.prefill_tokens_per_second(
                    model, node, resident_fraction, mode, model.effective_prompt_tokens
                ),
            )
        )
    needed_time = (
        float(
            gpu_busy_fraction(
                np.inf if demand is None else demand,
                predictor.decode_step_seconds(model, node, resident_fraction, mode, 1),
                predictor.decode_step_seconds(model, node, resident_fraction, mode),
                float(max(1, model.max_batch)),
                np.inf,
                model.min_decode_tokens_per_second or 0.0,
            )
        )
        + prefill
    )
    busy = min(config.max_gpu_busy_fraction, needed_time)
    tolerance = float(sharing_tolerance(rate, model.min_decode_tokens_per_second, prefill))
    primary, full = served_values(
        model,
        throughput,
        gpu,
        max(busy, 1.0 - tolerance),
        config,
        host_bytes_needed(model, resident_fraction),
        float(time_capacity(np.inf if demand is None else demand, needed_time, config.max_gpu_busy_fraction)),
    )
    return OptionEval(
        resident_fraction=resident_fraction,
        mode=mode,
        gpu_bytes=gpu,
        host_bytes=host_bytes_needed(model, resident_fraction),
        decode_tokens_per_second=rate,
        throughput_tokens_per_second=throughput,
        busy_fraction=busy,
        tolerance=tolerance,
        primary_value=primary,
        value=full,
        meets_slo=slo is None or bool(meets_slo_with_prefill(rate, slo, prefill)),
        allowed=resident_fraction >= model.min_resident_fraction - LEVEL_EPSILON
        and mode in model.allowed_modes,
    )


def transition(
    model: ModelDemand,
    current: CurrentPlacement | None,
    nodes: dict[str, NodeCapacity],
    node: NodeCapacity,
    resident_fraction: float,
    mode: ExecutionMode,
) -> tuple[ActionKind | None, TransitionCost]:
    """The action (or none) and its cost to go from ``current`` to running on ``node`` at the given level."""
    if current is None or current.node not in nodes:
        return "load", load_cost(model, node, resident_fraction)
    if current.state == "preempted":
        machine = nodes[current.node].machine
        if current.node == node.name or (machine is not None and machine == node.machine):
            return "resume", resume_cost(model, node, resident_fraction, current.kv_cache_bytes)
        return "load", load_cost(model, node, resident_fraction)
    if current.node != node.name:
        return "migrate", migrate_cost(
            model, nodes[current.node], node, resident_fraction, current.kv_cache_bytes
        )
    same_level = abs(current.resident_fraction - resident_fraction) <= LEVEL_EPSILON
    if same_level and current.mode == mode:
        return None, ZERO_COST
    extra = reconfigure_cost() if current.mode != mode else ZERO_COST
    if same_level:
        return "reconfigure", extra
    if resident_fraction > current.resident_fraction:
        return "promote", promote_cost(model, node, current.resident_fraction, resident_fraction) + extra
    return "demote", demote_cost(model, node, current.resident_fraction, resident_fraction) + extra


def option_score(
    option_value: float,
    cost: TransitionCost,
    is_incumbent: bool,
    config: PlannerConfig,
) -> float:
    """Objective contribution of choosing an option: value - amortised transition (+ hysteresis bonus)."""
    score = option_value - amortised_cost_tokens_per_second(
        cost, option_value, config.amortisation_horizon_seconds
    )
    if is_incumbent:
        score += config.hysteresis_fraction * abs(option_value)
    return score


@dataclass(slots=True)
class ClassTables:
    """Per node class and mode, for every model and every configured level: rates, bytes and values.

    Arrays are indexed ``[class, mode, model, level]`` (``gpu_bytes``: ``[mode, model, level]``).
    """

    levels: FloatArray
    classes: list[NodeCapacity]
    decode_tokens_per_second: FloatArray
    busy_fraction: FloatArray
    """Share of the GPU's time the model's demand keeps it busy (see :func:`gpu_busy_fraction`)."""
    tolerance: FloatArray
    """Share of the GPU's time others may take before the SLO breaks (see :func:`sharing_tolerance`)."""
    primary_value: FloatArray
    """Availability + throughput up to demand - memory tie-break (priorities compare this)."""
    value: FloatArray
    """Primary + a little for throughput beyond demand."""
    load_seconds: FloatArray
    """Cold-load seconds ``[class, model, level]``."""
    gpu_bytes: FloatArray
    host_bytes: FloatArray
    """``[model, level]``."""
    feasible: BoolArray
    """Allowed, meets the SLO, and fits an empty node of the class."""


def _model_row(m: ModelDemand) -> tuple[float, ...]:
    """What the option tables need of one model, as numbers, in one pass over its fields.

    The properties of :class:`ModelDemand` are inlined here: ten thousand models make this a hot loop.
    Same values as ``typical_sequence_tokens``, ``kv_reservation_bytes``, ``effective_bytes_per_layer``
    and ``min_resident_fraction`` (a unit test checks).
    """
    batch = m.max_batch if m.max_batch > 1 else 1
    typical = m.typical_sequence_length
    max_tokens = m.max_sequence_length
    sequence = max(1, min(typical, max_tokens) if typical is not None else max_tokens // 2)
    weight = m.weight_bytes
    per_layer = m.bytes_per_layer
    if not per_layer:
        layers = m.layer_count if m.layer_count is not None and m.layer_count > 0 else 32
        per_layer = max(1, weight // layers)
    demand = m.demand_decode_tokens_per_second
    modes = m.allowed_modes
    return (
        weight,
        m.kv_bytes_per_token * sequence * batch,
        batch,
        m.min_decode_tokens_per_second or 0.0,
        np.inf if demand is None else demand,
        max(0.0, 1.0 - m.max_offload_fraction),
        m.kv_bytes_per_token * max_tokens * m.max_batch + m.workspace_bytes,
        2 * per_layer,
        m.storage_read_gbps or 0.0,
        1.0 if "stream" in modes else 0.0,
        1.0 if "cpu" in modes else 0.0,
        m.parameter_count if m.parameter_count else weight // 2,
        m.prompt_tokens_per_second or 0.0,
        m.effective_prompt_tokens if m.prompt_tokens_per_second else 1,
    )


def _prefill_shares(
    models: Sequence[ModelDemand],
    indices: list[int],
    node: NodeCapacity,
    mode: ExecutionMode,
    levels: FloatArray,
    predictor: Predictor,
    profiled_models: frozenset[str],
    weight: FloatArray,
    parameters: FloatArray,
    prompt_rate: FloatArray,
    prompt_tokens: FloatArray,
) -> FloatArray:
    """``[model, level]``: share of the GPU's time each model's prefills take on ``node`` in ``mode``; the
    roofline of :func:`~residency_operator.planner.predictor.roofline_prefill_seconds`, vectorised."""
    shares = np.zeros((len(models), len(levels)))
    rows = np.array(indices, dtype=np.intp)
    resident = levels[None, :]
    offloaded = 1.0 - resident
    flops = 2.0 * parameters[rows, None] * prompt_tokens[rows, None]
    gpu_flops = node.gpu_tflops * 1e12 * PREFILL_COMPUTE_EFFICIENCY
    resident_seconds = np.maximum(
        resident * weight[rows, None] / (node.hbm_gbps * GB), resident * flops / gpu_flops
    )
    offloaded_seconds = np.maximum(
        offloaded * weight[rows, None] / (offload_gbps(node, "stream") * GB), offloaded * flops / gpu_flops
    )
    prefill_rate = (
        prompt_tokens[rows, None]
        * max(1e-6, node.calibration_factor)
        / (resident_seconds + offloaded_seconds)
    )
    for position, i in enumerate(indices):
        if models[i].name in profiled_models:
            prefill_rate[position] = [
                predictor.prefill_tokens_per_second(
                    models[i], node, float(level), mode, models[i].effective_prompt_tokens
                )
                for level in levels
            ]
    shares[rows] = prefill_share(prompt_rate[rows, None], prefill_rate)
    return shares


def build_class_tables(
    models: Sequence[ModelDemand],
    classes: Sequence[NodeCapacity],
    predictor: Predictor,
    config: PlannerConfig,
    profiled_models: frozenset[str],
) -> ClassTables:
    """Evaluate every model at every configured level on every node class, vectorised over models."""
    levels = np.array(sorted(set(config.residency_levels) | {1.0}), dtype=np.float64)
    model_count, level_count, class_count = len(models), len(levels), len(classes)
    columns = np.array([_model_row(m) for m in models], dtype=np.float64).reshape(model_count, 14).T
    weight, kv_per_step, batch, slo, demand, min_resident, base_gpu, stream_buffer, storage_gbps = columns[:9]
    mode_allowed = columns[9:11] > 0.5
    parameters, prompt_rate, prompt_tokens = columns[11:14]
    with_prompts = [i for i, m in enumerate(models) if m.prompt_tokens_per_second]
    layers = np.array([m.effective_layer_count for m in models], dtype=np.float64)

    resident = np.rint(levels[None, :] * weight[:, None])
    offloaded = weight[:, None] - resident
    partial = (levels < 1.0)[None, :]
    # A partial placement: two staging buffers (both modes stream for prefill) and one unit of granularity;
    # the same in both modes (``gpu_bytes_needed``), one row per mode for the solvers' indexing. A model
    # whose unit sizes are known holds exactly the engine's units and staging instead (``exact_weights``).
    held = resident.copy()
    staging = np.where(partial, 1.5 * stream_buffer[:, None], 0.0)
    level_tuple = tuple(float(level) for level in levels)
    for i, m in enumerate(models):
        if m.unit_bytes:
            held[i], staging[i] = _exact_rows(
                m.unit_bytes, m.layer_count or 0, m.min_resident_fraction, level_tuple
            )
    host_bytes = weight[:, None] - held
    partial_bytes = held + base_gpu[:, None] + staging
    gpu_bytes = np.stack([partial_bytes] * len(MODES))
    level_allowed = levels[None, :] >= min_resident[:, None] - LEVEL_EPSILON

    rate = np.zeros((class_count, len(MODES), model_count, level_count))
    busy = np.zeros((class_count, len(MODES), model_count, level_count))
    needed_time = np.zeros((class_count, len(MODES), model_count, level_count))
    prefill = np.zeros((class_count, len(MODES), model_count, level_count))
    kv_per_sequence = kv_per_step / batch
    load_seconds = np.zeros((class_count, model_count, level_count))
    feasible = np.zeros((class_count, len(MODES), model_count, level_count), dtype=bool)
    profiled_indices = [i for i, m in enumerate(models) if m.name in profiled_models]
    split_models = frozenset().union(*(n.reserved_for for n in classes if n.reserved_for))
    splits = np.array([m.name in split_models for m in models]) if split_models else None
    observed_indices = [
        i for i, m in enumerate(models) if m.observed is not None and m.name not in profiled_models
    ]
    for c, node in enumerate(classes):
        gpu_capacity = usable_gpu_bytes(node)
        host_capacity = usable_host_bytes(node)
        calibration = max(1e-6, node.calibration_factor)
        node_storage = np.where(storage_gbps > 0, storage_gbps, node.storage_read_gbps)
        load_seconds[c] = (
            weight[:, None] / (node_storage[:, None] * GB)
            + resident / (node.host_to_device_gbps * GB)
            + node.load_overhead_seconds
        )
        for k, mode in enumerate(MODES):
            step_seconds = (resident + kv_per_step[:, None]) / (node.hbm_gbps * GB) + offloaded / (
                offload_gbps(node, mode) * GB
            )
            if node.pipeline_hop_seconds:  # a split's GPU set (planner/gpus.py)
                step_seconds = step_seconds + node.pipeline_hop_seconds
            rate[c, k] = calibration / step_seconds
            single_step_seconds = step_seconds - (kv_per_step - kv_per_sequence)[:, None] / (
                node.hbm_gbps * GB
            )
            single_step_seconds = single_step_seconds / calibration
            full_step_seconds = step_seconds / calibration
            fit = predictor.fits.get(node.gpu_type)
            if fit is not None:  # the fitted engine of this GPU type (planner/fit.py)
                full_step_seconds, single_step_seconds = fit.steps_over_roofline(
                    (step_seconds, single_step_seconds * calibration), layers, weight, parameters,
                    (kv_per_step, kv_per_sequence), batch, levels, mode,
                )  # fmt: skip
                rate[c, k] = 1.0 / full_step_seconds
            for (
                i
            ) in observed_indices:  # a model's own observed steps scale its curve (Predictor.observed_ratio)
                factor = predictor.observed_factor(models[i], node)
                full_step_seconds[i] = full_step_seconds[i] * factor
                single_step_seconds[i] = single_step_seconds[i] * factor
                rate[c, k, i] = rate[c, k, i] / factor
            for i in profiled_indices:
                # Measured curves are not vectorised; there are few of them.
                for j, level in enumerate(levels):
                    fraction = float(level)
                    rate[c, k, i, j] = predictor.decode_tokens_per_second(models[i], node, fraction, mode)
                    full_step_seconds[i, j] = predictor.decode_step_seconds(models[i], node, fraction, mode)
                    single_step_seconds[i, j] = predictor.decode_step_seconds(
                        models[i], node, fraction, mode, 1
                    )
            if with_prompts:
                prefill[c, k] = _prefill_shares(
                    models, with_prompts, node, mode, levels, predictor, profiled_models,
                    weight, parameters, prompt_rate, prompt_tokens,
                )  # fmt: skip
            needed_time[c, k] = (
                gpu_busy_fraction(
                    demand[:, None],
                    single_step_seconds,
                    full_step_seconds,
                    batch[:, None],
                    np.inf,
                    slo[:, None],
                )
                + prefill[c, k]
            )
            busy[c, k] = np.minimum(config.max_gpu_busy_fraction, needed_time[c, k])
            feasible[c, k] = (
                level_allowed
                & mode_allowed[k][:, None]
                & meets_slo_with_prefill(rate[c, k], slo[:, None], prefill[c, k])
                & (gpu_bytes[k] <= gpu_capacity)
                & (host_bytes <= host_capacity)
            )
            if node.reserved_for is not None:  # a split's GPU set: its model only (planner/gpus.py)
                feasible[c, k] &= np.array([m.name in node.reserved_for for m in models])[:, None]
            elif splits is not None:  # and a model given a split runs there, not offloaded on one GPU
                feasible[c, k] &= ~splits[:, None]
            if node.closed_to:  # the room of a pinned model's return, kept from lower pinned ones
                feasible[c, k] &= np.array([m.name not in node.closed_to for m in models])[:, None]
    throughput = rate * batch[None, None, :, None]
    served = np.minimum(
        np.minimum(throughput, config.demand_headroom * demand[None, None, :, None]),
        time_capacity(demand[None, None, :, None], needed_time, config.max_gpu_busy_fraction),
    )
    tolerance = np.where(
        slo[None, None, :, None] > 0, sharing_tolerance(rate, slo[None, None, :, None], prefill), 1.0
    )
    # The GPU time a placement claims: its own busy share, or what its SLO denies to others.
    time_share = np.maximum(busy, 1.0 - tolerance)
    primary_value = (
        config.availability_value_tokens_per_second
        + served
        - config.memory_penalty_per_gib * gpu_bytes[None, :, :, :] / GIB
        - config.offload_penalty_per_gib * host_bytes[None, None, :, :] / GIB
        - config.gpu_time_penalty * time_share
    )
    value = primary_value + excess_value(throughput, served, config)
    return ClassTables(
        levels=levels,
        classes=list(classes),
        decode_tokens_per_second=rate,
        busy_fraction=busy,
        tolerance=tolerance,
        primary_value=primary_value,
        value=value,
        load_seconds=load_seconds,
        gpu_bytes=gpu_bytes,
        host_bytes=host_bytes,
        feasible=feasible,
    )
