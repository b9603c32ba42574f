"""The greedy's first layer: its inputs (option tables, newcomer scores), its working state, and seating
the models already running.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from residency_operator.planner.costs import (
    ZERO_COST,
)
from residency_operator.planner.greedy_state import Assignment, GreedyState
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

TIE_BREAK_SLACK = 0.1
"""A higher-priority model may be demoted for a lower one only if its value drops by no more than this
share of the availability value (memory and time tie-breaks, not served throughput)."""


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


class GreedyBase:
    """The greedy's inputs and working state, the options it reads, and the first stage: models already
    running keep their placement (seated first, evicting the least valuable where a node shrank)."""

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
        """Whether the models seated on a node fit it: memory exactly; GPU time (an estimate from the last
        minute's demand) within ``PlannerConfig.incumbent_time_slack`` of all of the GPU's and of what each
        model's SLO tolerates of the others, so that a swing of the estimate does not move a running model
        to another node (a cold load there, serving nothing meanwhile)."""
        state = self.state
        slack = self.config.incumbent_time_slack
        time_slack = 1.0 - self.config.max_gpu_busy_fraction + slack
        if state.free_gpu[node] < 0 or state.free_host[node] < 0 or state.free_time[node] < -time_slack:
            return False
        # Every model keeps its SLO beside the others (a tightened SLO may no longer tolerate them).
        used = state.used_time[node]
        return all(
            used - a.busy <= a.tolerance + slack + 1e-9
            for i in state.models_on_node[node]
            if (a := state.assignment[i]) is not None
        )

    def _value_of(self, model_index: int) -> float:
        assignment = self.state.assignment[model_index]
        return 0.0 if assignment is None else assignment.value

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
