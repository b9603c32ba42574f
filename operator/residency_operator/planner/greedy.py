"""Fast deterministic greedy placement for inputs too large for the exact MILP.

Priorities are strict tiers, solved highest first. Within a tier:

1. models already running keep their placement (hysteresis: moving costs, and a stable cluster is
   worth something);
2. the others are admitted in order of value density (value per GPU byte), each at the level where its
   value net of the amortised load cost peaks on the best node class, or else at the highest level that
   still fits somewhere (best-fit on free GPU memory);
3. a model that fits nowhere may make room on one node by demoting models of its own or a lower tier
   to their minimal SLO-meeting level and by preempting strictly lower-priority preemptible models,
   choosing the node where that loses the least value;
4. leftover memory promotes the tier's models by marginal value per byte.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from residency_operator.planner.costs import (
    ZERO_COST,
    amortised_cost_tokens_per_second,
    demote_cost,
    migrate_cost,
    promote_cost,
)
from residency_operator.planner.options import (
    LEVEL_EPSILON,
    MODES,
    BoolArray,
    ClassTables,
    FloatArray,
    IntArray,
    OptionEval,
    evaluate_option,
    option_score,
    unserved_tokens_per_second,
    usable_gpu_bytes,
    usable_host_bytes,
)
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.types import (
    CurrentPlacement,
    ExecutionMode,
    ModelDemand,
    NodeCapacity,
    PlannerConfig,
)

MAKE_ROOM_CANDIDATE_NODES = 8
"""Nodes examined (those with the most free memory) when a model must make room; bounds the cost."""
FIT_SCAN_LIMIT = 64
"""Nodes examined past the best-fit point when host memory or GPU time, not GPU memory, does not fit."""
ROOMY_NODE_LIMIT = 48
"""Admission checks every option against every node with room at once when at most this many have any."""
TIE_BREAK_SLACK = 0.1
"""A higher-priority model may be demoted for a lower one only if its value drops by no more than this
share of the availability value (memory and time tie-breaks, not served throughput)."""
SAME_TIER_SWAP_GAIN = 2.0
"""A model may preempt one of its own tier to make room only if it gains this many times what that loses
(net of its amortised load): a clear win, never a swap of near equals that the next plan might undo."""
MAKE_ROOM_FAILURE_LIMIT = 32
"""After this many models in a row of one tier found no room to make, the tier stops trying (the cluster
is full for it); bounds the work on hopelessly over-subscribed inputs."""


def _better_room(
    tier_net: float, loss: float, best_tier_net: float, best_loss: float, config: PlannerConfig
) -> bool:
    """Whether making room on one node beats the best so far: more for the newcomer's tier by a clear
    margin (the hysteresis share), or about as much for it and less lost in all."""
    margin = config.hysteresis_fraction * max(abs(tier_net), abs(best_tier_net), 1.0)
    if abs(tier_net - best_tier_net) > margin:
        return tier_net > best_tier_net
    return loss < best_loss


@dataclass(slots=True)
class Assignment:
    """A model's placement while the greedy works (mutable)."""

    node: int
    resident_fraction: float
    mode: ExecutionMode
    gpu_bytes: int
    host_bytes: int
    busy: float
    """Share of the node's GPU time the model's demand takes."""
    tolerance: float
    """Share of the node's GPU time others may take before this placement misses its SLO."""
    value: float
    """Primary value (what priorities compare)."""
    score: float
    """Primary value net of amortised transition cost (+ hysteresis bonus for incumbents)."""
    full_value: float
    full_score: float
    incumbent: bool


@dataclass(slots=True)
class GreedyState:
    """Free memory per node, kept sorted per node class for best-fit lookups."""

    free_gpu: list[int]
    free_host: list[int]
    free_time: list[float]
    """GPU time still free: the node's cap (see ``time_cap``) minus ``used_time``."""
    used_time: list[float]
    time_cap: list[float]
    """Least of the busy limit and, for every model on the node, its busy share plus its tolerance."""
    max_busy: float
    node_class: list[int]
    free_sorted: list[list[tuple[int, int]]]
    models_on_node: list[set[int]]
    assignment: list[Assignment | None]
    preempted_by: dict[int, int] = field(default_factory=dict)
    """Model index → index of the model that preempted it (for the reason)."""
    class_members: list[list[int]] = field(default_factory=list)
    _max_time: dict[int, float] = field(default_factory=dict)
    """Most free GPU time per class, kept lazily (dropped when its holder fills up)."""
    version: int = 0
    """Bumped whenever memory or time is given back (cached "does not fit" answers expire)."""
    node_version: list[int] = field(default_factory=list)
    """Per node, bumped whenever a model is put on or taken off it (cached per-node answers expire)."""
    touched: dict[int, Assignment | None] | None = None
    """When a dict, every model put on or taken off a node is recorded with its assignment from before
    it was first touched (the incremental planner's journal)."""
    released_on: set[int] | None = None
    """When a set, every node a model is taken off (its room may have grown) is added."""
    placed: BoolArray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """Per model, whether it has an assignment (``assignment[i] is not None``), as an array."""

    def max_free_time(self, node_class: int) -> float:
        """Most free GPU time on any accepting node of a class."""
        cached = self._max_time.get(node_class)
        if cached is None:
            members = self.class_members[node_class] if self.class_members else []
            cached = max((self.free_time[n] for n in members), default=-1.0)
            self._max_time[node_class] = cached
        return cached

    def _time_changed(self, node: int, before: float) -> None:
        node_class = self.node_class[node]
        cached = self._max_time.get(node_class)
        if cached is None:
            return
        after = self.free_time[node]
        if after >= cached:
            self._max_time[node_class] = after
        elif before >= cached:
            del self._max_time[node_class]

    def occupy(self, model_index: int, assignment: Assignment) -> None:
        """Put a model on its node, taking memory."""
        self._set_free(assignment.node, -assignment.gpu_bytes, -assignment.host_bytes)
        node = assignment.node
        before = self.free_time[node]
        self.used_time[node] += assignment.busy
        self.time_cap[node] = min(self.time_cap[node], assignment.tolerance + assignment.busy)
        self.free_time[node] = self.time_cap[node] - self.used_time[node]
        self._time_changed(node, before)
        if self.touched is not None and model_index not in self.touched:
            self.touched[model_index] = self.assignment[model_index]
        self.models_on_node[assignment.node].add(model_index)
        self.assignment[model_index] = assignment
        self.placed[model_index] = True
        self.node_version[node] += 1

    def release(self, model_index: int) -> Assignment | None:
        """Take a model off its node, returning memory."""
        assignment = self.assignment[model_index]
        if assignment is None:
            return None
        self._set_free(assignment.node, assignment.gpu_bytes, assignment.host_bytes)
        node = assignment.node
        self.version += 1
        before = self.free_time[node]
        if self.touched is not None and model_index not in self.touched:
            self.touched[model_index] = assignment
        self.models_on_node[node].discard(model_index)
        self.assignment[model_index] = None
        self.placed[model_index] = False
        self.node_version[node] += 1
        if self.released_on is not None:
            self.released_on.add(node)
        self.used_time[node] -= assignment.busy
        self.time_cap[node] = min(
            [self.max_busy]
            + [a.tolerance + a.busy for i in self.models_on_node[node] if (a := self.assignment[i])]
        )
        self.free_time[node] = self.time_cap[node] - self.used_time[node]
        self._time_changed(node, before)
        return assignment

    def _set_free(self, node: int, gpu_delta: int, host_delta: int) -> None:
        sorted_free = self.free_sorted[self.node_class[node]]
        old_key = (self.free_gpu[node], node)
        position = bisect.bisect_left(sorted_free, old_key)
        if position < len(sorted_free) and sorted_free[position] == old_key:
            del sorted_free[position]
            self.free_gpu[node] += gpu_delta
            bisect.insort(sorted_free, (self.free_gpu[node], node))
        else:
            self.free_gpu[node] += gpu_delta
        self.free_host[node] += host_delta

    def fits(self, node: int, gpu_bytes: int, host_bytes: int, busy: float, tolerance: float = 1.0) -> bool:
        """Whether a node has the GPU memory, host memory and GPU time for a placement, and the models
        already there leave it enough of the GPU to keep its SLO."""
        return (
            self.free_gpu[node] >= gpu_bytes
            and self.free_host[node] >= host_bytes
            and self.free_time[node] >= busy - 1e-9
            and self.used_time[node] <= tolerance + 1e-9
        )

    def best_fit(
        self, node_class: int, gpu_bytes: int, host_bytes: int, busy: float, tolerance: float = 1.0
    ) -> int | None:
        """The accepting node of a class with the least free GPU memory that still fits all needs."""
        sorted_free = self.free_sorted[node_class]
        position = bisect.bisect_left(sorted_free, (gpu_bytes, -1))
        for _, node in sorted_free[position : position + FIT_SCAN_LIMIT]:
            if (
                self.free_host[node] >= host_bytes
                and self.free_time[node] >= busy - 1e-9
                and self.used_time[node] <= tolerance + 1e-9
            ):
                return node
        return None

    def largest_free_gpu(self, node_class: int) -> int:
        """Most free GPU memory on any accepting node of a class."""
        sorted_free = self.free_sorted[node_class]
        return sorted_free[-1][0] if sorted_free else -1


MinimalOption = tuple[int, int, float, float, float, int]
"""GPU bytes, host bytes, primary value, busy share, tolerance and level index of a demotion target."""


