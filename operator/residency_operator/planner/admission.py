"""Admission: the greedy's stage that places a newcomer in free room (best fit), without moving others."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from residency_operator.planner.making_room import MAKE_ROOM_CANDIDATE_NODES
from residency_operator.planner.options import (
    MODES,
)
from residency_operator.planner.promotion import Promotion

ROOMY_NODE_LIMIT = 48
"""Admission checks every option against every node with room at once when at most this many have any."""


class Admission(Promotion):
    """Admission: a newcomer placed at the level where its value net of the amortised load peaks on the
    best node class, or else the highest level that fits somewhere (best-fit on free GPU memory); a model
    blocked only by another's GPU time may first promote that one so that both fit."""

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
            if self._place_at_home(model_index, preferred):
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

    def _place_at_home(self, model_index: int, home: int) -> bool:
        """Put a model back on the node it runs on (or is cached on) at the best level that fits there, where
        that serves about as much as its best option elsewhere after the cold load a move costs (the
        hysteresis margin): a model that making room released earlier in this plan, or whose target level
        no longer fits beside the others, keeps its seat at a lower residency rather than being reloaded on
        another node (fleet-zipf-shift: most migrations were such re-seatings, each a reload)."""
        state, tables = self.state, self.tables
        node_class = self.class_of_node[home]
        best_elsewhere = float(self.best_target_score[model_index])
        floor = best_elsewhere / (1.0 + self.config.hysteresis_fraction)
        best: tuple[float, int, int] | None = None
        for pair_class, mode_index in self._class_modes(model_index):
            if pair_class != node_class:
                continue
            values = tables.primary_value[node_class, mode_index, model_index]
            feasible = np.isfinite(self.newcomer_score[node_class, mode_index, model_index])
            for level in np.flatnonzero(feasible & (values >= floor)).tolist():
                value = float(values[level])
                if best is not None and value <= best[0]:
                    continue
                if state.fits(
                    home,
                    int(tables.gpu_bytes[mode_index, model_index, level]),
                    int(tables.host_bytes[model_index, level]),
                    float(tables.busy_fraction[node_class, mode_index, model_index, level]),
                    float(tables.tolerance[node_class, mode_index, model_index, level]),
                ):
                    best = (value, mode_index, level)
        if best is None:
            return False
        _, mode_index, level = best
        state.occupy(model_index, self._assignment_at(model_index, home, node_class, mode_index, level))
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

    def _preferred_node(self, model_index: int) -> int | None:
        """Where the model is (or is cached) now: placing it there again is cheapest."""
        current = self.current.get(self.models[model_index].name)
        if current is None:
            return None
        node = self.node_index.get(current.node)
        if node is None or not self.nodes[node].accepts_work:
            return None
        return node
