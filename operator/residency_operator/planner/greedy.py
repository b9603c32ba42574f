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

The stages are layered modules, each one job (``.importlinter`` keeps them so): ``greedy_state`` (free
memory and time per node), ``greedy_base`` (inputs, option tables, seating the incumbents), ``making_room``
(step 3), ``promotion`` (step 4), ``admission`` (step 2) and ``relocation`` (running models whose demand
outgrew their node); this module runs them in order.
"""

from __future__ import annotations

import numpy as np

from residency_operator.planner.admission import Admission
from residency_operator.planner.greedy_base import GreedyResult
from residency_operator.planner.greedy_state import Assignment, GreedyState
from residency_operator.planner.making_room import MAKE_ROOM_FAILURE_LIMIT
from residency_operator.planner.relocation import Relocation

__all__ = ["MAKE_ROOM_FAILURE_LIMIT", "Assignment", "GreedyPlanner", "GreedyResult", "GreedyState"]


class GreedyPlanner(Admission, Relocation):
    """One greedy solve; see the module docstring for the algorithm."""

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
        self.relocate_newcomers(tiers)
        return GreedyResult(assignment=self.state.assignment, preempted_by=self.state.preempted_by)

    def relocate_newcomers(self, tiers: dict[int, list[int]]) -> None:
        """Move the models this plan places whose demand outgrew their node, as the next plan would once
        they run: one placed on a slow node because a fast one's time or memory was short then (a model
        there admitted at a low level, promoted since) would otherwise migrate in the next plan, a second
        load (the plan would not be a fixed point). Room they leave goes to models still left out, and
        the models on the nodes they left or joined are promoted, as the passes above would have."""
        newcomers = [i for i, a in enumerate(self.state.assignment) if a is not None and not a.incumbent]
        versions = list(self.state.node_version)
        if not self.relocate_outgrown(newcomers, newcomers=True):
            return
        touched = [node for node, version in enumerate(self.state.node_version) if version != versions[node]]
        unplaced = [
            i
            for priority in sorted(tiers, reverse=True)
            for i in tiers[priority]
            if self.state.assignment[i] is None and self.has_option[i]
        ]
        for model_index in self.with_room_on(unplaced, touched):
            self.try_place(model_index)
        on_touched = sorted(
            (i for node in touched for i in self.state.models_on_node[node]),
            key=lambda i: (-self.models[i].priority, self.models[i].name),
        )
        self.promote(on_touched, full=True)