@dataclass(frozen=True, slots=True)
class RoomCandidates:
    """What could make room on one node for one priority (see ``GreedyPlanner._room_candidates``)."""

    version: int
    """The node's ``GreedyState.node_version`` these were computed at."""
    demotions: list[tuple[float, str, int, int, int, float, float, float, int]]
    preemptions: list[tuple[int, float, str, int, int, int, float]]
    most_freed_gpu: int
    """GPU bytes freed if every candidate were demoted or preempted (the most it could free)."""
    most_freed_lower_gpu: int
    """The same without preempting models of the newcomer's own tier (they may still be demoted)."""
    least_same_tier_value: float
    """Value of the least valuable preemptible model of the newcomer's own tier (inf: none)."""
    staying: dict[int, tuple[float, float]]
    """Busy share and tolerance of every model on the node now."""
    used_time: float


@dataclass(slots=True)
class DerivedScores:
    """Newcomer scores and the per-model choices that follow from them (see :func:`derive_scores`)."""

    newcomer_score: FloatArray
    """``[class, mode, model, level]``: value net of the amortised cold-load cost; -inf when infeasible."""
    target_level: IntArray
    """``[class, mode, model]``: level with the best newcomer score."""
    min_level: IntArray
    """``[class, mode, model]``: lowest feasible level."""
    class_mode_order: IntArray
    """``[model, class*mode]``: (class, mode) pairs by target score, best first."""
    best_target_score: FloatArray
    has_option: BoolArray
    flat_target_score: FloatArray
    """``[class*mode, model]``."""


def derive_scores(tables: ClassTables, usable_class: BoolArray, horizon_seconds: float) -> DerivedScores:
    """Vectorised newcomer scores over all models (or one, for the incremental planner)."""
    model_count = tables.gpu_bytes.shape[1]
    load_penalty = tables.load_seconds[:, None, :, :] / horizon_seconds if horizon_seconds > 0 else 0.0
    feasible = tables.feasible & usable_class[:, None, None, None]
    score = np.where(feasible, tables.primary_value * (1.0 - load_penalty), -np.inf)
    target_level = np.argmax(score, axis=3)
    target_score = np.take_along_axis(score, target_level[..., None], axis=3)[..., 0]
    flat = target_score.reshape(len(tables.classes) * len(MODES), model_count)
    return DerivedScores(
        newcomer_score=score,
        target_level=target_level,
        min_level=np.argmax(feasible, axis=3),
        class_mode_order=np.argsort(-flat, axis=0, kind="stable").T,
        best_target_score=flat.max(axis=0) if flat.size else np.full(model_count, -np.inf),
        has_option=np.asarray(feasible.any(axis=(0, 1, 3)), dtype=bool),
        flat_target_score=flat,
    )


@dataclass(slots=True)
class GreedyResult:
    """What the greedy decided, by model index."""

    assignment: list[Assignment | None]
    preempted_by: dict[int, int]


