"""The planning problem both solvers share: sorted models and nodes (idle models yielded), node
classes and the option tables."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from residency_operator.planner.demand import keeps_gpu, yield_idle
from residency_operator.planner.milp import (
    NodeOptions,
    build_node_options,
)
from residency_operator.planner.options import (
    ClassTables,
    build_class_tables,
    cached_host_bytes,
    host_bytes_needed,
    node_class_key,
    node_class_tuple,
    usable_host_bytes,
    with_host_set_aside,
)
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.types import (
    CurrentPlacement,
    ExecutionMode,
    ModelDemand,
    NodeCapacity,
    PlannerConfig,
    SensitivityProfile,
    with_backlog,
)


class PlanningProblem:
    """Normalised inputs shared by both solvers: sorted models and nodes, node classes, option tables."""

    def __init__(
        self,
        models: Iterable[ModelDemand],
        nodes: Iterable[NodeCapacity],
        current_placements: Iterable[CurrentPlacement],
        profiles: Iterable[SensitivityProfile],
        config: PlannerConfig,
    ) -> None:
        self.current: dict[str, CurrentPlacement] = {
            p.model: p for p in sorted(current_placements, key=lambda p: (p.model, p.node))
        }
        by_name: dict[str, ModelDemand] = {}
        for model in models:
            by_name[model.name] = with_backlog(model)
        # Idle models yield their priority to busy ones (planner/demand.py); the offset is kept for the
        # incremental planner, which applies it to each changed model.
        self.models, self.idle_priority_offset = yield_idle(
            [by_name[name] for name in sorted(by_name)], config
        )
        self.model_index = {model.name: i for i, model in enumerate(self.models)}
        node_list = sorted({n.name: n for n in nodes}.values(), key=lambda n: n.name)
        self.pending_pinned = self._pending_pinned()
        """:meth:`_pending_pinned`, as this plan found them (the incremental planner replans for others)."""
        self.host_set_aside = self._set_host_copies_aside(node_list, config)
        """Node and host bytes set aside, per model, for the copy of a ``preemptible: false`` model that may
        leave the GPU (or has): the solvers never see them, ``assemble_plan`` keeps its copy there first."""
        node_list = self._closed_to_lower_pinned(node_list)
        self.nodes: list[NodeCapacity] = with_host_set_aside(node_list, self._aside_by_node)
        self.node_by_name = {node.name: node for node in self.nodes}
        self.node_index = {node.name: i for i, node in enumerate(self.nodes)}
        profile_list = list(profiles)
        self.profiles = profile_list
        self.predictor = Predictor.calibrated(profile_list, self.models)
        self.config = config
        class_keys: dict[tuple[object, ...], int] = {}
        self.class_of_node: list[int] = []
        self.classes: list[NodeCapacity] = []
        # Classes from the nodes before host copies were set aside: a per-node reservation would split every
        # class into one per node (10 000 models x 1 000 nodes, all idle: 0.7 s -> 12 s per plan). The class
        # tables' host check is an upper bound; each node's own capacity (self.nodes) is exact.
        for node in node_list:
            key = node_class_tuple(node)
            node_class = class_keys.get(key)
            if node_class is None:
                node_class = class_keys[key] = len(self.classes)
                self.classes.append(node_class_key(node))
            self.class_of_node.append(node_class)
        self.profiled_models = frozenset(p.model for p in profile_list)
        self.tables: ClassTables = build_class_tables(
            self.models, self.classes, self.predictor, config, self.profiled_models
        )
        self._node_options: NodeOptions | None = None
        self._rate_memo: dict[tuple[object, ...], tuple[float, float]] = {}

    def _set_host_copies_aside(
        self, nodes: list[NodeCapacity], config: PlannerConfig
    ) -> dict[str, tuple[str, int]]:
        """Host memory for the weights and KV cache of every pinned model that is idle (no demand: it may
        leave the GPU in this plan; or quiet for the worker's idle interval: it may give way to a waiting
        model, ``planner/swapin.py``) or already preempted: on its node, beside the offloaded weights of what
        runs there. An idle one whose node cannot hold its copy keeps its GPU (``demand.keeps_gpu``); so does
        one while a busy pinned model of a lower declared priority waits for a place
        (``_lowest_pending_pinned``)."""
        by_name = {node.name: node for node in nodes}
        lowest_pending = self._lowest_pending_pinned()
        room = {node.name: usable_host_bytes(node) for node in nodes}
        for placement in self.current.values():
            index = self.model_index.get(placement.model)
            if index is not None and placement.is_running and placement.node in room:
                room[placement.node] -= host_bytes_needed(self.models[index], placement.resident_fraction)
        set_aside: dict[str, tuple[str, int]] = {}
        self._aside_by_node: dict[str, int] = {}
        for index, model in enumerate(self.models):
            pinned = model.host_copy_kept or not model.preemptible
            now = self.current.get(model.name)
            if not pinned or not model.wanted or now is None or now.node not in by_name:
                self.models[index] = keeps_gpu(model)
                continue
            quiet = (
                now.state == "idle"
                and model.waiting_requests == 0
                and config.idle_pinned_models_leave_gpu
                and config.keep_preempted_cache
            )
            if not model.host_copy_kept and now.is_running and not quiet:
                continue  # busy and running: it keeps its GPU, nothing to set aside
            may_leave = model.host_copy_kept or quiet
            if may_leave and now.is_running and lowest_pending < model.declared_priority:
                # Its room could go to that model, which once running is never moved to give it back: it
                # keeps its GPU (nor may it give way between plans), as with the rule off.
                self.models[index] = keeps_gpu(model)
                continue
            # Set aside whole, beside its own offloaded weights while it runs: the solvers may keep it.
            need = cached_host_bytes(model, now.kv_cache_bytes)
            if need > room[now.node]:
                self.models[index] = keeps_gpu(model)
                continue
            room[now.node] -= need
            if quiet and not model.host_copy_kept:
                # still planned pinned by the solvers (its demand window is not empty), but it may give way
                self.models[index] = dataclasses.replace(model, host_copy_kept=True)
            set_aside[model.name] = (now.node, need)
            self._aside_by_node[now.node] = self._aside_by_node.get(now.node, 0) + need
        return set_aside

    def _pending_pinned(self) -> dict[str, tuple[int, bool]]:
        """The ``preemptible: false`` models that do not run now (this plan may place them): their declared
        priorities, and whether they are busy. Placed, such a model is never preempted, evicted or moved for
        another while busy (docs/planner.md, guarantee 1; an idle one may be busy by then): an idle pinned
        model of a higher priority whose room it took could not come back (guarantee 3)."""
        return {
            model.name: (model.declared_priority, not model.yielded_priority)
            for model in self.models
            if model.wanted
            and (not model.preemptible or model.host_copy_kept)
            and ((now := self.current.get(model.name)) is None or not now.is_running)
        }

    def _lowest_pending_pinned(self) -> float:
        """The lowest declared priority of a busy one of :meth:`_pending_pinned`, or infinity: an idle pinned
        model of a higher priority does not leave its GPU while one waits (an idle one is kept off its node
        instead, :meth:`_closed_to_lower_pinned`: it has no demand to serve)."""
        return float(min((p for p, busy in self.pending_pinned.values() if busy), default=math.inf))

    def _closed_to_lower_pinned(self, nodes: list[NodeCapacity]) -> list[NodeCapacity]:
        """The nodes, each closed to the models of :meth:`_pending_pinned` of a lower priority than a pinned
        model whose host copy it keeps: the busy ones where that model left its GPU already, the idle ones
        also where it may leave in this plan. Its return needs its room back, which they would not give."""
        left: dict[str, int] = {}
        may_leave: dict[str, int] = {}
        for name, (node_name, _) in self.host_set_aside.items():
            priority = self.models[self.model_index[name]].declared_priority
            may_leave[node_name] = max(priority, may_leave.get(node_name, priority))
            now = self.current.get(name)
            if now is not None and not now.is_running:
                left[node_name] = max(priority, left.get(node_name, priority))
        pending = self.pending_pinned if may_leave else {}
        if not pending:
            return nodes
        closed_nodes = []
        for node in nodes:
            top_left, top = left.get(node.name, -math.inf), may_leave.get(node.name, -math.inf)
            closed = frozenset(name for name, (p, busy) in pending.items() if p < (top_left if busy else top))
            closed_nodes.append(dataclasses.replace(node, closed_to=closed) if closed else node)
        return closed_nodes

    def rates(
        self, model: ModelDemand, node_index: int, resident_fraction: float, mode: str
    ) -> tuple[float, float]:
        """(decode tokens/s per sequence, prefill tokens/s) of a placement, from the scalar predictor,
        cached per (model shape, node class, residency, mode): a large fleet has few distinct ones."""
        key = (
            model.weight_bytes,
            model.kv_bytes_per_token,
            model.max_batch,
            model.max_sequence_length,
            model.typical_sequence_length,
            model.parameter_count,
            model.effective_layer_count,  # the fitted engine's layer overheads
            model.name if model.name in self.profiled_models or model.observed is not None else "",
            self.class_of_node[node_index],
            resident_fraction,
            mode,
        )
        cached = self._rate_memo.get(key)
        if cached is None:
            node = self.nodes[node_index]
            execution_mode: ExecutionMode = "cpu" if mode == "cpu" else "stream"
            cached = (
                self.predictor.decode_tokens_per_second(model, node, resident_fraction, execution_mode),
                self.predictor.prefill_tokens_per_second(model, node, resident_fraction, execution_mode),
            )
            self._rate_memo[key] = cached
        return cached

    def node_options(self) -> NodeOptions:
        """Every (model, node, level, mode) option, built once per problem (MILP and LP bound share it)."""
        if self._node_options is None:
            self._node_options = build_node_options(
                self.models,
                self.nodes,
                self.class_of_node,
                self.tables,
                self.current,
                self.predictor,
                self.config,
            )
        return self._node_options
