"""Exact placement by mixed-integer programming over discretised residency levels (HiGHS via scipy).

One binary per (model, node, level, mode) option. Priorities are strict tiers solved lexicographically:
each tier is optimised with every higher tier held at its optimum, so no amount of lower-priority
throughput can ever displace a higher-priority model. The same option builder gives the LP relaxation
that bounds the greedy's optimality gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from residency_operator.planner.costs import ZERO_COST
from residency_operator.planner.greedy_state import Assignment
from residency_operator.planner.options import (
    LEVEL_EPSILON,
    MODES,
    ClassTables,
    OptionEval,
    evaluate_option,
    option_score,
    transition,
    unserved_tokens_per_second,
    usable_gpu_bytes,
    usable_host_bytes,
)
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.types import (
    GIB,
    CurrentPlacement,
    ExecutionMode,
    ModelDemand,
    NodeCapacity,
    PlannerConfig,
)

IntArray = npt.NDArray[np.int64]

TIER_HOLD_SLACK = 1e-3
"""Share of a tier's optimum that later stages may trade away (amortised load-cost noise, not throughput)."""
FloatArray = npt.NDArray[np.float64]


@dataclass(slots=True)
class NodeOptions:
    """Every feasible (model, node, level, mode) option, as parallel arrays."""

    model: IntArray
    node: IntArray
    resident_fraction: FloatArray
    mode: list[ExecutionMode]
    gpu_bytes: FloatArray
    host_bytes: FloatArray
    busy: FloatArray
    tolerance: FloatArray
    value: FloatArray
    score: FloatArray
    primary_value: FloatArray
    primary_score: FloatArray
    held_score: FloatArray
    """What the option counts for when its tier's optimum is held for the lower tiers: its primary score,
    but a cold load's amortised cost left out (see :func:`solve_lexicographic`)."""
    incumbent: npt.NDArray[np.bool_]
    pinned_models: list[int]
    """Running non-preemptible models whose options are restricted to staying and must be chosen."""

    def __len__(self) -> int:
        return len(self.model)


MOVE_MARGIN = 1e-3
"""A settled model's options on other nodes score at least this share below staying where it is."""
KEEP_GAIN = 3.0
"""Stopping a running model that meets its SLO costs the exact solver this many times what it serves.
Stiffer than the greedy's ``SAME_TIER_SWAP_GAIN`` (2): the MILP also finds joint displacements the greedy
never tries (two waiting models in the room of one running model and a third one moved away), and a
waiting model is valued at its queued requests, which drain within seconds once it runs. With the
greedy's 2x, the simulator's priority-burst replay (seeds 3-5) made 56-84 preemptions where the greedy
made 4-5; with 3x and :data:`MOVE_FORFEIT` the MILP serves 5-10 % more SLO-met tokens than with 2x."""
MOVE_FORFEIT = 0.5
"""Share of that keep bonus a settled model forfeits by moving (a move stops it for its reload, and a
cold load elsewhere restarts its requests): moving is cheaper than stopping, but not free. Without it the
same replay made 86-96 migrations, with it 13-30."""


class Keep(NamedTuple):
    """What keeping a running model running is worth to the exact solver (see :func:`keep_running`)."""

    primary_bonus: float
    bonus: float
    node: int | None
    """Its node, where it is settled (serves its demand there); else ``None``."""
    stay_primary_score: float
    stay_score: float


NO_KEEP = Keep(0.0, 0.0, None, 0.0, 0.0)


def below(score: float) -> float:
    """A score clearly (by :data:`MOVE_MARGIN`) below ``score``."""
    return score - MOVE_MARGIN * max(1.0, abs(score))


