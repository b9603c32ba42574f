"""The greedy's working state: each model's assignment and the free GPU memory, host memory and GPU time
of every node, kept sorted per node class for best-fit lookups.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from residency_operator.planner.options import (
    BoolArray,
)
from residency_operator.planner.types import (
    ExecutionMode,
)

FIT_SCAN_LIMIT = 64
"""Nodes examined past the best-fit point when host memory or GPU time, not GPU memory, does not fit."""


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
