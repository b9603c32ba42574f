"""Relocation: the greedy's stage that moves running models whose demand outgrew their node."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from residency_operator.planner.costs import (
    amortised_cost_tokens_per_second,
    migrate_cost,
)
from residency_operator.planner.greedy_state import Assignment
from residency_operator.planner.making_room import (
    MAKE_ROOM_CANDIDATE_NODES,
    SAME_TIER_SWAP_GAIN,
    MakingRoom,
)
from residency_operator.planner.options import MODES


class Relocation(MakingRoom):
    """Relocation: running models whose demand outgrew their node move to one that serves it, where the
    gain net of the amortised move beats staying by the hysteresis margin."""

    def relocate_outgrown(self, only: Sequence[int] | None = None, newcomers: bool = False) -> int:
        """Move running models whose demand outgrew their node to a node that serves it, where there is
        free room and the throughput gained, net of the amortised cost of the move (the model serves
        nothing while it reloads), beats staying by the hysteresis margin. Highest gain first.

        Without this a model placed while its demand was unknown or small stays on a slow GPU for good, as
        long as it keeps its per-sequence SLO there. ``only``: consider these models only. Returns how
        many moved. ``newcomers``: models this plan places are considered too, as the next plan would
        judge them once running."""
        state, tables, config = self.state, self.tables, self.config
        proposals = self.outgrown(only, newcomers)
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

    def outgrown(
        self, only: Sequence[int] | None = None, newcomers: bool = False
    ) -> list[tuple[float, str, int]]:
        """The placed models that :meth:`relocate_outgrown` would try to move, as (-unserved tokens/s, name,
        index): running (or, with ``newcomers``, placed by this plan), preemptible, with a known demand that
        a full batch at their placement's rate (with the demand headroom) does not serve."""
        state, tables, config = self.state, self.tables, self.config
        # Who outgrew their node, in one array operation: rate at the placement x a full batch against the
        # demand with its headroom (``unserved_tokens_per_second``, the same float operations).
        rows: list[tuple[int, int, int, int, float, int]] = []
        for i in range(len(state.assignment)) if only is None else only:
            a = state.assignment[i]
            if a is None or not (a.incumbent or newcomers):
                continue
            model = self.models[i]
            if not model.preemptible:
                continue  # a move stops it while it reloads: a preemption in all but name
            demand = model.demand_decode_tokens_per_second
            if demand is None or demand <= 0:
                continue
            at_level = self._level_index.get(a.resident_fraction)
            if at_level is None:
                continue
            rows.append(
                (i, self.class_of_node[a.node], MODES.index(a.mode), at_level, demand, model.max_batch)
            )
        proposals: list[tuple[float, str, int]] = []
        if rows:
            indices, classes, modes, levels, demands, batches = (
                np.array(column) for column in zip(*rows, strict=True)
            )
            rates = tables.decode_tokens_per_second[classes, modes, indices, levels]
            unserved = config.demand_headroom * demands.astype(np.float64) - rates * np.maximum(1, batches)
            proposals = [
                (-u, self.models[i].name, i)
                for i, u in zip(indices.tolist(), unserved.tolist(), strict=True)
                if u > 0
            ]
        return proposals

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