def keep_running(model: ModelDemand, option: OptionEval, node_index: int, config: PlannerConfig) -> Keep:
    """The greedy's stability rules, as scores for the exact solver, for a running model whose current
    placement (``option``) still meets its SLO:

    - stopping it costs :data:`KEEP_GAIN` times what it serves (a bonus on every option that
      keeps it running), so its own tier takes its place only for a clear win, never a swap of near equals
      that the next plan undoes (higher tiers are solved first and do not see it);
    - where it serves its demand (as ``relocate_outgrown`` judges: demand with headroom within a full
      batch at its current rate), no option on another node scores above staying, so the minute's demand
      estimates moving do not shuffle models between nodes by themselves; it still moves where that lets
      another model run (a higher tier takes its room, or a model of its own tier fits only there). One
      whose demand outgrew its node moves freely.
    """
    primary_bonus = (KEEP_GAIN - 1.0) * max(0.0, option.primary_value)
    bonus = (KEEP_GAIN - 1.0) * max(0.0, option.value)
    outgrown = unserved_tokens_per_second(model, option.decode_tokens_per_second, config) > 0
    return Keep(
        primary_bonus,
        bonus,
        None if outgrown else node_index,
        option_score(option.primary_value, ZERO_COST, True, config) + primary_bonus,
        option_score(option.value, ZERO_COST, True, config) + bonus,
    )


def count_options(tables: ClassTables, class_of_node: Sequence[int], nodes: Sequence[NodeCapacity]) -> int:
    """How many options the MILP would have (decides between exact and greedy)."""
    per_class = tables.feasible.sum(axis=(1, 2, 3))
    return int(sum(int(per_class[class_of_node[i]]) for i, node in enumerate(nodes) if node.accepts_work))


