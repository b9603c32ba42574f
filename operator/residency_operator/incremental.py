"""Single-model changes re-planned with the planner's incremental mode instead of a full plan.

At fleet size a full plan costs seconds (10 000 models: ~2 s of planning in a ~4 s round); a priority or
SLO change of one model needs only that model and what it touches re-planned
(:class:`~residency_operator.planner.incremental.IncrementalPlanner`). The operator keeps one incremental
planner for the fleet, built at a full round that found nothing to write (the cluster is at the plan) and
whose own plan agrees with every placement it knows, and uses it for rounds whose only triggers are spec
changes of models it knows. Anything else (a model that came or went, a node, a worker's report, the
resync) plans in full; a full round that writes placements drops the incremental planner, since the
cluster moved under it. The resync's full plan repairs whatever the local view leaves suboptimal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from typing import Any

from residency.names import placement_name
from residency_operator.planner import Plan, PlannerConfig
from residency_operator.planner.incremental import IncrementalPlanner
from residency_operator.state import Inputs

log = logging.getLogger("residency.controller")

FleetKey = tuple[tuple[str, ...], tuple[Any, ...], tuple[Any, ...]]
"""The models a planner knows, the nodes and the measured profiles it planned with."""


def fleet_key(inputs: Inputs) -> FleetKey:
    return tuple(sorted(d.name for d in inputs.demands)), tuple(inputs.nodes), tuple(inputs.profiles)


def agrees(plan: Plan, placements: dict[str, dict[str, Any]]) -> bool:
    """Whether every model's placement (by model key) is where and as ``plan`` has it."""
    for key, planned in plan.placements.items():
        spec = (placements.get(key) or {}).get("spec") or {}
        if (
            spec.get("nodeName") != planned.node
            or spec.get("desiredState", "Loaded") != "Loaded"
            or abs(float(spec.get("residentFraction", -1.0)) - planned.resident_fraction) > 1e-4
        ):
            return False
    return all(
        key in plan.placements
        for key, placement in placements.items()
        if (placement.get("spec") or {}).get("desiredState", "Loaded") == "Loaded"
    )


@dataclasses.dataclass
class IncrementalChange:
    """What an incremental round re-planned: the plan and the models it touched."""

    plan: Plan
    models: frozenset[str]

    def placement_names(self) -> frozenset[str]:
        return frozenset(placement_name(m) for m in self.models)

    def scoped(self, inputs: Inputs) -> tuple[Plan, Inputs]:
        """The plan and inputs cut to the touched models (for the manifests and statuses of this round)."""
        touched = self.models
        plan = dataclasses.replace(
            self.plan,
            placements={k: v for k, v in self.plan.placements.items() if k in touched},
            cached=tuple(c for c in self.plan.cached if c.model in touched),
        )
        return plan, dataclasses.replace(inputs, idle={k: v for k, v in inputs.idle.items() if k in touched})


class IncrementalRounds:
    """The fleet's incremental planner between rounds, and when a round may use it."""

    def __init__(self, min_models: int, config: PlannerConfig, max_changes: int = 8) -> None:
        self.min_models = min_models
        """Fleets smaller than this always plan in full (a full plan is fast there, and exact)."""
        self.max_changes = max_changes
        self.config = config
        self.planner: IncrementalPlanner | None = None
        self._key: FleetKey | None = None
        self.builds = 0
        self.used = 0

    def drop(self) -> None:
        self.planner, self._key = None, None

    def change(self, changed: Collection[str], inputs: Inputs, now: float) -> IncrementalChange | None:
        """The incremental plan for these spec changes, or ``None`` where this round must plan in full."""
        planner = self.planner
        if (
            planner is None
            or not changed
            or len(changed) > self.max_changes
            or fleet_key(inputs) != self._key
            or inputs.idle
        ):
            return None
        demands = {d.name: d for d in inputs.demands}
        if any(key not in demands or key not in planner.problem.model_index for key in changed):
            return None
        touched: set[str] = set()
        result = planner.plan
        try:
            for key in sorted(changed):
                result = planner.update_model(demands[key], now)
                touched |= {key, *(a.model for a in result.actions)}
        except Exception:  # its state may be half-updated: never use it again; this round plans in full
            log.exception("incremental planning of %s failed; planning in full", sorted(changed))
            self.drop()
            return None
        self.used += 1
        return IncrementalChange(result, frozenset(touched))

    def after_full_round(self, inputs: Inputs, wrote: bool, models_changed: bool, now: float) -> None:
        """After a full round: drop the planner when the round wrote placements; keep it when nothing it
        planned from changed; else build one for this fleet (a round with nothing to write: the cluster
        is at the plan). A fleet with multi-GPU nodes always plans in full: the incremental planner packs
        nodes, and only :func:`~residency_operator.planner.plan` partitions their GPUs (planner/gpus.py)."""
        multi_gpu = any(len(n.gpus) > 1 for n in inputs.nodes)
        if wrote or inputs.idle or len(inputs.demands) < self.min_models or multi_gpu:
            self.drop()
            return
        key = fleet_key(inputs)
        if self.planner is not None and key == self._key and not models_changed:
            return
        planner = IncrementalPlanner(
            inputs.demands, inputs.nodes, inputs.current, inputs.profiles, now, self.config
        )
        if not agrees(planner.plan, inputs.placements):
            log.info("incremental planner: its plan differs from the placements; planning in full")
            self.drop()
            return
        self.planner, self._key = planner, key
        self.builds += 1