class GreedyPlanner:
    """One greedy solve; see the module docstring for the algorithm."""

    def __init__(
        self,
        models: list[ModelDemand],
        nodes: Sequence[NodeCapacity],
        class_of_node: Sequence[int],
        tables: ClassTables,
        current: dict[str, CurrentPlacement],
        predictor: Predictor,
        config: PlannerConfig,
    ) -> None:
        self.models = models
        self.nodes = nodes
        self.node_index = {node.name: i for i, node in enumerate(nodes)}
        self.class_of_node = class_of_node
        self.tables = tables
        self.current = current
        self.predictor = predictor
        self.config = config
        self.usable_class = np.zeros(len(tables.classes), dtype=bool)
        for i, node in enumerate(nodes):
            if node.accepts_work:
                self.usable_class[class_of_node[i]] = True
        derived = derive_scores(tables, self.usable_class, config.amortisation_horizon_seconds)
        self.newcomer_score = derived.newcomer_score
        self.target_level = derived.target_level
        self.min_level = derived.min_level
        self.class_mode_order = derived.class_mode_order
        self.best_target_score = derived.best_target_score
        self.has_option = derived.has_option
        self._flat_target_score = derived.flat_target_score
        self.priorities = np.array([model.priority for model in models], dtype=np.int64)
        self._pairs: list[list[tuple[int, int]]] = []
        self._target_rows: FloatArray = np.zeros((0, 0, 5))
        self._need_rows: FloatArray = np.zeros((0, 0, 4))
        self._fill_model_lists(slice(None))

        free_gpu = [usable_gpu_bytes(node) for node in nodes]
        free_host = [usable_host_bytes(node) for node in nodes]
        free_sorted: list[list[tuple[int, int]]] = [[] for _ in tables.classes]
        for i, node in enumerate(nodes):
            if node.accepts_work:
                free_sorted[class_of_node[i]].append((free_gpu[i], i))
        for entries in free_sorted:
            entries.sort()
        self._fail_memo: dict[int, list[tuple[int, int, float, float]]] = {}
        self._memo_version = -1
        self.failed_room: dict[tuple[int, int, int], list[tuple[int, int, float, float]]] = {}
        self.state = GreedyState(
            free_gpu=free_gpu,
            free_host=free_host,
            free_time=[config.max_gpu_busy_fraction] * len(nodes),
            used_time=[0.0] * len(nodes),
            time_cap=[config.max_gpu_busy_fraction] * len(nodes),
            max_busy=config.max_gpu_busy_fraction,
            node_class=list(class_of_node),
            free_sorted=free_sorted,
            class_members=[[node for _, node in entries] for entries in free_sorted],
            models_on_node=[set() for _ in nodes],
            assignment=[None] * len(models),
            node_version=[0] * len(nodes),
            placed=np.zeros(len(models), dtype=bool),
        )
        self.room_cut = False
        """Whether the last room plan left out a model of the newcomer's own tier for its value."""
        self._room_cache: dict[tuple[int, int, bool], RoomCandidates] = {}
        self._minimal_cache: dict[tuple[int, bool], tuple[Assignment, MinimalOption | None]] = {}
        self._levels: list[float] = tables.levels.tolist()
        self._memory_somewhere = True
        """Whether the last admission attempt found any node with GPU memory for the model."""
        self._level_index = {level: index for index, level in enumerate(self._levels)}

    def _fill_model_lists(self, models: slice) -> None:
        """Per-model rows of what admission reads most, gathered in bulk (numpy scalar reads cost about a
        microsecond each; one row read as a list costs about that for all of them): each (class, mode)
        target option's level, GPU and host bytes, busy share and tolerance, and per class the least GPU
        bytes, host bytes and busy share, and the most tolerance, of any feasible option."""
        tables = self.tables
        level = self.target_level[:, :, models]
        class_count, mode_count, count = level.shape
        c = np.arange(class_count)[:, None, None]
        m = np.arange(mode_count)[None, :, None]
        i = np.arange(tables.gpu_bytes.shape[1])[models][None, None, :]
        targets = np.stack(
            [
                level.astype(np.float64),
                tables.gpu_bytes[m, i, level],
                tables.host_bytes[i, level],
                tables.busy_fraction[c, m, i, level],
                tables.tolerance[c, m, i, level],
            ],
            axis=-1,
        )  # [class, mode, model, field]
        finite = np.isfinite(self.newcomer_score[:, :, models, :])
        needs = np.stack(
            [
                np.where(finite, tables.gpu_bytes[None, :, models, :], np.inf).min(axis=(1, 3)),
                np.where(finite, tables.host_bytes[None, None, models, :], np.inf).min(axis=(1, 3)),
                np.where(finite, tables.busy_fraction[:, :, models, :], np.inf).min(axis=(1, 3)),
                np.where(finite, tables.tolerance[:, :, models, :], -np.inf).max(axis=(1, 3)),
            ],
            axis=-1,
        )  # [class, model, field]
        counts = np.isfinite(self._flat_target_score[:, models]).sum(axis=0).tolist()
        pair_of = [divmod(flat_index, len(MODES)) for flat_index in range(class_count * mode_count)]
        pairs = [
            [pair_of[flat_index] for flat_index in order[:count]]
            for order, count in zip(self.class_mode_order[models].tolist(), counts, strict=True)
        ]
        if models == slice(None):
            self._pairs = pairs
            self._target_rows = targets.transpose(2, 0, 1, 3).reshape(count, class_count * mode_count, 5)
            self._need_rows = needs.transpose(1, 0, 2).copy()
        else:
            self._pairs[models] = pairs
            self._target_rows[models] = targets.transpose(2, 0, 1, 3).reshape(
                count, class_count * mode_count, 5
            )
            self._need_rows[models] = needs.transpose(1, 0, 2)

    def least_gpu(self, model_index: int) -> list[float]:
        """Per class, the least GPU bytes of any feasible option of the model (inf where none)."""
        return self._need_rows[model_index, :, 0].tolist()  # type: ignore[no-any-return]

    def _targets(self, model_index: int) -> list[list[float]]:
        """Per flat (class, mode) index: target level, GPU bytes, host bytes, busy share, tolerance."""
        return self._target_rows[model_index].tolist()  # type: ignore[no-any-return]

    # -- incumbents -----------------------------------------------------------------------------------

    def incumbent_option(self, model_index: int) -> OptionEval | None:
        """The current running placement, if it is still valid (accepting node, allowed, meets SLO).

        A ``preemptible: false`` model keeps a placement that no longer meets its SLO (the node's
        measured rate fell): it serves below the SLO rather than not at all, and its status says so."""
        model = self.models[model_index]
        current = self.current.get(model.name)
        if current is None or not current.is_running or not model.wanted:
            return None
        node_index = self.node_index.get(current.node)
        if node_index is None or not self.nodes[node_index].accepts_work:
            return None
        option = self.option_at(model_index, node_index, current.resident_fraction, current.mode)
        return option if self._keeps(model_index, option) else None

    def _keeps(self, model_index: int, option: OptionEval) -> bool:
        """Whether a running placement stays: allowed, and meeting its SLO unless the model is pinned."""
        return option.allowed and (option.meets_slo or not self.models[model_index].preemptible)

    def option_at(
        self, model_index: int, node_index: int, resident_fraction: float, mode: ExecutionMode
    ) -> OptionEval:
        """One option, fully evaluated: read from the tables at a configured level, else predicted."""
        level = self._level_index.get(resident_fraction)
        if level is None or mode not in MODES:
            return evaluate_option(
                self.predictor,
                self.models[model_index],
                self.nodes[node_index],
                resident_fraction,
                mode,
                self.config,
            )
        model = self.models[model_index]
        tables = self.tables
        node_class = self.class_of_node[node_index]
        mode_index = MODES.index(mode)
        at = (node_class, mode_index, model_index, level)
        rate = float(tables.decode_tokens_per_second[at])
        slo = model.min_decode_tokens_per_second
        return OptionEval(
            resident_fraction=resident_fraction,
            mode=mode,
            gpu_bytes=int(tables.gpu_bytes[mode_index, model_index, level]),
            host_bytes=int(tables.host_bytes[model_index, level]),
            decode_tokens_per_second=rate,
            throughput_tokens_per_second=rate * model.max_batch,
            busy_fraction=float(tables.busy_fraction[at]),
            tolerance=float(tables.tolerance[at]),
            primary_value=float(tables.primary_value[at]),
            value=float(tables.value[at]),
            meets_slo=slo is None or rate >= slo - 1e-9,
            allowed=resident_fraction >= model.min_resident_fraction - LEVEL_EPSILON
            and mode in model.allowed_modes,
        )

    def seat_incumbents(self) -> None:
        """Keep every valid running placement; release the lowest priorities where a node is over-full."""
        for model_index, model in enumerate(self.models):
            option = self.incumbent_option(model_index)
            if option is None:
                continue
            node = self.node_index[self.current[model.name].node]
            self.state.occupy(
                model_index,
                Assignment(
                    node=node,
                    resident_fraction=option.resident_fraction,
                    mode=option.mode,
                    gpu_bytes=option.gpu_bytes,
                    host_bytes=option.host_bytes,
                    busy=option.busy_fraction,
                    tolerance=option.tolerance,
                    value=option.primary_value,
                    score=option_score(option.primary_value, ZERO_COST, True, self.config),
                    full_value=option.value,
                    full_score=option_score(option.value, ZERO_COST, True, self.config),
                    incumbent=True,
                ),
            )
        for node in range(len(self.nodes)):
            self._evict_until_fit(node)

    def _evict_until_fit(self, node: int) -> None:
        """Where running models no longer fit their node together (capacity shrank, an SLO tightened,
        demand grew), release the least important until they do: preemptible before not, lowest priority,
        least value. Then seat again, most valuable first, every released model that still fits beside
        the others: only as many are released as the fit needs.

        Memory is a hard limit; GPU time is an estimate, so running models are only moved off a node when
        their estimated demand exceeds all of its time (not merely the planning target), and a
        ``preemptible: false`` model never for time or its neighbours' SLOs, only where its node's memory
        shrank below what it holds."""
        if self._seated_fit(node):
            return
        state = self.state
        memory_short = state.free_gpu[node] < 0 or state.free_host[node] < 0
        # Preemptible before pinned (a pinned model goes only when memory shrank below what it holds), then
        # lowest priority first, then the least valuable.
        victims = sorted(
            (i for i in state.models_on_node[node] if memory_short or self.models[i].preemptible),
            key=lambda i: (
                not self.models[i].preemptible,
                self.models[i].priority,
                self._value_of(i),
                self.models[i].name,
            ),
        )
        released: list[tuple[int, Assignment]] = []
        for victim in victims:
            if self._seated_fit(node):
                break
            if not (state.free_gpu[node] < 0 or state.free_host[node] < 0) and not any(
                self.models[i].priority >= self.models[victim].priority
                for i in state.models_on_node[node]
                if i != victim
            ):
                # Only GPU time (an estimate) is short, and every model left beside this one (pinned ones:
                # the preemptible ones rank above it) has a lower priority: releasing it would serve them at
                # its expense. All stay.
                break
            assignment = self.state.release(victim)
            if assignment is not None:
                released.append((victim, assignment))
        # The last release restored the fit; an earlier, less important one may not have been needed.
        for victim, assignment in reversed(released[:-1]):
            self.state.occupy(victim, assignment)
            if not self._seated_fit(node):
                self.state.release(victim)

    def _seated_fit(self, node: int) -> bool:
        state = self.state
        time_slack = 1.0 - self.config.max_gpu_busy_fraction
        if state.free_gpu[node] < 0 or state.free_host[node] < 0 or state.free_time[node] < -time_slack:
            return False
        # Every model keeps its SLO beside the others (a tightened SLO may no longer tolerate them).
        used = state.used_time[node]
        return all(
            used - a.busy <= a.tolerance + 1e-9
            for i in state.models_on_node[node]
            if (a := state.assignment[i]) is not None
        )

    def _value_of(self, model_index: int) -> float:
        assignment = self.state.assignment[model_index]
        return 0.0 if assignment is None else assignment.value

    # -- admission ------------------------------------------------------------------------------------

    def _assignment_at(
        self, model_index: int, node: int, node_class: int, mode_index: int, level_index: int
    ) -> Assignment:
        tables = self.tables
        at = (node_class, mode_index, model_index, level_index)
        full_value = tables.value.item(at)
        return Assignment(
            node=node,
            resident_fraction=self._levels[level_index],
            mode=MODES[mode_index],
            gpu_bytes=int(tables.gpu_bytes.item(mode_index, model_index, level_index)),
            host_bytes=int(tables.host_bytes.item(model_index, level_index)),
            busy=tables.busy_fraction.item(at),
            tolerance=tables.tolerance.item(at),
            value=tables.primary_value.item(at),
            score=self.newcomer_score.item(at),
            full_value=full_value,
            full_score=full_value * (1.0 - self._load_share(node_class, model_index, level_index)),
            incumbent=False,
        )

    def _load_share(self, node_class: int, model_index: int, level: int) -> float:
        horizon = self.config.amortisation_horizon_seconds
        return self.tables.load_seconds.item(node_class, model_index, level) / horizon if horizon > 0 else 0.0

    def _class_modes(self, model_index: int) -> list[tuple[int, int]]:
        """(class, mode) pairs with a feasible option, best target score first."""
        return self._pairs[model_index]

    def _preferred_node(self, model_index: int) -> int | None:
        """Where the model is (or is cached) now: placing it there again is cheapest."""
        current = self.current.get(self.models[model_index].name)
        if current is None:
            return None
        node = self.node_index.get(current.node)
        if node is None or not self.nodes[node].accepts_work:
            return None
        return node

    def try_place(self, model_index: int) -> bool:
        """Admit a model into free memory (promoting a model that blocks it if that helps)."""
        if self._try_place_free(model_index):
            return True
        # Promoting a blocker frees GPU time, not memory: no use where no node has memory for the model.
        return self._memory_somewhere and self._try_unblock(model_index)

    def _try_unblock(self, model_index: int) -> bool:
        """Admit a model where memory suffices but a resident model's SLO leaves too little GPU time to
        share, by promoting that model (a faster model tolerates more sharing)."""
        state = self.state
        targets = self._targets(model_index)
        for node_class, mode_index in self._class_modes(model_index):
            target = targets[node_class * len(MODES) + mode_index]
            level, need_gpu, need_host = int(target[0]), int(target[1]), int(target[2])
            need_busy, need_tolerance = target[3], target[4]
            sorted_free = state.free_sorted[node_class]
            position = bisect.bisect_left(sorted_free, (need_gpu, -1))
            if position == len(sorted_free):
                continue
            for _, node in sorted_free[position : position + MAKE_ROOM_CANDIDATE_NODES]:
                if state.free_host[node] < need_host or state.used_time[node] + need_busy > state.max_busy:
                    continue
                if state.used_time[node] > need_tolerance + 1e-9:
                    continue  # the newcomer itself could not share this node
                blocker = self._promote_blocker(node, need_gpu, need_host, need_busy)
                if blocker and state.fits(node, need_gpu, need_host, need_busy, need_tolerance):
                    state.occupy(
                        model_index, self._assignment_at(model_index, node, node_class, mode_index, level)
                    )
                    return True
        return False

    def _promote_blocker(self, node: int, keep_gpu: int, keep_host: int, need_busy: float) -> bool:
        """Promote the model whose tolerance caps the node's GPU time, keeping ``keep_*`` bytes free."""
        state, tables = self.state, self.tables
        on_node = [i for i in state.models_on_node[node] if state.assignment[i] is not None]
        if not on_node:
            return False
        blocker = min(
            on_node,
            key=lambda i: (state.assignment[i].tolerance + state.assignment[i].busy, self.models[i].name),  # type: ignore[union-attr]
        )
        assignment = state.assignment[blocker]
        assert assignment is not None
        node_class = self.class_of_node[node]
        mode_index = MODES.index(assignment.mode)
        feasible = tables.feasible[node_class, mode_index, blocker]
        for level in range(len(tables.levels) - 1, -1, -1):
            if tables.levels[level] <= assignment.resident_fraction + 1e-9:
                break
            if not feasible[level]:
                continue
            extra_gpu = int(tables.gpu_bytes[mode_index, blocker, level]) - assignment.gpu_bytes
            extra_host = int(tables.host_bytes[blocker, level]) - assignment.host_bytes
            busy = float(tables.busy_fraction[node_class, mode_index, blocker, level])
            tolerance = float(tables.tolerance[node_class, mode_index, blocker, level])
            if state.free_gpu[node] - extra_gpu < keep_gpu or state.free_host[node] - extra_host < keep_host:
                continue
            others_used = state.used_time[node] - assignment.busy
            if others_used + need_busy > tolerance + 1e-9 or others_used + busy + need_busy > state.max_busy:
                continue
            promoted = self._assignment_at(blocker, node, node_class, mode_index, level)
            if assignment.incumbent:
                promoted.score = self._promotion_score(blocker, assignment, level, False)
                promoted.full_score = self._promotion_score(blocker, assignment, level, True)
                promoted.incumbent = True
            state.release(blocker)
            state.occupy(blocker, promoted)
            return True
        return False

    def _try_place_free(self, model_index: int) -> bool:
        """Admit a model into free memory and GPU time; True when placed.

        Pass 1: each (class, mode) at its target level, the model's current node first, then best-fit.
        Pass 2: per (class, mode), the best-scoring feasible level that fits somewhere (a higher level may
        need less GPU time, a lower one less memory); the best of those.
        """
        pairs = self._class_modes(model_index)
        self._memory_somewhere = bool(pairs)
        if not pairs:
            return False
        state = self.state
        targets = self._targets(model_index)
        preferred = self._preferred_node(model_index)
        if preferred is not None:
            preferred_class = self.class_of_node[preferred]
            for node_class, mode_index in pairs:
                if node_class != preferred_class:
                    continue
                level, gpu, host, busy, tolerance = targets[node_class * len(MODES) + mode_index]
                staying = self.tables.primary_value.item(node_class, mode_index, model_index, int(level))
                if staying * (1.0 + self.config.hysteresis_fraction) < self.best_target_score[model_index]:
                    # elsewhere is worth more even after its load (as relocation would judge it next round):
                    # resuming here would only be undone by a migration, a second reload
                    break
                if state.fits(preferred, int(gpu), int(host), busy, tolerance):
                    state.occupy(
                        model_index,
                        self._assignment_at(model_index, preferred, node_class, mode_index, int(level)),
                    )
                    return True
        # Nodes with room for the model's smallest option, per class (few once the cluster fills up).
        least_need = self._need_rows[model_index].tolist()
        roomy: dict[int, list[tuple[int, int]]] = {}
        roomy_count = 0
        with_memory = 0
        for node_class, _ in pairs:
            if node_class in roomy:
                continue
            sorted_free = state.free_sorted[node_class]
            gpu, host, busy, tolerance = least_need[node_class]
            position = bisect.bisect_left(sorted_free, (gpu, -1))
            with_memory += len(sorted_free) - position
            if len(sorted_free) - position > ROOMY_NODE_LIMIT:
                roomy_count = ROOMY_NODE_LIMIT + 1
                break
            # Few nodes have the memory: keep those that also have the host memory and GPU time.
            entries = [
                entry
                for entry in sorted_free[position:]
                if state.free_host[entry[1]] >= host
                and state.free_time[entry[1]] >= busy - 1e-9
                and state.used_time[entry[1]] <= tolerance + 1e-9
            ]
            roomy[node_class] = entries
            roomy_count += len(entries)
        self._memory_somewhere = with_memory > 0
        if roomy_count == 0:
            return False
        if roomy_count <= ROOMY_NODE_LIMIT:
            return self._place_among(model_index, pairs, roomy)
        for node_class, mode_index in pairs:
            level, gpu, host, busy, tolerance = targets[node_class * len(MODES) + mode_index]
            node = self._fit(node_class, int(gpu), int(host), busy, tolerance)
            if node is not None:
                state.occupy(
                    model_index, self._assignment_at(model_index, node, node_class, mode_index, int(level))
                )
                return True
        tables = self.tables
        best: tuple[float, int, int, int, int] | None = None
        for node_class, mode_index in pairs:
            largest = state.largest_free_gpu(node_class)
            max_time = state.max_free_time(node_class)
            scores = self.newcomer_score[node_class, mode_index, model_index]
            gpu_row = tables.gpu_bytes[mode_index, model_index]
            busy_row = tables.busy_fraction[node_class, mode_index, model_index]
            viable = np.flatnonzero(
                np.isfinite(scores) & (gpu_row <= largest) & (busy_row <= max_time + 1e-9)
            )
            for level in sorted(viable.tolist(), key=lambda j: (-scores[j], gpu_row[j])):
                if best is not None and scores[level] <= best[0]:
                    break
                node = self._fit(
                    node_class,
                    int(gpu_row[level]),
                    int(tables.host_bytes[model_index, level]),
                    float(busy_row[level]),
                    float(tables.tolerance[node_class, mode_index, model_index, level]),
                )
                if node is not None:
                    best = (float(scores[level]), node, node_class, mode_index, level)
                    break
        if best is None:
            return False
        _, node, node_class, mode_index, level = best
        state.occupy(model_index, self._assignment_at(model_index, node, node_class, mode_index, level))
        return True

    def _place_among(
        self, model_index: int, pairs: Sequence[tuple[int, int]], roomy: dict[int, list[tuple[int, int]]]
    ) -> bool:
        """Passes 1 and 2 of :meth:`_try_place_free`, exactly, when only a few nodes have room: every
        option of the model is checked against every such node at once."""
        tables, state = self.tables, self.state
        classes = [node_class for node_class, entries in roomy.items() if entries]
        # All roomy nodes side by side, class after class, each class in best-fit order (least free GPU
        # memory first, then node index), so the first fitting node of a class is its best fit.
        nodes = [node for node_class in classes for _, node in roomy[node_class]]
        starts = [0]
        for node_class in classes:
            starts.append(starts[-1] + len(roomy[node_class]))
        node_class_of = np.repeat(np.array(classes, dtype=np.intp), np.diff(starts))
        free_gpu = np.array([state.free_gpu[node] for node in nodes], dtype=np.float64)
        free_host = np.array([state.free_host[node] for node in nodes], dtype=np.float64)
        free_time = np.array([state.free_time[node] for node in nodes], dtype=np.float64)
        used_time = np.array([state.used_time[node] for node in nodes], dtype=np.float64)
        # [node, mode, level]
        feasible = np.isfinite(self.newcomer_score[node_class_of, :, model_index, :])
        busy = tables.busy_fraction[node_class_of, :, model_index, :]
        tolerance = tables.tolerance[node_class_of, :, model_index, :]
        fits = (
            feasible
            & (tables.gpu_bytes[None, :, model_index, :] <= free_gpu[:, None, None])
            & (tables.host_bytes[None, None, model_index, :] <= free_host[:, None, None])
            & (free_time[:, None, None] >= busy - 1e-9)
            & (used_time[:, None, None] <= tolerance + 1e-9)
        )
        if not fits.any():
            return False
        any_fit = np.logical_or.reduceat(fits, starts[:-1], axis=0).tolist()  # [class position, mode, level]
        position_of = {node_class: k for k, node_class in enumerate(classes)}

        def place(node_class: int, mode_index: int, level: int) -> bool:
            k = position_of[node_class]
            offset = int(np.argmax(fits[starts[k] : starts[k + 1], mode_index, level]))
            node = nodes[starts[k] + offset]
            state.occupy(model_index, self._assignment_at(model_index, node, node_class, mode_index, level))
            return True

        targets = self._targets(model_index)
        for node_class, mode_index in pairs:
            k = position_of.get(node_class)
            if k is not None:
                level = int(targets[node_class * len(MODES) + mode_index][0])
                if any_fit[k][mode_index][level]:
                    return place(node_class, mode_index, level)
        gpu_rows = tables.gpu_bytes[:, model_index, :].tolist()
        best: tuple[float, int, int, int] | None = None
        for node_class, mode_index in pairs:
            k = position_of.get(node_class)
            if k is None:
                continue
            row = any_fit[k][mode_index]
            if not any(row):
                continue
            scores = self.newcomer_score[node_class, mode_index, model_index].tolist()
            gpu_row = gpu_rows[mode_index]
            level = min((j for j, fit in enumerate(row) if fit), key=lambda j: (-scores[j], gpu_row[j]))
            if best is None or scores[level] > best[0]:
                best = (scores[level], node_class, mode_index, level)
        if best is None:
            return False
        return place(*best[1:])

    def _fit(self, node_class: int, gpu: int, host: int, busy: float, tolerance: float) -> int | None:
        """Best-fit node, remembering needs that found none (room only shrinks until something leaves)."""
        state = self.state
        if self._memo_version != state.version:
            self._fail_memo.clear()
            self._memo_version = state.version
        failures = self._fail_memo.setdefault(node_class, [])
        for g, h, b, t in failures:
            if gpu >= g and host >= h and busy >= b - 1e-12 and tolerance <= t + 1e-12:
                return None
        node = state.best_fit(node_class, gpu, host, busy, tolerance)
        if node is None and len(failures) < 16:
            failures.append((gpu, host, busy, tolerance))
        return node

    # -- making room ----------------------------------------------------------------------------------

    def _minimal_option(
        self, model_index: int, assignment: Assignment, for_priority: int | None = None
    ) -> MinimalOption | None:
        """The level a placed model may be demoted to, on its node and mode, to make room for a model of
        ``for_priority``: its minimal SLO-meeting level for the same or a higher priority, and for a
        lower one only a level that still serves its demand (a tier never gives up value for a lower
        tier). Returns GPU bytes, host bytes, value, busy share, tolerance and the level index."""
        protect = for_priority is not None and self.models[model_index].priority > for_priority
        key = (model_index, protect)
        cached = self._minimal_cache.get(key)
        if cached is not None and cached[0] is assignment:
            return cached[1]
        result = self._find_minimal_option(model_index, assignment, protect)
        self._minimal_cache[key] = (assignment, result)
        return result

    def _find_minimal_option(
        self, model_index: int, assignment: Assignment, protect: bool
    ) -> MinimalOption | None:
        node_class = self.class_of_node[assignment.node]
        mode_index = MODES.index(assignment.mode)
        tables = self.tables
        feasible = tables.feasible[node_class, mode_index, model_index].tolist()
        values = tables.primary_value[node_class, mode_index, model_index].tolist()
        floor = assignment.value - TIE_BREAK_SLACK * self.config.availability_value_tokens_per_second
        for level, fraction in enumerate(self._levels):
            if fraction >= assignment.resident_fraction - 1e-9:
                return None
            if not feasible[level] or (protect and values[level] < floor):
                continue
            return (
                int(tables.gpu_bytes[mode_index, model_index, level]),
                int(tables.host_bytes[model_index, level]),
                values[level],
                float(tables.busy_fraction[node_class, mode_index, model_index, level]),
                float(tables.tolerance[node_class, mode_index, model_index, level]),
                level,
            )
        return None

    def try_make_room(
        self,
        model_index: int,
        only_nodes: Sequence[int] | None = None,
        failed: dict[tuple[int, int, int], list[tuple[int, int, float, float]]] | None = None,
    ) -> bool:
        """Demote same-or-lower tiers / preempt strictly lower tiers on one node to admit the model.

        The nodes examined are, per class, the few with the most free memory, or else ``only_nodes``
        (the incremental planner's touched ones, in best-first order; ``failed`` then remembers which
        needs found no room on them, as the planner's own memo does for the usual nodes).
        """
        model = self.models[model_index]
        state, tables = self.state, self.tables
        best: tuple[float, float, int, int, int, int, list[tuple[int, str, int]]] | None = None
        for node_class, mode_index in self._class_modes(model_index):
            # The least memory that meets its SLO, and its best level: a busy model's least-memory level
            # may need more GPU time than any node has, where a higher one fits beside the others. The
            # best level is tried only where the least-memory one found no room (or only by taking it
            # from the model's own tier), and needs less time.
            minimal = int(self.min_level[node_class, mode_index, model_index])
            target = int(self.target_level[node_class, mode_index, model_index])
            time_at = tables.busy_fraction[node_class, mode_index, model_index]
            levels = (minimal, target) if time_at[target] < time_at[minimal] - 1e-9 else (minimal,)
            found_here = False
            for level in levels:
                if found_here:
                    break
                need_gpu = int(tables.gpu_bytes[mode_index, model_index, level])
                need_host = int(tables.host_bytes[model_index, level])
                need_busy = float(tables.busy_fraction[node_class, mode_index, model_index, level])
                need_tolerance = float(tables.tolerance[node_class, mode_index, model_index, level])
                gain_value = float(tables.primary_value[node_class, mode_index, model_index, level])
                # What the newcomer gains is net of its amortised load (it serves nothing while it loads).
                net_gain = gain_value * (1.0 - self._load_share(node_class, model_index, level))
                # Models of its own tier worth this much or more are not preempted for it.
                limit = net_gain / SAME_TIER_SWAP_GAIN
                memo_key = (model.priority, node_class, mode_index)
                memo = self.failed_room if only_nodes is None else failed if failed is not None else {}
                failures = memo.setdefault(memo_key, [])
                if any(
                    g <= need_gpu and h <= need_host and b <= need_busy + 1e-12 and lim >= limit - 1e-12
                    for g, h, b, lim in failures
                ):
                    # A smaller need, that could preempt as much of its tier, already found no room here in
                    # this tier; room only shrinks as it fills.
                    continue
                value_bound = False
                if only_nodes is None:
                    largest = state.free_sorted[node_class][-MAKE_ROOM_CANDIDATE_NODES:]
                    candidates = [node for _, node in reversed(largest)]
                else:
                    candidates = [node for node in only_nodes if self.class_of_node[node] == node_class]
                for node in candidates:
                    plan = self._room_plan(
                        model,
                        node,
                        (need_gpu, need_host, need_busy, need_tolerance),
                        same_tier_value_limit=limit,
                    )
                    value_bound = value_bound or self.room_cut
                    if plan is None:
                        continue
                    loss, steps = plan
                    same_tier_loss = sum(
                        self._step_loss(i, kind, model.priority, step_level)
                        for i, kind, step_level in steps
                        if self.models[i].priority >= model.priority
                    )
                    if same_tier_loss >= gain_value:
                        continue
                    # Preempting a model of the same tier must clearly beat keeping it (SAME_TIER_SWAP_GAIN),
                    # so that models of one tier do not take turns evicting each other.
                    swapped = [
                        i
                        for i, kind, _ in steps
                        if kind == "preempt" and self.models[i].priority == model.priority
                    ]
                    if swapped:
                        margin = sum(
                            self.config.hysteresis_fraction * abs(self._value_of(i)) for i in swapped
                        )
                        if SAME_TIER_SWAP_GAIN * same_tier_loss + margin >= net_gain:
                            value_bound = True
                            continue
                    # Where the newcomer's own tier comes out best (what it gains there, net of its load
                    # and of what its own tier loses: a slow node's room is cheap but serves little), and
                    # among near equals, where the lower tiers lose least.
                    # The best level is still tried where this one takes room from the newcomer's own
                    # tier: it may need less of the GPU's time, and so room from lower tiers only.
                    found_here = found_here or not any(
                        self.models[i].priority >= model.priority for i, _, _ in steps
                    )
                    tier_net = net_gain - same_tier_loss
                    if best is None or _better_room(tier_net, loss, best[0], best[1], self.config):
                        best = (tier_net, loss, node, node_class, mode_index, level, steps)
                if best is None and len(failures) < 32:
                    # Where no model of its own tier was left out for its value, no newcomer of this tier
                    # finds room for this need, however valuable; else only those allowed to preempt more.
                    failures.append((need_gpu, need_host, need_busy, limit if value_bound else float("inf")))
        if best is None:
            return False
        _, _, node, node_class, mode_index, level, steps = best
        self._carry_out(steps, model_index)
        state.occupy(model_index, self._assignment_at(model_index, node, node_class, mode_index, level))
        return True

    def _carry_out(self, steps: Sequence[tuple[int, str, int]], for_model: int) -> None:
        for victim, kind, level in steps:
            if kind == "preempt":
                self.state.release(victim)
                self.state.preempted_by[victim] = for_model
            else:
                self._demote_to(victim, level)

    def _step_loss(self, model_index: int, kind: str, for_priority: int, level: int = -1) -> float:
        """Value a model loses to a room-making step (a demotion to ``level``, or a preemption)."""
        assignment = self.state.assignment[model_index]
        if assignment is None:
            return 0.0
        if kind == "preempt":
            return assignment.value
        if level >= 0:
            node_class = self.class_of_node[assignment.node]
            mode_index = MODES.index(assignment.mode)
            return assignment.value - self.tables.primary_value.item(
                node_class, mode_index, model_index, level
            )
        minimal = self._minimal_option(model_index, assignment, for_priority)
        return 0.0 if minimal is None else assignment.value - minimal[2]

    def _room_candidates(self, priority: int, node: int, lower_only: bool) -> RoomCandidates:
        """Demotions (cheapest loss per freed byte first) and preemptions (lowest priority, least value
        first) on ``node`` that could make room for a model of ``priority``; cached per node state."""
        state = self.state
        key = (node, priority, lower_only)
        cached = self._room_cache.get(key)
        if cached is not None and cached.version == state.node_version[node]:
            return cached
        demotions: list[tuple[float, str, int, int, int, float, float, float, int]] = []
        preemptions: list[tuple[int, float, str, int, int, int, float]] = []
        most_freed: dict[int, int] = {}
        same_tier_extra: dict[int, int] = {}
        for other in state.models_on_node[node]:
            other_model = self.models[other]
            assignment = state.assignment[other]
            if assignment is None or (lower_only and other_model.priority >= priority):
                continue
            # A non-preemptible model keeps running, but may be demoted within its SLO; a higher
            # priority one only as far as it still serves its demand.
            minimal = self._minimal_option(other, assignment, priority)
            if minimal is not None:
                freed = assignment.gpu_bytes - minimal[0]
                if freed > 0:
                    loss = assignment.value - minimal[2]
                    demotions.append(
                        (
                            loss / freed,
                            other_model.name,
                            other,
                            freed,
                            assignment.host_bytes - minimal[1],
                            minimal[3],
                            minimal[4],
                            loss,
                            minimal[5],
                        )
                    )
                    most_freed[other] = freed
            # Strictly lower tiers may be preempted; the same tier too (not for promotions, which take
            # room from lower tiers only) when what the newcomer gains outweighs what it loses, which
            # try_make_room weighs.
            lower = other_model.priority < priority or (not lower_only and other_model.priority == priority)
            if lower and other_model.preemptible:
                preemptions.append(
                    (
                        other_model.priority,
                        assignment.value,
                        other_model.name,
                        other,
                        assignment.gpu_bytes,
                        assignment.host_bytes,
                        assignment.value,
                    )
                )
                if other_model.priority == priority:
                    same_tier_extra[other] = assignment.gpu_bytes - most_freed.get(other, 0)
                most_freed[other] = assignment.gpu_bytes
        demotions.sort()
        preemptions.sort()
        staying: dict[int, tuple[float, float]] = {}
        for other in state.models_on_node[node]:
            a = state.assignment[other]
            if a is not None:
                staying[other] = (a.busy, a.tolerance)
        candidates = RoomCandidates(
            state.node_version[node],
            demotions,
            preemptions,
            sum(most_freed.values()),
            sum(most_freed.values()) - sum(same_tier_extra.values()),
            min(
                (value for tier, value, *_ in preemptions if tier == priority),
                default=float("inf"),
            ),
            staying,
            sum(busy for busy, _ in staying.values()),
        )
        self._room_cache[key] = candidates
        return candidates

    def _room_plan(
        self,
        model: ModelDemand,
        node: int,
        need: tuple[int, int, float, float],
        lower_only: bool = False,
        same_tier_value_limit: float = 0.0,
    ) -> tuple[float, list[tuple[int, str, int]]] | None:
        """Cheapest demotions then preemptions on ``node`` that make room; None when impossible.

        ``need`` is (GPU bytes, host bytes, busy share, tolerance) of the model to admit. Models of its own
        tier are preempted only below ``same_tier_value_limit`` (value); ``self.room_cut`` tells whether
        that limit left one out.
        """
        self.room_cut = False
        state = self.state
        need_gpu, need_host, need_busy, need_tolerance = need
        free_gpu, free_host = state.free_gpu[node], state.free_host[node]
        candidates = self._room_candidates(model.priority, node, lower_only)
        # Busy share and tolerance of each model that would stay on the node.
        staying = dict(candidates.staying)
        # A running estimate of the busy share of those staying: it only rejects clear misses quickly
        # (by more than float noise); whether the room is enough is always decided by the exact sums.
        used_estimate = candidates.used_time

        def enough() -> bool:
            if free_gpu < need_gpu or free_host < need_host:
                return False
            if used_estimate > need_tolerance + 1e-6 or used_estimate + need_busy > state.max_busy + 1e-6:
                return False
            used = sum(busy for busy, _ in staying.values())
            cap = min([state.max_busy, need_tolerance + need_busy] + [b + t for b, t in staying.values()])
            return used + need_busy <= cap + 1e-9 and used <= need_tolerance + 1e-9

        if enough():
            return 0.0, []
        if free_gpu + candidates.most_freed_gpu < need_gpu:
            return None  # not even demoting and preempting everything it may would free the memory
        if (
            free_gpu + candidates.most_freed_lower_gpu < need_gpu
            and candidates.least_same_tier_value >= same_tier_value_limit
        ):
            self.room_cut = True
            return None  # only models of its own tier worth too much to preempt would free enough
        steps: list[tuple[int, str, int]] = []
        loss_total = 0.0
        demoted: dict[int, tuple[int, int, float]] = {}
        preempted: dict[int, tuple[int, int, float]] = {}
        for _, _, other, freed_gpu, host_delta, busy, tolerance, loss, level in candidates.demotions:
            if enough():
                break
            if free_host + host_delta < 0:
                continue
            free_gpu += freed_gpu
            free_host += host_delta
            used_estimate += busy - staying[other][0]
            staying[other] = (busy, tolerance)
            loss_total += loss
            demoted[other] = (freed_gpu, host_delta, loss)
            steps.append((other, "demote", level))
        for priority, _, _, other, gpu, host, value in candidates.preemptions:
            if enough():
                break
            if priority == model.priority and value >= same_tier_value_limit:
                self.room_cut = True
                break  # same tier, least valuable first: none from here on is worth preempting
            if priority >= model.priority:
                # Undone, the preemption gives back the model's whole original footprint.
                preempted[other] = (gpu, host, value)
            if other in demoted:
                # Preempting a model already demoted frees its demoted footprint, not its original one
                # (the demotion freed GPU memory and took host memory: ``host_delta`` is negative).
                freed_gpu, host_delta, demotion_loss = demoted.pop(other)
                gpu -= freed_gpu
                host -= host_delta
                loss_total -= demotion_loss
                steps = [step for step in steps if step[0] != other]
            free_gpu += gpu
            free_host += host
            left = staying.pop(other, None)
            if left is not None:
                used_estimate -= left[0]
            loss_total += value
            steps.append((other, "preempt", -1))
        # Demotions come first (they lose least per byte), but once preemptions freed the memory some are
        # needless, and each made a model slower: more of the GPU's time, less room for others' turns
        # (a demotion can be what leaves the newcomer no time). Undo every one the memory allows, the
        # costliest first.
        for other in sorted(demoted, key=lambda i: (-demoted[i][2], i)):
            freed_gpu, host_delta, demotion_loss = demoted[other]
            if free_gpu - freed_gpu < need_gpu or free_host - host_delta < need_host:
                continue
            free_gpu -= freed_gpu
            free_host -= host_delta
            used_estimate += candidates.staying[other][0] - staying[other][0]
            staying[other] = candidates.staying[other]
            loss_total -= demotion_loss
            steps = [step for step in steps if step[0] != other]
        # Likewise a preemption in the newcomer's own tier taken early (least valuable first) that a later,
        # larger one made needless: keep that model running where the room and the GPU's time still
        # suffice, the costliest first. (A lower tier's needless preemption stands: its models are placed
        # again in their own tier's round where room is left, and a higher tier arriving with a backlog,
        # a burst its last minute's rate understates, is better served by the slack: undoing those too
        # cut the production models' goodput in the priority-burst-idle simulation from 115 to 95 tok/s.)
        if preempted and enough():
            for other in sorted(preempted, key=lambda i: (-preempted[i][2], i)):
                gpu, host, value = preempted[other]
                if free_gpu - gpu < need_gpu or free_host - host < need_host:
                    continue
                free_gpu -= gpu
                free_host -= host
                staying[other] = candidates.staying[other]
                used_estimate += staying[other][0]
                if enough():
                    loss_total -= value
                    steps = [step for step in steps if step[0] != other]
                    continue
                free_gpu += gpu
                free_host += host
                used_estimate -= staying.pop(other)[0]
        if enough():
            return loss_total, steps
        return None

    def _demote_to(self, model_index: int, level: int) -> None:
        state = self.state
        assignment = state.assignment[model_index]
        if assignment is None:
            return
        node_class = self.class_of_node[assignment.node]
        mode_index = MODES.index(assignment.mode)
        state.release(model_index)
        demoted = self._assignment_at(model_index, assignment.node, node_class, mode_index, level)
        if assignment.incumbent:
            model = self.models[model_index]
            cost = demote_cost(
                model, self.nodes[assignment.node], assignment.resident_fraction, demoted.resident_fraction
            )
            demoted.score = option_score(demoted.value, cost, False, self.config)
            demoted.full_score = option_score(demoted.full_value, cost, False, self.config)
        state.occupy(model_index, demoted)

    # -- promotion ------------------------------------------------------------------------------------

    def promote(self, tier: Sequence[int], full: bool = False) -> int:
        """Spend free memory on the given placed models, best marginal value per byte first.

        Tiers promote on primary value; the final pass (``full``) also values throughput beyond demand.
        Returns how many models were promoted.
        """
        promoted_count = 0
        state, tables = self.state, self.tables
        proposals: list[tuple[float, str, int, int]] = []
        for model_index in tier:
            assignment = state.assignment[model_index]
            if assignment is None:
                continue
            best = self._best_promotion(model_index, assignment, unlimited=True, full=full)
            if best is None:
                continue
            gain, level = best
            extra = (
                int(tables.gpu_bytes[MODES.index(assignment.mode), model_index, level]) - assignment.gpu_bytes
            )
            proposals.append((-gain / max(1, extra), self.models[model_index].name, model_index, level))
        for _, _, model_index, wanted_level in sorted(proposals):
            assignment = state.assignment[model_index]
            if assignment is None:
                continue
            best = self._best_promotion(model_index, assignment, unlimited=False, full=full)
            if best is None:
                if not full and self._promote_with_room(model_index, assignment, wanted_level):
                    promoted_count += 1
                continue
            _, level = best
            node_class = self.class_of_node[assignment.node]
            mode_index = MODES.index(assignment.mode)
            promoted = self._assignment_at(model_index, assignment.node, node_class, mode_index, level)
            if assignment.incumbent:
                promoted.score = self._promotion_score(model_index, assignment, level, False)
                promoted.full_score = self._promotion_score(model_index, assignment, level, True)
                promoted.incumbent = True
            state.release(model_index)
            state.occupy(model_index, promoted)
            promoted_count += 1
        return promoted_count

    def _promote_with_room(self, model_index: int, assignment: Assignment, level: int) -> bool:
        """Promote a model whose demand is not served by taking room from strictly lower tiers on its node
        (demoting them within their SLO, or preempting them)."""
        state, tables = self.state, self.tables
        model = self.models[model_index]
        node, node_class = assignment.node, self.class_of_node[assignment.node]
        mode_index = MODES.index(assignment.mode)
        gain = float(tables.primary_value[node_class, mode_index, model_index, level]) - assignment.value
        if gain < self.config.availability_value_tokens_per_second:
            return False  # only served throughput justifies displacing others, not tie-breaks
        if not any(self.models[i].priority < model.priority for i in state.models_on_node[node]):
            return False
        need = (
            int(tables.gpu_bytes[mode_index, model_index, level]),
            int(tables.host_bytes[model_index, level]),
            float(tables.busy_fraction[node_class, mode_index, model_index, level]),
            float(tables.tolerance[node_class, mode_index, model_index, level]),
        )
        state.release(model_index)
        room = self._room_plan(model, node, need, lower_only=True)
        if room is None:
            state.occupy(model_index, assignment)
            return False
        self._carry_out(room[1], model_index)
        promoted = self._assignment_at(model_index, node, node_class, mode_index, level)
        if assignment.incumbent:
            promoted.score = self._promotion_score(model_index, assignment, level, False)
            promoted.full_score = self._promotion_score(model_index, assignment, level, True)
            promoted.incumbent = True
        state.occupy(model_index, promoted)
        return True

    def _promotion_score(self, model_index: int, assignment: Assignment, level: int, full: bool) -> float:
        node_class = self.class_of_node[assignment.node]
        mode_index = MODES.index(assignment.mode)
        table = self.tables.value if full else self.tables.primary_value
        value = table.item(node_class, mode_index, model_index, level)
        if not assignment.incumbent:
            return value * (1.0 - self._load_share(node_class, model_index, level))
        now = self.current.get(self.models[model_index].name)
        cost = promote_cost(
            self.models[model_index],
            self.nodes[assignment.node],
            now.resident_fraction if now is not None else assignment.resident_fraction,
            self._levels[level],
        )
        return value - amortised_cost_tokens_per_second(cost, value, self.config.amortisation_horizon_seconds)

    def _best_promotion(
        self, model_index: int, assignment: Assignment, unlimited: bool, full: bool = False
    ) -> tuple[float, int] | None:
        """(gain, level) of the best higher level on the same node and mode, if it beats the current score."""
        levels = self._levels
        if levels[-1] <= assignment.resident_fraction + 1e-9:
            return None  # fully resident already
        node_class = self.class_of_node[assignment.node]
        mode_index = MODES.index(assignment.mode)
        tables, state = self.tables, self.state
        feasible = tables.feasible[node_class, mode_index, model_index].tolist()
        best: tuple[float, int] | None = None
        threshold = assignment.full_score if full else assignment.score
        for level in range(len(levels) - 1, -1, -1):
            if levels[level] <= assignment.resident_fraction + 1e-9:
                break
            if not feasible[level]:
                continue
            extra_gpu = int(tables.gpu_bytes.item(mode_index, model_index, level)) - assignment.gpu_bytes
            extra_host = int(tables.host_bytes.item(model_index, level)) - assignment.host_bytes
            extra_busy = (
                tables.busy_fraction.item(node_class, mode_index, model_index, level) - assignment.busy
            )
            tolerance = tables.tolerance.item(node_class, mode_index, model_index, level)
            if not unlimited and not state.fits(
                assignment.node, extra_gpu, extra_host, extra_busy, tolerance
            ):
                continue
            score = self._promotion_score(model_index, assignment, level, full)
            # An incumbent's score carries the hysteresis bonus, so it must be beaten by a clear margin.
            if score > threshold + 1e-9 and (best is None or score - threshold > best[0]):
                best = (score - threshold, level)
        return best

    # -- incremental ----------------------------------------------------------------------------------

    def refresh_model(self, model_index: int, model: ModelDemand, row: ClassTables) -> None:
        """Replace one model's demand and its rows of the option tables (``row`` holds just that model)."""
        self.models[model_index] = model
        self.priorities[model_index] = model.priority
        tables = self.tables
        tables.decode_tokens_per_second[:, :, model_index, :] = row.decode_tokens_per_second[:, :, 0, :]
        tables.busy_fraction[:, :, model_index, :] = row.busy_fraction[:, :, 0, :]
        tables.tolerance[:, :, model_index, :] = row.tolerance[:, :, 0, :]
        tables.value[:, :, model_index, :] = row.value[:, :, 0, :]
        tables.primary_value[:, :, model_index, :] = row.primary_value[:, :, 0, :]
        tables.feasible[:, :, model_index, :] = row.feasible[:, :, 0, :]
        tables.load_seconds[:, model_index, :] = row.load_seconds[:, 0, :]
        tables.gpu_bytes[:, model_index, :] = row.gpu_bytes[:, 0, :]
        tables.host_bytes[model_index, :] = row.host_bytes[0, :]
        derived = derive_scores(row, self.usable_class, self.config.amortisation_horizon_seconds)
        self.newcomer_score[:, :, model_index, :] = derived.newcomer_score[:, :, 0, :]
        self.target_level[:, :, model_index] = derived.target_level[:, :, 0]
        self.min_level[:, :, model_index] = derived.min_level[:, :, 0]
        self.class_mode_order[model_index] = derived.class_mode_order[0]
        self.best_target_score[model_index] = derived.best_target_score[0]
        self.has_option[model_index] = derived.has_option[0]
        self._flat_target_score[:, model_index] = derived.flat_target_score[:, 0]
        self._fill_model_lists(slice(model_index, model_index + 1))

    def reseat(self, model_index: int) -> None:
        """Re-seat one changed model as a full plan seats a running one: it stays if its placement is still
        valid, and where its node no longer fits everyone the least important leave (it may be one of
        them). Whoever is left without a place is for the caller to admit afresh."""
        state = self.state
        previous = state.release(model_index)
        if (
            previous is None
            or not self.models[model_index].wanted
            or not self.nodes[previous.node].accepts_work
        ):
            return
        option = self.option_at(model_index, previous.node, previous.resident_fraction, previous.mode)
        if not self._keeps(model_index, option):
            return
        state.occupy(
            model_index,
            Assignment(
                node=previous.node,
                resident_fraction=previous.resident_fraction,
                mode=previous.mode,
                gpu_bytes=option.gpu_bytes,
                host_bytes=option.host_bytes,
                busy=option.busy_fraction,
                tolerance=option.tolerance,
                value=option.primary_value,
                score=option_score(option.primary_value, ZERO_COST, True, self.config),
                full_value=option.value,
                full_score=option_score(option.value, ZERO_COST, True, self.config),
                incumbent=True,
            ),
        )
        self._evict_until_fit(previous.node)

    def with_room_on(self, model_indices: Sequence[int], nodes: Sequence[int]) -> list[int]:
        """The models (in the given order) with room for one of their feasible options on at least one of
        ``nodes`` (GPU and host memory, GPU time, and the others' tolerance and their own)."""
        found = self.room_by_node(model_indices, nodes)
        anywhere = set().union(*found.values()) if found else set()
        return [i for i in np.asarray(model_indices, dtype=np.intp).tolist() if i in anywhere]

    def room_by_node(self, model_indices: Sequence[int], nodes: Sequence[int]) -> dict[int, set[int]]:
        """Per node of ``nodes``, the models of ``model_indices`` that :meth:`try_place` could put there: with
        room for a feasible option, counting GPU time a faster blocker would give up (see
        :meth:`_try_unblock`): the GPU's time left, not only what the others' SLOs leave."""
        found: dict[int, set[int]] = {node: set() for node in nodes}
        if not len(model_indices) or not len(nodes):
            return found
        state = self.state
        classes = np.array([self.class_of_node[node] for node in nodes], dtype=np.intp)
        free_gpu = np.array([state.free_gpu[node] for node in nodes], dtype=np.float64)
        free_host = np.array([state.free_host[node] for node in nodes], dtype=np.float64)
        used_time = np.array([state.used_time[node] for node in nodes], dtype=np.float64)
        free_time = np.maximum(
            np.array([state.free_time[node] for node in nodes], dtype=np.float64), state.max_busy - used_time
        )
        accepting = np.array([self.nodes[node].accepts_work for node in nodes], dtype=bool)
        indices = np.asarray(model_indices, dtype=np.intp)
        needs = self._need_rows[indices][:, classes, :]  # [model, node, field]
        # First what each resource alone rules out (cheap), then every option of the rest, exactly.
        plausible = (
            accepting
            & (needs[:, :, 0] <= free_gpu)
            & (needs[:, :, 1] <= free_host)
            & (free_time >= needs[:, :, 2] - 1e-9)
            & (used_time <= needs[:, :, 3] + 1e-9)
        )
        tables = self.tables
        for k in np.flatnonzero(plausible.any(axis=0)).tolist():
            members = indices[plausible[:, k]]
            node_class = int(classes[k])
            fits = (
                np.isfinite(self.newcomer_score[node_class][:, members, :])
                & (tables.gpu_bytes[:, members, :] <= free_gpu[k])
                & (tables.host_bytes[None, members, :] <= free_host[k])
                & (free_time[k] >= tables.busy_fraction[node_class][:, members, :] - 1e-9)
                & (used_time[k] <= tables.tolerance[node_class][:, members, :] + 1e-9)
            )  # [mode, model, level]
            found[nodes[k]] = set(members[fits.any(axis=(0, 2))].tolist())
        return found

    def could_make_room_on(self, model_indices: Sequence[int], nodes: Sequence[int]) -> list[int]:
        """The models (in the given order) whose smallest option could fit on one of ``nodes`` if every
        model there that may make room for them did (an upper bound on what making room frees)."""
        if not len(model_indices) or not len(nodes):
            return []
        indices = np.asarray(model_indices, dtype=np.intp)
        distinct, rows = np.unique(self.priorities[indices], return_inverse=True)
        bounds = np.array(
            [[self.room_bound(node, priority) for node in nodes] for priority in distinct.tolist()],
            dtype=np.float64,
        )
        classes = np.array([self.class_of_node[node] for node in nodes], dtype=np.intp)
        least_gpu = self._need_rows[indices][:, classes, 0]  # [model, node]
        return indices[(least_gpu <= bounds[rows]).any(axis=1)].tolist()  # type: ignore[no-any-return]

    def room_bound(self, node: int, priority: int) -> int:
        """The most GPU memory demoting and preempting could free on a node for a model of ``priority``,
        with what is free already (an upper bound: making room never frees more)."""
        return self.state.free_gpu[node] + self._room_candidates(priority, node, False).most_freed_gpu

    def admission_order(self, model_indices: Sequence[int]) -> list[int]:
        """The models in a full plan's admission order: highest priority first; within a priority, by value
        density (best score per GPU byte of the smallest option; the classic greedy order for a
        knapsack), then name (models are indexed in name order)."""
        indices = np.asarray(model_indices, dtype=np.intp)
        if not len(indices):
            return []
        smallest = np.maximum(1.0, self.tables.gpu_bytes[:, indices, :].min(axis=(0, 2)))
        density = -self.best_target_score[indices] / smallest
        order = np.lexsort((indices, density, -self.priorities[indices]))
        return indices[order].tolist()  # type: ignore[no-any-return]

    # -- driver ---------------------------------------------------------------------------------------

    def relocate_outgrown(self, only: Sequence[int] | None = None) -> int:
        """Move running models whose demand outgrew their node to a node that serves it, where there is
        free room and the throughput gained, net of the amortised cost of the move (the model serves
        nothing while it reloads), beats staying by the hysteresis margin. Highest gain first.

        Without this a model placed while its demand was unknown or small stays on a slow GPU for good, as
        long as it keeps its per-sequence SLO there. ``only``: consider these models only. Returns how
        many moved."""
        state, tables, config = self.state, self.tables, self.config
        proposals: list[tuple[float, str, int]] = []
        for i in range(len(state.assignment)) if only is None else only:
            a = state.assignment[i]
            if a is None or not a.incumbent:
                continue
            model = self.models[i]
            if not model.preemptible:
                continue  # a move stops it while it reloads: a preemption in all but name
            demand = model.demand_decode_tokens_per_second
            if demand is None or demand <= 0:
                continue
            node_class = self.class_of_node[a.node]
            level = self._level_index.get(a.resident_fraction)
            if level is None:
                continue
            rate = tables.decode_tokens_per_second.item(node_class, MODES.index(a.mode), i, level)
            unserved = unserved_tokens_per_second(model, rate, config)
            if unserved > 0:
                proposals.append((-unserved, model.name, i))
        moved = 0
        for _, _, i in sorted(proposals):
            current = state.assignment[i]
            if current is None:
                continue
            model = self.models[i]
            from_node = self.nodes[current.node]
            best: tuple[float, int, int, int, int] | None = None
            for node_class, mode_index in self._class_modes(i):
                level = int(self.target_level[node_class, mode_index, i])
                value = tables.primary_value.item(node_class, mode_index, i, level)
                gpu = int(tables.gpu_bytes.item(mode_index, i, level))
                host = int(tables.host_bytes.item(i, level))
                busy = tables.busy_fraction.item(node_class, mode_index, i, level)
                tolerance = tables.tolerance.item(node_class, mode_index, i, level)
                node = state.best_fit(node_class, gpu, host, busy, tolerance)
                if node is None or node == current.node:
                    continue
                cost = migrate_cost(model, from_node, self.nodes[node], self._levels[level])
                gain = (
                    value
                    - amortised_cost_tokens_per_second(cost, value, config.amortisation_horizon_seconds)
                    - current.value * (1.0 + config.hysteresis_fraction)
                )
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, node, node_class, mode_index, level)
            if best is None:
                moved += self._relocate_making_room(i, current)
                continue
            _, node, node_class, mode_index, level = best
            state.release(i)
            state.occupy(i, self._assignment_at(i, node, node_class, mode_index, level))
            moved += 1
        return moved

    def _relocate_making_room(self, model_index: int, current: Assignment) -> int:
        """Move an outgrown model where no node has free room for it by making room on one (as a newcomer
        would: demoting, preempting lower tiers, or preempting less valuable models of its own tier),
        when the value gained, net of the amortised move, beats staying, what the room costs its own tier
        and the hysteresis margin. Returns 1 when it moved."""
        state, tables, config = self.state, self.tables, self.config
        model = self.models[model_index]
        from_node = self.nodes[current.node]
        best: tuple[float, int, int, int, int, list[tuple[int, str, int]]] | None = None
        for node_class, mode_index in self._class_modes(model_index):
            level = int(self.target_level[node_class, mode_index, model_index])
            value = tables.primary_value.item(node_class, mode_index, model_index, level)
            if value <= current.value * (1.0 + config.hysteresis_fraction):
                continue
            need = (
                int(tables.gpu_bytes.item(mode_index, model_index, level)),
                int(tables.host_bytes.item(model_index, level)),
                tables.busy_fraction.item(node_class, mode_index, model_index, level),
                tables.tolerance.item(node_class, mode_index, model_index, level),
            )
            largest = state.free_sorted[node_class][-MAKE_ROOM_CANDIDATE_NODES:]
            for _, node in reversed(largest):
                if node == current.node:
                    continue
                plan = self._room_plan(
                    model,
                    node,
                    need,
                    same_tier_value_limit=max(0.0, value - current.value * (1.0 + config.hysteresis_fraction))
                    / SAME_TIER_SWAP_GAIN,
                )
                if plan is None or not plan[1]:
                    continue  # no room to make (free room was looked for already)
                _, steps = plan
                own_tier = [
                    (i, kind, lvl) for i, kind, lvl in steps if self.models[i].priority >= model.priority
                ]
                loss = sum(
                    self._step_loss(i, kind, model.priority, lvl)
                    * (SAME_TIER_SWAP_GAIN if kind == "preempt" else 1.0)
                    + (config.hysteresis_fraction * abs(self._value_of(i)) if kind == "preempt" else 0.0)
                    for i, kind, lvl in own_tier
                )
                cost = migrate_cost(model, from_node, self.nodes[node], self._levels[level])
                gain = (
                    value
                    - amortised_cost_tokens_per_second(cost, value, config.amortisation_horizon_seconds)
                    - current.value * (1.0 + config.hysteresis_fraction)
                    - loss
                )
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, node, node_class, mode_index, level, steps)
        if best is None:
            return 0
        _, node, node_class, mode_index, level, steps = best
        self._carry_out(steps, model_index)
        state.release(model_index)
        state.occupy(model_index, self._assignment_at(model_index, node, node_class, mode_index, level))
        return 1

    def make_room_after_promotion(self, tiers: dict[int, list[int]]) -> list[int]:
        """Make room once more for the models still left out, highest priority first: the final
        promotion raised models into free memory, which a demotion can now give back where a model left
        out fits (the next re-plan, starting from the promoted state, would otherwise do it then: the plan
        would not be a fixed point). Room found earlier to be short is looked at again."""
        self.failed_room.clear()
        placed: list[int] = []
        for priority in sorted(tiers, reverse=True):
            left_out = [i for i in tiers[priority] if self.state.assignment[i] is None and self.has_option[i]]
            failures_in_a_row = 0
            for model_index in self.admission_order(left_out):
                if failures_in_a_row >= MAKE_ROOM_FAILURE_LIMIT:
                    break
                if self.try_make_room(model_index):
                    placed.append(model_index)
                    failures_in_a_row = 0
                else:
                    failures_in_a_row += 1
        return placed

    def solve(self) -> GreedyResult:
        """Run all tiers, highest priority first."""
        self.seat_incumbents()
        self.relocate_outgrown()
        # GPU time at the start: a lower tier's promotions (a faster model shares better) may give back time
        # a higher tier found short; the late round below retries on every node whose time grew since.
        time_before = list(zip(self.state.free_time, self.state.used_time, strict=True))
        tiers: dict[int, list[int]] = {}
        for model_index, model in enumerate(self.models):
            if model.wanted:
                tiers.setdefault(model.priority, []).append(model_index)
        smallest_gpu_bytes = self.tables.gpu_bytes.min(axis=(0, 2)) if self.models else np.zeros(0)
        for priority in sorted(tiers, reverse=True):
            members = tiers[priority]
            newcomers = [i for i in members if self.state.assignment[i] is None and self.has_option[i]]
            # Value density first (see density_key; the same, vectorised).
            newcomers.sort(
                key=lambda i: (
                    -self.best_target_score[i] / max(1.0, float(smallest_gpu_bytes[i])),
                    self.models[i].name,
                )
            )
            failures_in_a_row = 0
            for model_index in newcomers:
                if self.try_place(model_index):
                    continue
                if failures_in_a_row >= MAKE_ROOM_FAILURE_LIMIT:
                    continue
                failures_in_a_row = 0 if self.try_make_room(model_index) else failures_in_a_row + 1
            # A model of this tier preempted early for one newcomer (the least valuable goes first) may
            # have room again once a later newcomer's make-room preempted a larger one: keep it running.
            # (Lower tiers' preempted models are tried in their own round.)
            for model_index in members:
                if (
                    self.state.assignment[model_index] is None
                    and model_index in self.state.preempted_by
                    and self.has_option[model_index]
                    and self.try_place(model_index)
                ):
                    del self.state.preempted_by[model_index]
            self.promote(members)
        # Memory nobody needs goes to throughput beyond demand (lower latency), highest priority first.
        placed = [i for i in range(len(self.models)) if self.state.assignment[i] is not None]
        placed.sort(key=lambda i: (-self.models[i].priority, self.models[i].name))
        time_before_final = list(zip(self.state.free_time, self.state.used_time, strict=True))
        self.promote(placed, full=True)
        # Promotions raise rates, so models that could not share a GPU before may fit now: one more round,
        # for the models that have room on a node whose GPU time the promotions freed (the final pass's, or
        # a lower tier's since the higher tiers ran).
        late: list[int] = []
        freed = [
            node
            for node in range(len(self.nodes))
            if any(
                self.state.free_time[node] > free_time or self.state.used_time[node] < used_time
                for free_time, used_time in (time_before[node], time_before_final[node])
            )
        ]
        if freed:
            unplaced = [
                i
                for priority in sorted(tiers, reverse=True)
                for i in tiers[priority]
                if self.state.assignment[i] is None and self.has_option[i]
            ]
            late = self.with_room_on(unplaced, freed)
        placed_late = [i for i in late if self.try_place(i)]
        if placed_late:
            self.promote(placed_late, full=True)
        placed_late = self.make_room_after_promotion(tiers)
        if placed_late:
            self.promote(placed_late, full=True)
        return GreedyResult(assignment=self.state.assignment, preempted_by=self.state.preempted_by)