def build_node_options(
    models: Sequence[ModelDemand],
    nodes: Sequence[NodeCapacity],
    class_of_node: Sequence[int],
    tables: ClassTables,
    current: dict[str, CurrentPlacement],
    predictor: Predictor,
    config: PlannerConfig,
) -> NodeOptions:
    """Expand the class tables to concrete nodes, adding each running model's current level."""
    node_by_name = {node.name: node for node in nodes}
    rows_model: list[int] = []
    rows_node: list[int] = []
    rows_fraction: list[float] = []
    rows_mode: list[ExecutionMode] = []
    rows_gpu: list[float] = []
    rows_host: list[float] = []
    rows_busy: list[float] = []
    rows_tolerance: list[float] = []
    rows_value: list[float] = []
    rows_score: list[float] = []
    rows_primary_value: list[float] = []
    rows_primary_score: list[float] = []
    rows_held_score: list[float] = []
    rows_incumbent: list[bool] = []
    pinned: list[int] = []

    def add(
        model_index: int,
        node_index: int,
        fraction: float,
        mode: ExecutionMode,
        gpu: float,
        host: float,
        busy: float,
        tolerance: float,
        value: float,
        primary_value: float,
        keep: Keep = NO_KEEP,
    ) -> None:
        model = models[model_index]
        node = nodes[node_index]
        now = current.get(model.name)
        kind, cost = transition(model, now, node_by_name, node, fraction, mode)
        is_incumbent = kind is None and now is not None and now.is_running
        rows_model.append(model_index)
        rows_node.append(node_index)
        rows_fraction.append(fraction)
        rows_mode.append(mode)
        rows_gpu.append(gpu)
        rows_host.append(host)
        rows_busy.append(busy)
        rows_tolerance.append(tolerance)
        rows_value.append(value)
        score = option_score(value, cost, is_incumbent, config) + keep.bonus
        primary_score = option_score(primary_value, cost, is_incumbent, config) + keep.primary_bonus
        if keep.node is not None and node_index != keep.node:
            # never better than staying: it moves only where that lets another model run
            score = min(score, below(keep.stay_score)) - MOVE_FORFEIT * keep.bonus
            primary_score = (
                min(primary_score, below(keep.stay_primary_score)) - MOVE_FORFEIT * keep.primary_bonus
            )
        rows_score.append(score)
        rows_primary_value.append(primary_value)
        rows_primary_score.append(primary_score)
        rows_held_score.append(primary_value if now is None else primary_score)
        rows_incumbent.append(is_incumbent)

    for model_index, model in enumerate(models):
        if not model.wanted:
            continue
        now = current.get(model.name)
        pin_node: int | None = None
        if now is not None and now.is_running and not model.preemptible:
            candidate = next((i for i, n in enumerate(nodes) if n.name == now.node), None)
            if candidate is not None and nodes[candidate].accepts_work:
                incumbent = evaluate_option(
                    predictor, model, nodes[candidate], now.resident_fraction, now.mode, config
                )
                # kept whatever its SLO (see GreedyPlanner.incumbent_option), unless its node's memory shrank
                # below what it holds
                if (
                    incumbent.allowed
                    and incumbent.gpu_bytes <= usable_gpu_bytes(nodes[candidate])
                    and incumbent.host_bytes <= usable_host_bytes(nodes[candidate])
                ):
                    pin_node = candidate
        keep = NO_KEEP
        if now is not None and now.is_running:
            node_index = next((i for i, n in enumerate(nodes) if n.name == now.node), None)
            if node_index is not None and nodes[node_index].accepts_work:
                option = evaluate_option(
                    predictor, model, nodes[node_index], now.resident_fraction, now.mode, config
                )
                if option.allowed and option.meets_slo:
                    keep = keep_running(model, option, node_index, config)
                on_grid = bool(np.any(np.abs(tables.levels - now.resident_fraction) <= LEVEL_EPSILON))
                # off the grid, or on it but below the SLO (the grid holds only SLO-meeting options)
                if (
                    option.allowed
                    and (option.meets_slo or pin_node is not None)
                    and (not on_grid or not option.meets_slo)
                ):
                    add(
                        model_index,
                        node_index,
                        now.resident_fraction,
                        now.mode,
                        option.gpu_bytes,
                        option.host_bytes,
                        option.busy_fraction,
                        option.tolerance,
                        option.value,
                        option.primary_value,
                        keep,
                    )
        for node_index, node in enumerate(nodes):
            if not node.accepts_work or (pin_node is not None and node_index != pin_node):
                continue
            node_class = class_of_node[node_index]
            for mode_index, mode in enumerate(MODES):
                if pin_node is not None and now is not None and mode != now.mode:
                    continue
                for level_index in np.flatnonzero(tables.feasible[node_class, mode_index, model_index]):
                    fraction = float(tables.levels[level_index])
                    # A pinned model keeps its residency, unless it is idle (planner/demand.py): then it
                    # may be demoted within its SLO (feasible levels only) to make room for busy models.
                    if (
                        pin_node is not None
                        and now is not None
                        and not model.yielded_priority
                        and fraction < now.resident_fraction - LEVEL_EPSILON
                    ):
                        continue
                    add(
                        model_index,
                        node_index,
                        fraction,
                        mode,
                        float(tables.gpu_bytes[mode_index, model_index, level_index]),
                        float(tables.host_bytes[model_index, level_index]),
                        float(tables.busy_fraction[node_class, mode_index, model_index, level_index]),
                        float(tables.tolerance[node_class, mode_index, model_index, level_index]),
                        float(tables.value[node_class, mode_index, model_index, level_index]),
                        float(tables.primary_value[node_class, mode_index, model_index, level_index]),
                        keep,
                    )
        if pin_node is not None:
            pinned.append(model_index)
    return NodeOptions(
        model=np.array(rows_model, dtype=np.int64),
        node=np.array(rows_node, dtype=np.int64),
        resident_fraction=np.array(rows_fraction, dtype=np.float64),
        mode=rows_mode,
        gpu_bytes=np.array(rows_gpu, dtype=np.float64),
        host_bytes=np.array(rows_host, dtype=np.float64),
        busy=np.array(rows_busy, dtype=np.float64),
        tolerance=np.array(rows_tolerance, dtype=np.float64),
        value=np.array(rows_value, dtype=np.float64),
        score=np.array(rows_score, dtype=np.float64),
        primary_value=np.array(rows_primary_value, dtype=np.float64),
        primary_score=np.array(rows_primary_score, dtype=np.float64),
        held_score=np.array(rows_held_score, dtype=np.float64),
        incumbent=np.array(rows_incumbent, dtype=bool),
        pinned_models=pinned,
    )


