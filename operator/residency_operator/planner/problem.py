"""The planning problem both solvers share: sorted models and nodes (idle models yielded), node
classes and the option tables."""

from __future__ import annotations

from collections.abc import Iterable

from residency_operator.planner.demand import yield_idle
from residency_operator.planner.milp import (
    NodeOptions,
    build_node_options,
)
from residency_operator.planner.options import (
    ClassTables,
    build_class_tables,
    node_class_key,
    node_class_tuple,
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
        self.nodes: list[NodeCapacity] = sorted({n.name: n for n in nodes}.values(), key=lambda n: n.name)
        self.node_by_name = {node.name: node for node in self.nodes}
        self.node_index = {node.name: i for i, node in enumerate(self.nodes)}
        profile_list = list(profiles)
        self.profiles = profile_list
        self.predictor = Predictor.calibrated(profile_list, self.models)
        self.config = config
        class_keys: dict[tuple[object, ...], int] = {}
        self.class_of_node: list[int] = []
        self.classes: list[NodeCapacity] = []
        for node in self.nodes:
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
