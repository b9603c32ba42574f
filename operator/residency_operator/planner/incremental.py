"""Incremental re-planning: one model changed, everything else stays where the last plan put it.

The operator reconciles one LLMModel at a time; re-solving ten thousand models for each event would be
wasteful. :class:`IncrementalPlanner` keeps the greedy's state (free memory per node, option tables) from
the last full plan, takes that plan as applied, and re-plans only the changed model — plus whatever it
demotes or preempts to make room. A periodic full :func:`~residency_operator.planner.plan.plan` repairs
whatever the incremental path leaves suboptimal.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from residency_operator.planner.greedy import Assignment, GreedyPlanner
from residency_operator.planner.options import build_class_tables
from residency_operator.planner.plan import PlanningProblem, assemble_plan
from residency_operator.planner.types import (
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannerConfig,
    SensitivityProfile,
)


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
    ) -> None:
        started = time.perf_counter()
        self.config = config or PlannerConfig()
        self.problem = PlanningProblem(models, nodes, current_placements, profiles, self.config)
        self.greedy = GreedyPlanner(
            self.problem.models,
            self.problem.nodes,
            self.problem.class_of_node,
            self.problem.tables,
            self.problem.current,
            self.problem.predictor,
            self.config,
        )
        result = self.greedy.solve()
        self.plan = assemble_plan(
            self.problem,
            result.assignment,
            result.preempted_by,
            "greedy",
            0.0,
            0.0,
            now,
            time.perf_counter() - started,
            ("full greedy plan; no optimality bound computed on the incremental path",),
        )
        self._mark_applied(range(len(self.problem.models)))

    def _mark_applied(self, indices: Iterable[int]) -> None:
        """Record the plan as the cluster's current state for the given models."""
        problem, assignment = self.problem, self.greedy.state.assignment
        for i in indices:
            name = problem.models[i].name
            a = assignment[i]
            if a is None:
                cached = next((c for c in self.plan.cached if c.model == name), None)
                if cached is None:
                    problem.current.pop(name, None)
                else:
                    problem.current[name] = CurrentPlacement(name, cached.node, 0.0, state="preempted")
            else:
                problem.current[name] = CurrentPlacement(
                    name, problem.nodes[a.node].name, a.resident_fraction, a.mode, "loaded"
                )
                a.incumbent = True

    def update_model(self, model: ModelDemand, now: float = 0.0) -> Plan:
        """Re-plan after ``model`` changed (or appeared); returns the full desired state with only the
        actions that this change needs."""
        started = time.perf_counter()
        problem, greedy = self.problem, self.greedy
        index = problem.model_index.get(model.name)
        if index is None:
            raise KeyError(f"{model.name} is not known to this planner; run a full plan to add models")
        row = build_class_tables(
            [model], problem.classes, problem.predictor, self.config, problem.profiled_models
        )
        before: list[Assignment | None] = list(greedy.state.assignment)
        greedy.refresh_model(index, model, row)
        greedy.state.preempted_by.clear()
        greedy.keep_or_replace(index)
        # Anything preempted to make room gets one chance to land elsewhere.
        for victim in sorted(greedy.state.preempted_by):
            if greedy.state.assignment[victim] is None and greedy.has_option[victim]:
                greedy.try_place(victim)
        after = greedy.state.assignment
        changed = [i for i in range(len(after)) if after[i] is not before[i]]
        if index not in changed:
            changed.append(index)
        self.plan = assemble_plan(
            problem,
            after,
            dict(greedy.state.preempted_by),
            "incremental",
            self.plan.upper_bound,
            float(np.nan_to_num(self.plan.optimality_gap)),
            now,
            time.perf_counter() - started,
            ("incremental: only the changed model and those it displaced were re-planned",),
            only_models=changed,
            base=self.plan,
        )
        self._mark_applied(changed)
        return self.plan