def _capacity_constraints(
    options: NodeOptions,
    nodes: Sequence[NodeCapacity],
    model_count: int,
    active: npt.NDArray[np.bool_],
    max_busy_fraction: float,
    priorities: npt.NDArray[np.int64],
    with_sharing: bool = True,
    higher_held: tuple[int | None, FloatArray] | None = None,
) -> list[LinearConstraint]:
    option_count = len(options)
    columns = np.arange(option_count)
    # Memory in GiB keeps the coefficients near 1 for the solver's tolerances.
    gpu = csr_array(
        (np.where(active, options.gpu_bytes / GIB, 0.0), (options.node, columns)),
        shape=(len(nodes), option_count),
    )
    host = csr_array(
        (np.where(active, options.host_bytes / GIB, 0.0), (options.node, columns)),
        shape=(len(nodes), option_count),
    )
    gpu_capacity = np.array([usable_gpu_bytes(node) / GIB for node in nodes])
    host_capacity = np.array([usable_host_bytes(node) / GIB for node in nodes])
    busy = csr_array(
        (np.where(active, options.busy, 0.0), (options.node, columns)), shape=(len(nodes), option_count)
    )
    one_each = csr_array((np.ones(option_count), (options.model, columns)), shape=(model_count, option_count))
    lower = np.zeros(model_count)
    for model_index in options.pinned_models:
        lower[model_index] = 1.0
    pinned_busy = _pinned_busy(options, active, len(nodes))
    shielded_busy = _shielded_busy(options, active, len(nodes), priorities)
    sharing = (
        _sharing_constraint(options, active, max_busy_fraction, pinned_busy, priorities, higher_held)
        if with_sharing
        else None
    )
    return [
        *([sharing] if sharing is not None else []),
        LinearConstraint(gpu, -np.inf, gpu_capacity + 1e-9),
        LinearConstraint(host, -np.inf, host_capacity + 1e-9),
        # Pinned models stay even where their demand over-fills the GPU's time (an estimate, unlike memory;
        # the greedy keeps them too): the limit then is what they need, so nobody else joins them.
        # So do running models of a higher priority than a pinned one beside them (the greedy keeps them
        # too: releasing them for a lower priority's time would invert priorities).
        LinearConstraint(
            busy, -np.inf, np.maximum(max_busy_fraction, pinned_busy.sum(axis=0) + shielded_busy) + 1e-9
        ),
        LinearConstraint(one_each, lower, np.ones(model_count)),
    ]


def _pinned_busy(options: NodeOptions, active: npt.NDArray[np.bool_], node_count: int) -> FloatArray:
    """``[model, node]``: the least GPU time each pinned model takes on its node (0 elsewhere)."""
    least = np.zeros((len(options.pinned_models), node_count))
    for row, model_index in enumerate(options.pinned_models):
        mine = np.flatnonzero((options.model == model_index) & active)
        for node in np.unique(options.node[mine]):
            least[row, node] = float(options.busy[mine[options.node[mine] == node]].min())
    return least


def _shielded_busy(
    options: NodeOptions, active: npt.NDArray[np.bool_], node_count: int, priorities: npt.NDArray[np.int64]
) -> FloatArray:
    """``[node]``: GPU time of the running placements (incumbent options) of preemptible models that share
    a node with a pinned model of lower priority: what the node's time limit lets them keep."""
    shielded = np.zeros(node_count)
    pinned = np.isin(options.model, options.pinned_models)
    for node in np.unique(options.node[pinned & active]):
        lowest_pinned = int(priorities[pinned & active & (options.node == node)].min())
        kept = options.incumbent & active & ~pinned & (options.node == node) & (priorities > lowest_pinned)
        shielded[node] = float(options.busy[kept].sum())
    return shielded


