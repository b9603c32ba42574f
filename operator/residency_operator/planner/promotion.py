"""Promotion: the greedy's stage that spends leftover memory on placed models, by marginal value per byte."""

from __future__ import annotations

from collections.abc import Sequence

from residency_operator.planner.costs import (
    amortised_cost_tokens_per_second,
    promote_cost,
)
from residency_operator.planner.greedy_state import Assignment
from residency_operator.planner.making_room import MakingRoom
from residency_operator.planner.options import (
    MODES,
)


class Promotion(MakingRoom):
    """Promotion: leftover memory raises placed models' residency by marginal value per byte (a demotion
    may give room to a more valuable promotion)."""

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
