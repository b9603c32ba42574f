"""Incremental re-planning: one model changed, everything else stays where the last plan put it.

The operator reconciles one LLMModel at a time; re-solving ten thousand models for each event would be
wasteful. :class:`IncrementalPlanner` makes the same greedy plan as :func:`~residency_operator.planner.plan`
once, keeps the greedy's state (free room per node, option tables), takes each plan as applied, and on a
change re-plans only what the change touches:

1. the changed model: it stays if its placement is still valid and fits, else it moves or makes room;
2. whatever it demoted or preempted gets one chance to land elsewhere;
3. room given back on a node (a model left, shrank or moved) goes to models that had none, most
   important first, exactly as a full plan's admission would place them;
4. models on the touched nodes are promoted into free memory where that serves more, as a full plan's
   last passes do.

Nothing here costs time in proportion to the number of models (the tables gain one row, each step looks
at the touched nodes only), so a change costs milliseconds at ten thousand models. A periodic full
:func:`~residency_operator.planner.plan` repairs whatever the local view leaves suboptimal.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import numpy as np

from residency_operator.planner.actions import assemble_plan
from residency_operator.planner.demand import is_idle, yield_if_idle
from residency_operator.planner.fill import fill_free_memory
from residency_operator.planner.greedy import MAKE_ROOM_FAILURE_LIMIT, Assignment
from residency_operator.planner.milp import count_options
from residency_operator.planner.options import build_class_tables, usable_gpu_bytes
from residency_operator.planner.plan import collector_paused, greedy_solve
from residency_operator.planner.problem import PlanningProblem
from residency_operator.planner.types import (
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannerConfig,
    SensitivityProfile,
    with_backlog,
)

SPARE_PREFIX = "~spare/"
"""Names of the unwanted rows kept for models that arrive later (``~`` sorts after every namespace, so the
spare rows come last and a full plan over the same models plans them the same)."""
ROOM_MISS_LIMIT = 64
"""After this many models in a row of one tier had room by the per-resource bounds but found no place
(the bounds are optimistic: they count GPU time a blocker might give up), the tier stops trying; a
periodic full plan catches what this leaves."""


class IncrementalPlanner:
    """Holds the last plan and re-plans single-model changes in milliseconds."""

    def __init__(
        self,
        models: Iterable[ModelDemand],
        nodes: Iterable[NodeCapacity],
        current_placements: Iterable[CurrentPlacement],
        profiles: Iterable[SensitivityProfile] = (),
        now: float = 0.0,
        config: PlannerConfig | None = None,
        spare_rows: int = 0,
    ) -> None:
        started = time.perf_counter()
        self.config = config or PlannerConfig()
        self.spare_rows = spare_rows
        """Rows kept unwanted for :meth:`add_model`: a model that arrives takes one instead of a full plan."""
        model_list = [m for m in models if not m.name.startswith(SPARE_PREFIX)]
        if model_list and spare_rows:
            # A spare is wanted by nobody, so it takes no room and no plan names it; only its rows of the
            # option tables exist, to be overwritten by the model that takes it.
            model_list += [
                dataclasses.replace(
                    model_list[0],
                    name=f"{SPARE_PREFIX}{k:04d}",
                    wanted=False,
                    preemptible=True,
                    observed=None,
                    waiting_requests=0,
                )
                for k in range(spare_rows)
            ]
        with collector_paused():
            self.problem = problem = PlanningProblem(
                model_list, nodes, current_placements, profiles, self.config
            )
            self._spares = [m.name for m in problem.models if m.name.startswith(SPARE_PREFIX)]
            notes = ["greedy plan, kept current incrementally"]
            option_count = count_options(problem.tables, problem.class_of_node, problem.nodes)
            self.greedy, assignment, preempted_by, upper_bound, gap = greedy_solve(
                problem, option_count, notes
            )
            # The same last pass as a full plan; the greedy's state follows what it changed.
            filled = fill_free_memory(problem, assignment)
            self._sync([i for i, a in enumerate(filled) if a is not assignment[i]], filled)
            self.plan = assemble_plan(
                problem,
                filled,
                preempted_by,
                "greedy",
                upper_bound,
                gap,
                now,
                time.perf_counter() - started,
                notes,
            )
            self._objective = self.plan.objective
            self._wanted = np.array([m.wanted for m in problem.models], dtype=bool)
            self._declared = np.array([m.declared_priority for m in problem.models], dtype=np.int64)
            self._idle = np.array([bool(m.yielded_priority) for m in problem.models], dtype=bool)
            self._usable_gpu = [usable_gpu_bytes(node) for node in problem.nodes]
            self._mark_applied(range(len(problem.models)))
            # Running models whose demand outgrew their node (a full plan relocates them where room is).
            self._outgrown = {i for _, _, i in self.greedy.outgrown()}

    def _sync(self, indices: Iterable[int], assignment: list[Assignment | None]) -> None:
        """Make the greedy's state hold ``assignment`` for the given models."""
        state = self.greedy.state
        for i in indices:
            state.release(i)
            placed = assignment[i]
            if placed is not None:
                state.occupy(i, placed)

    def _mark_applied(self, indices: Iterable[int]) -> None:
        """Record the plan as the cluster's current state for the given models."""
        problem, assignment = self.problem, self.greedy.state.assignment
        cached = {c.model: c for c in self.plan.cached}
        for i in indices:
            name = problem.models[i].name
            a = assignment[i]
            if a is None:
                kept = cached.get(name)
                if kept is None:
                    problem.current.pop(name, None)
                else:
                    problem.current[name] = CurrentPlacement(name, kept.node, 0.0, state="preempted")
            else:
                problem.current[name] = CurrentPlacement(
                    name, problem.nodes[a.node].name, a.resident_fraction, a.mode, "loaded"
                )
                a.incumbent = True

    def spares_left(self) -> int:
        """Spare rows still free for :meth:`add_model`."""
        return len(self._spares)

    def add_model(self, model: ModelDemand, now: float = 0.0) -> Plan:
        """Plan a model that arrived since this planner was built, into a spare row (as
        :meth:`update_model` plans a changed one: placed where there is room, or room made for it). A model
        already known is updated. :class:`KeyError` when no spare row is left: plan in full."""
        problem = self.problem
        if model.name not in problem.model_index:
            if not self._spares:
                raise KeyError(f"no spare row left for {model.name}; run a full plan to add models")
            problem.model_index[model.name] = problem.model_index.pop(self._spares.pop(0))
        return self.update_model(model, now)

    def update_model(self, model: ModelDemand, now: float = 0.0) -> Plan:
        """Re-plan after ``model`` changed; returns the full desired state with only the actions that this
        change needs (the previous plan is taken as carried out)."""
        with collector_paused():
            if self._offset_too_small(model) or self._pinned_below_one_that_may_leave(model):
                return self._replan_all(model, now)
            return self._update(model, now)

    def _offset_too_small(self, model: ModelDemand) -> bool:
        """Whether the change widens the span of declared priorities past the offset idle models were moved
        down by (planner/demand.py) while any model is idle: a full plan would move them further, below
        every busy model, which this planner's kept priorities cannot follow."""
        problem = self.problem
        index = problem.model_index.get(model.name)
        if index is None:
            return False
        self._declared[index] = model.declared_priority
        self._idle[index] = self.config.idle_models_yield and is_idle(with_backlog(model), self.config)
        span = int(self._declared.max() - self._declared.min()) + 1
        return bool(self._idle.any()) and span > problem.idle_priority_offset

    def _pinned_below_one_that_may_leave(self, model: ModelDemand) -> bool:
        """Whether the change makes a ``preemptible: false`` model with no place one that the last full plan
        did not count as waiting for a place so (wanted again, busy again, another priority) while a pinned
        model of a higher declared priority may leave the GPU, or has: a full plan keeps that one on its GPU,
        or its node closed to the lower one (``PlanningProblem._pending_pinned``); this planner's set-aside
        host memory and node classes were drawn without it."""
        problem = self.problem
        if model.preemptible or not model.wanted:
            return False
        busy = not (self.config.idle_models_yield and is_idle(with_backlog(model), self.config))
        counted = problem.pending_pinned.get(model.name)
        if counted in ((model.declared_priority, busy), (model.declared_priority, True)):
            return False  # counted as it is, or as busy (the stricter), already
        now = problem.current.get(model.name)
        if now is not None and now.is_running:
            return False
        return any(
            problem.models[problem.model_index[name]].declared_priority > model.declared_priority
            for name in problem.host_set_aside
        )

    def _replan_all(self, model: ModelDemand, now: float) -> Plan:
        """Plan everything afresh from the applied state (the models as declared, this one changed)."""
        problem = self.problem
        models = [
            dataclasses.replace(m, priority=m.declared_priority, yielded_priority=0) for m in problem.models
        ]
        models[problem.model_index[model.name]] = model
        current = list(problem.current.values())
        self.__init__(  # type: ignore[misc]
            models, problem.nodes, current, problem.profiles, now, self.config, self.spare_rows
        )
        return self.plan

    def _update(self, model: ModelDemand, now: float) -> Plan:
        started = time.perf_counter()
        problem, greedy = self.problem, self.greedy
        # An idle pinned model may leave the GPU only where the full plan set its host copy's room aside.
        model = yield_if_idle(
            with_backlog(model),
            problem.idle_priority_offset,
            self.config,
            may_leave_gpu=model.name in problem.host_set_aside,
        )
        state = greedy.state
        index = problem.model_index.get(model.name)
        if index is None:
            raise KeyError(f"{model.name} is not known to this planner; run a full plan to add models")
        row = build_class_tables(
            [model], problem.classes, problem.predictor, self.config, problem.profiled_models
        )
        self._wanted[index] = model.wanted
        journal: dict[int, Assignment | None] = {}
        state.touched, state.released_on = journal, set()
        # Room may have grown since the last update: forget which needs found none.
        greedy.failed_room.clear()
        try:
            greedy.refresh_model(index, model, row)
            state.preempted_by.clear()
            greedy.reseat(index)
            greedy.relocate_outgrown([index])
            # As a full plan does before admitting anyone: models that outgrew their node move where this
            # change left room, or made making room worth it (a neighbour's value changed).
            self._relocate_outgrown_onto(self._touched_nodes(journal), index)
            # The changed model, if it has no place now, and whatever had to leave its node are admitted
            # afresh, anywhere; models without a place are offered the room given back; all in a full
            # plan's order (tier by tier, each tier's promotions before the next tier's admissions).
            newcomers = {
                i
                for i in set(journal) | {index}
                if state.assignment[i] is None and greedy.models[i].wanted and greedy.has_option[i]
            }
            self._admit(newcomers, state.released_on, make_room=True)
            # Nodes where anything moved: models there may use memory or GPU time given back. As a full
            # plan ends: promotions for capacity beyond demand, then, since faster models share a GPU
            # better, one more admission round.
            touched_nodes = self._touched_nodes(journal)
            if greedy.promote(self._models_on(touched_nodes), full=True):
                self._admit(set(), touched_nodes, make_room=False)
                touched_nodes = self._touched_nodes(journal)
            # The full plan's last pass: free GPU memory raises residency where it costs nothing.
            on_touched = self._models_on(touched_nodes)
            used_gpu = [usable - free for usable, free in zip(self._usable_gpu, state.free_gpu, strict=True)]
            filled = fill_free_memory(problem, state.assignment, on_touched, used_gpu)
            self._sync([i for i in on_touched if filled[i] is not state.assignment[i]], filled)
        finally:
            state.touched, state.released_on = None, None
        changed = sorted(set(journal) | {index})
        self._objective += sum(
            (0.0 if (after := state.assignment[i]) is None else after.full_score)
            - (0.0 if (before := journal.get(i)) is None else before.full_score)
            for i in changed
        )
        self.plan = assemble_plan(
            problem,
            state.assignment,
            dict(state.preempted_by),
            "incremental",
            self.plan.upper_bound,
            self.plan.optimality_gap,
            now,
            time.perf_counter() - started,
            ("incremental: only the changed model and what it touched were re-planned",),
            only_models=changed,
            base=self.plan,
            room=(state.free_gpu, state.free_host, state.free_time),
            objective=self._objective,
            models_on_node=state.models_on_node,
        )
        self._mark_applied(changed)
        self._outgrown.difference_update(changed)
        self._outgrown.update(i for _, _, i in greedy.outgrown(changed))
        return self.plan

    def _relocate_outgrown_onto(self, nodes: set[int], changed: int) -> None:
        """Relocate the running models that outgrew their node and could use room on ``nodes`` (free, or
        made by demoting and preempting there), as a full plan's relocation would."""
        greedy = self.greedy
        accepting = sorted(node for node in nodes if self.problem.nodes[node].accepts_work)
        waiting = sorted(self._outgrown - {changed})
        if not accepting or not waiting:
            return
        candidates = set(greedy.with_room_on(waiting, accepting))
        candidates.update(greedy.could_make_room_on(waiting, accepting))
        if candidates:
            greedy.relocate_outgrown(sorted(candidates))

    def _touched_nodes(self, journal: dict[int, Assignment | None]) -> set[int]:
        """Nodes a model left or was put on during this update."""
        state = self.greedy.state
        nodes = set(state.released_on or ())
        nodes.update(a.node for i in journal if (a := state.assignment[i]) is not None)
        return nodes

    def _models_on(self, nodes: Iterable[int]) -> list[int]:
        return sorted(i for node in nodes for i in self.greedy.state.models_on_node[node])

    def _admit(self, newcomers: set[int], nodes: set[int], make_room: bool) -> None:
        """A full plan's admission loop over the models this update concerns: ``newcomers`` anywhere, and
        the wanted models without a place into the room given back on ``nodes`` or on any node a model
        leaves meanwhile (free room, or, with ``make_room``, by demoting or preempting lower priorities
        there). Tier by tier, highest first, within a tier by value density; after each tier, that
        tier's models on the touched nodes are promoted, as a full plan promotes each tier before
        admitting the next. Elsewhere nothing changed, so a model with no room on these nodes has no
        more room than the last plan gave it."""
        greedy, state = self.greedy, self.greedy.state
        models = greedy.models
        journal = state.touched if state.touched is not None else {}
        failed: dict[tuple[int, int, int], list[tuple[int, int, float, float]]] = {}
        tier: int | None = None
        promoted: set[int] = set()

        def promote_above(bound: int | None) -> None:
            """As a full plan promotes every tier after its admissions: the tiers above ``bound`` (all when
            None) with models on the touched nodes, highest first, each once, where none was admitted."""
            on_nodes = self._models_on(nodes | self._touched_nodes(journal))
            for priority in sorted({models[i].priority for i in on_nodes}, reverse=True):
                if (bound is None or priority > bound) and priority not in promoted:
                    promoted.add(priority)
                    self._promote_tier(priority, nodes)

        while True:
            # As a full plan does at each tier's start: whoever has no place now (a higher tier may just
            # have displaced it) is admitted afresh.
            newcomers |= {
                i
                for i in journal
                if state.assignment[i] is None and models[i].wanted and greedy.has_option[i]
            }
            waiting = self._wanted & greedy.has_option & ~state.placed
            if tier is not None:
                waiting &= greedy.priorities < tier
            lower = greedy.priorities[waiting]
            if not len(lower):
                promote_above(None)
                break
            tier = int(lower.max())
            promote_above(tier)
            members = np.flatnonzero(waiting & (greedy.priorities == tier))
            tier_newcomers = {i for i in newcomers if models[i].priority == tier}
            accepting = sorted(
                node for node in nodes | (state.released_on or set()) if self.problem.nodes[node].accepts_work
            )
            others = np.setdiff1d(members, np.array(sorted(tier_newcomers), dtype=np.intp))
            fits_on = self._fits_on(others, accepting) if accepting else {}
            candidates = set(fits_on) | tier_newcomers
            if make_room and accepting:
                rest = np.setdiff1d(others, np.array(sorted(fits_on), dtype=np.intp))
                candidates |= set(greedy.could_make_room_on(rest.tolist(), accepting))
            if candidates:
                self._admit_tier(
                    greedy.admission_order(sorted(candidates)),
                    tier_newcomers,
                    fits_on,
                    accepting,
                    make_room,
                    failed,
                )
            promoted.add(tier)
            self._promote_tier(tier, nodes)

    def _admit_tier(
        self,
        order: list[int],
        newcomers: set[int],
        fits_on: dict[int, set[int]],
        accepting: list[int],
        make_room: bool,
        failed: dict[tuple[int, int, int], list[tuple[int, int, float, float]]],
    ) -> None:
        """One tier of :meth:`_admit`: ``order`` in admission order; ``fits_on``, per model, the nodes of
        ``accepting`` where it had free room when the tier began."""
        greedy, state = self.greedy, self.greedy.state
        # Where a node's room shrank (a model was placed there), what fitted there before may not any
        # more: such answers are rechecked when needed.
        epoch = 0
        changed_at = dict.fromkeys(accepting, 0)
        checked_at: dict[int, int] = {}

        def has_room(position: int, i: int) -> bool:
            seen = checked_at.get(i, 0)
            if any(changed_at[node] <= seen for node in fits_on.get(i, ())):
                return True
            if not fits_on.get(i):
                return False
            # Recheck everyone still to come at once: most no longer fit, which the cheap per-resource
            # bounds inside room_by_node settle in one array operation.
            batch = [j for j in order[position:] if fits_on.get(j)]
            stale = sorted({n for j in batch for n in fits_on[j] if changed_at[n] > checked_at.get(j, 0)})
            found = greedy.room_by_node(batch, stale)
            for j in batch:
                seen_j = checked_at.get(j, 0)
                fits_on[j] = {n for n in fits_on[j] if changed_at[n] <= seen_j or j in found[n]}
                checked_at[j] = epoch
            return bool(fits_on[i])

        failures_in_a_row = misses_in_a_row = 0
        for position, i in enumerate(order):
            if state.assignment[i] is not None:
                continue
            if i in newcomers:
                if not greedy.try_place(i) and make_room:
                    greedy.try_make_room(i)
                continue
            if misses_in_a_row < ROOM_MISS_LIMIT and has_room(position, i):
                if greedy.try_place(i):
                    misses_in_a_row = 0
                    node = self._node_of(i)
                    if node in changed_at:
                        epoch += 1
                        changed_at[node] = epoch
                    continue
                misses_in_a_row += 1
            if not make_room or failures_in_a_row >= MAKE_ROOM_FAILURE_LIMIT:
                continue
            if greedy.try_make_room(i, accepting, failed):
                failures_in_a_row = 0
                # Making room may leave more room than before (a large model preempted for a small one):
                # recheck everyone still to come.
                still_to_come = [j for j in order[position + 1 :] if state.assignment[j] is None]
                rechecked = self._fits_on(still_to_come, accepting)
                for j in still_to_come:
                    if j in rechecked:
                        fits_on[j] = rechecked[j]
                    else:
                        fits_on.pop(j, None)
                epoch += 1
                checked_at.update(dict.fromkeys(still_to_come, epoch))
            else:
                failures_in_a_row += 1

    def _promote_tier(self, priority: int, nodes: set[int]) -> None:
        """A full plan's promotion of one tier, for its models on the touched nodes."""
        greedy = self.greedy
        journal = greedy.state.touched or {}
        members = [
            i
            for i in self._models_on(nodes | self._touched_nodes(journal))
            if greedy.models[i].priority == priority
        ]
        if members:
            greedy.promote(members)

    def _fits_on(self, model_indices: Iterable[int], nodes: list[int]) -> dict[int, set[int]]:
        """Per model with room on any of ``nodes``, the nodes where it has room."""
        fits_on: dict[int, set[int]] = {}
        for node, members in self.greedy.room_by_node(list(model_indices), nodes).items():
            for i in members:
                fits_on.setdefault(i, set()).add(node)
        return fits_on

    def _node_of(self, model_index: int) -> int | None:
        assignment = self.greedy.state.assignment[model_index]
        return None if assignment is None else assignment.node