def _sharing_constraint(
    options: NodeOptions,
    active: npt.NDArray[np.bool_],
    max_busy_fraction: float,
    pinned_busy: FloatArray,
    priorities: npt.NDArray[np.int64],
    higher_held: tuple[int | None, FloatArray] | None = None,
) -> LinearConstraint | None:
    """If option o is chosen, the others' busy share on its node stays within o's tolerance (big-M).

    A pinned model's time never bars a model of higher priority, nor its SLO a higher-priority model: a
    model is not kept out for a lower priority's sake. The time a pinned model takes is given all the same:
    the others share only what o's tolerance leaves beyond it. Likewise a higher-priority model's time
    beside a pinned o, once the higher tiers are solved (``higher_held``: the stage's tier, None for the
    last, and the previous stage's solution): o's row counts it, with a bound of at least what the higher
    tiers hold there, so it bars lower models only."""
    rows: list[int] = []
    columns: list[int] = []
    values: list[float] = []
    bounds: list[float] = []
    pinned = np.isin(options.model, options.pinned_models)
    # each pinned model's priority, once (options list a model's rows together; all share its priority)
    pinned_priority = [int(priorities[np.argmax(options.model == m)]) for m in options.pinned_models]
    for node in np.unique(options.node):
        on_node = np.flatnonzero((options.node == node) & active)
        big_m = max(float(options.busy[on_node].sum()), 1.0)
        for o in on_node:
            if options.tolerance[o] >= max_busy_fraction:
                continue  # the busy limit of the node already keeps this one's SLO
            others = on_node[options.model[on_node] != options.model[o]]
            others = others[~(pinned[others] & (priorities[others] < priorities[o]))]
            if pinned[o]:
                # Pinned models stay whatever their time: a pinned model's SLO bars only models that are free
                # to go elsewhere and not of a higher priority, and the other pinned ones' time counts as
                # given.
                others = others[~pinned[others] & (priorities[others] <= priorities[o])]
            # The lower pinned models' time does not bar o, but it is taken all the same: the others get what
            # o's SLO tolerates beyond it (else, once o runs, a model joins it that the plan which started
            # it had to keep off: the plan would not be a fixed point).
            given = sum(
                float(pinned_busy[row, node])
                for row, model_index in enumerate(options.pinned_models)
                if model_index != int(options.model[o])
                and (pinned[o] or pinned_priority[row] < priorities[o])
            )
            bound = max(0.0, float(options.tolerance[o]) - given)
            if (
                pinned[o]
                and higher_held is not None
                and (higher_held[0] is None or higher_held[0] <= priorities[o])
            ):
                higher = on_node[(priorities[on_node] > priorities[o]) & ~pinned[on_node]]
                bound = max(bound, float(options.busy[higher] @ higher_held[1][higher]))
                others = np.concatenate([others, higher])
            others = others[options.busy[others] > 0]
            if len(others) == 0:
                continue
            row = len(bounds)
            rows.extend([row] * (len(others) + 1))
            columns.extend([*others.tolist(), int(o)])
            values.extend([*options.busy[others].tolist(), big_m])
            bounds.append(bound + big_m + 1e-9)
    if not bounds:
        return None
    matrix = csr_array((values, (rows, columns)), shape=(len(bounds), len(options)))
    return LinearConstraint(matrix, -np.inf, np.array(bounds))


@dataclass(slots=True)
class MilpResult:
    """Chosen option per model (index into the options), the objective and the solver's own gap."""

    chosen: dict[int, int]
    objective: float
    gap: float
    solved: bool
    message: str


def solve_lexicographic(
    models: Sequence[ModelDemand],
    nodes: Sequence[NodeCapacity],
    options: NodeOptions,
    config: PlannerConfig,
    node_limit: int | None = None,
) -> MilpResult:
    """Optimise tier by tier (highest priority first); each later tier keeps earlier tiers' optima.
    ``node_limit``: branch-and-bound nodes per stage (a deterministic bound on the work, for small
    sub-problems solved often; the best solution found within it is taken)."""
    option_count = len(options)
    if option_count == 0:
        return MilpResult({}, 0.0, 0.0, True, "no options")
    priorities = np.array([models[i].priority for i in options.model], dtype=np.int64)
    tiers = sorted({int(p) for p in priorities}, reverse=True)
    held: list[tuple[npt.NDArray[np.float64], float]] = []
    solution: FloatArray | None = None
    gap = 0.0
    # One solve per tier on primary value, then one on the full value with every tier held.
    stages: list[tuple[int | None, npt.NDArray[np.float64]]] = [
        (tier, np.where(priorities == tier, options.primary_score, 0.0)) for tier in tiers
    ]
    stages.append((None, options.score))
    tie_breaks = (
        config.memory_penalty_per_gib * options.gpu_bytes / GIB
        + config.offload_penalty_per_gib * options.host_bytes / GIB
        + config.gpu_time_penalty * np.maximum(options.busy, 1.0 - options.tolerance)
    )
    # A running preemptible:false model stays whatever its tier (it is given, like the node's size): its
    # options take part in the higher tiers' stages too, worth nothing there, or those would be infeasible.
    pinned = np.isin(options.model, options.pinned_models)
    for tier, coefficients in stages:
        active = (priorities >= tier) | pinned if tier is not None else np.ones(option_count, dtype=bool)
        constraints = _capacity_constraints(
            options,
            nodes,
            len(models),
            active,
            config.max_gpu_busy_fraction,
            priorities,
            higher_held=None if solution is None else (tier, solution),
        )
        for held_coefficients, floor in held:
            constraints.append(LinearConstraint(held_coefficients[None, :], floor, np.inf))
        upper = np.where(active, 1.0, 0.0)
        result = milp(
            -coefficients,
            integrality=np.ones(option_count),
            bounds=Bounds(np.zeros(option_count), upper),
            constraints=constraints,
            options={
                "time_limit": config.milp_time_limit_seconds,
                "mip_rel_gap": 1e-7,
                "presolve": True,
                **({} if node_limit is None else {"node_limit": node_limit}),
            },
        )
        if result.x is None:
            return MilpResult({}, 0.0, 1.0, False, f"tier {tier}: {result.message}")
        solution = np.round(result.x)
        if tier is not None:
            # Hold the tier's value without the memory tie-break, so later stages may still spend memory,
            # and without its cold loads' amortised cost: a level that loads a little faster (a few
            # hundredths of a token/s over the horizon) must not keep a lower tier's model out, which the
            # next plan, with that model running and no load to pay, would then let in (not a fixed point).
            # The final stage still weighs every load's cost.
            held_coefficients = np.where(priorities == tier, options.held_score + tie_breaks, 0.0)
            achieved = float(np.dot(held_coefficients, solution))
            # A little slack lets later stages shift load-cost noise, never a whole model's availability.
            slack = min(
                TIER_HOLD_SLACK * max(1.0, abs(achieved)), 0.25 * config.availability_value_tokens_per_second
            )
            held.append((held_coefficients, achieved - slack))
        gap = max(gap, float(getattr(result, "mip_gap", 0.0) or 0.0))
    assert solution is not None
    chosen = {int(options.model[i]): int(i) for i in np.flatnonzero(solution > 0.5)}
    total = float(np.dot(options.score, solution))
    return MilpResult(chosen, total, gap, True, "optimal")


def lp_upper_bound(
    models: Sequence[ModelDemand], nodes: Sequence[NodeCapacity], options: NodeOptions, config: PlannerConfig
) -> float:
    """LP relaxation of the single-level objective (all tiers summed): an upper bound on any plan."""
    if len(options) == 0:
        return 0.0
    # Without the (big-M) sharing rows: dropping constraints keeps it an upper bound and keeps it fast.
    priorities = np.array([models[i].priority for i in options.model], dtype=np.int64)
    constraints = _capacity_constraints(
        options,
        nodes,
        len(models),
        np.ones(len(options), dtype=bool),
        config.max_gpu_busy_fraction,
        priorities,
        False,
    )
    result = milp(
        -options.score,
        integrality=np.zeros(len(options)),
        bounds=Bounds(np.zeros(len(options)), np.ones(len(options))),
        constraints=constraints,
    )
    if result.x is None:
        return float(np.maximum(options.score, 0.0).sum())
    return float(-result.fun)


def assignments_from_milp(
    options: NodeOptions, result: MilpResult, model_count: int
) -> list[Assignment | None]:
    """Turn the chosen options into the greedy's assignment records (one format for both solvers)."""
    assignment: list[Assignment | None] = [None] * model_count
    for model_index, option_index in result.chosen.items():
        assignment[model_index] = Assignment(
            node=int(options.node[option_index]),
            resident_fraction=float(options.resident_fraction[option_index]),
            mode=options.mode[option_index],
            gpu_bytes=int(options.gpu_bytes[option_index]),
            host_bytes=int(options.host_bytes[option_index]),
            busy=float(options.busy[option_index]),
            tolerance=float(options.tolerance[option_index]),
            value=float(options.primary_value[option_index]),
            score=float(options.primary_score[option_index]),
            full_value=float(options.value[option_index]),
            full_score=float(options.score[option_index]),
            incumbent=bool(options.incumbent[option_index]),
        )
    return assignment
