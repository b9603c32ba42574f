"""Single-model changes re-planned with the planner's incremental mode instead of a full plan.

At fleet size a full round costs seconds (10 000 models: 1.5-3 s); a change to a few models needs only
those models and what they touch re-planned
(:class:`~residency_operator.planner.incremental.IncrementalPlanner`). The operator keeps one incremental
planner for the fleet, built at a full round that found nothing to write (the cluster is at the plan) and
whose own plan agrees with every placement it knows, and uses it for rounds whose only triggers are, for a
few models (:class:`~residency_operator.changes.Changes`):

- a spec change (priority, SLO, ...), or the start of a deletion (the model is no longer wanted);
- a model that came (it takes one of the planner's spare rows) or is gone;
- a worker's report on a placement that is where the planner put it (a changed demand is re-planned; a
  report that changes nothing the planner reads only updates the model's status);
- a placement being deleted or gone, of a model the planner no longer places.

Anything else (a node, a profile, a Lease, a placement that is not where the plan has it, the resync)
plans in full; a full round that writes placements drops the incremental planner, since the cluster moved
under it. The resync's full plan repairs whatever the local view leaves suboptimal.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from residency.names import placement_name
from residency_operator.changes import Changes
from residency_operator.planner import CurrentPlacement, ModelDemand, Plan, PlannerConfig
from residency_operator.planner.incremental import IncrementalPlanner
from residency_operator.state import Inputs

log = logging.getLogger("residency.controller")

FleetKey = tuple[tuple[Any, ...], tuple[Any, ...]]
"""The nodes and the measured profiles a planner planned with."""
SPARE_ROWS = 32
"""Models that may arrive between two full plans without one (each takes a spare row of the planner)."""


def fleet_key(inputs: Inputs) -> FleetKey:
    return tuple(inputs.nodes), tuple(inputs.profiles)


def same_placement(planned: CurrentPlacement | None, observed: CurrentPlacement | None) -> bool:
    """Whether a placement as its worker reports it is where, and as, the planner took it to be. A loaded
    model and an idle one (loaded, no request for a few seconds: a matter of the clock) hold the same;
    the planner placed a changed model as ``loaded``, and a model nobody calls reports back ``idle``."""
    if planned is None or observed is None:
        return planned is None and observed is None
    return (
        planned.node == observed.node
        and abs(planned.resident_fraction - observed.resident_fraction) <= 1e-4
        and planned.mode == observed.mode
        and _HOLDS.get(planned.state, planned.state) == _HOLDS.get(observed.state, observed.state)
        and tuple(planned.gpus) == tuple(observed.gpus)
    )


_HOLDS = {"loaded": "holds", "idle": "holds"}


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

    def __init__(
        self, min_models: int, config: PlannerConfig, max_changes: int = 8, spare_rows: int = SPARE_ROWS
    ) -> None:
        self.min_models = min_models
        """Fleets smaller than this always plan in full (a full plan is fast there, and exact)."""
        self.max_changes = max_changes
        """At most this many models re-planned in one round (more: a full plan)."""
        self.spare_rows = spare_rows
        self.config = config
        self.planner: IncrementalPlanner | None = None
        self._key: FleetKey | None = None
        self._demands: dict[str, ModelDemand] = {}
        """Each model's demand as the planner last planned it (before the planner's own adjustments)."""
        self._wanted: set[str] = set()
        """The models the planner places or wants a place for."""
        self.builds = 0
        self.used = 0

    def drop(self) -> None:
        self.planner, self._key, self._demands, self._wanted = None, None, {}, set()

    def change(self, changes: Changes, inputs: Inputs, now: float) -> IncrementalChange | None:
        """The incremental plan for these changes, or ``None`` where this round must plan in full."""
        planner = self.planner
        touched = set(changes.models())
        if (
            planner is None
            or changes.other
            or not touched
            or len(touched) > self.max_changes * 8
            or inputs.idle
            or fleet_key(inputs) != self._key
        ):
            return None
        updates = self._updates(planner, changes, inputs)
        if updates is None or len(updates) > self.max_changes:
            return None
        wanted = (self._wanted - {k for k, d in updates.items() if not d.wanted}) | {
            k for k, d in updates.items() if d.wanted
        }
        if wanted != {d.name for d in inputs.demands if d.wanted}:
            return None  # a model came or went unseen (a missed event): the planner's fleet is not this one
        added = [k for k in updates if k not in planner.problem.model_index]
        if len(added) > planner.spares_left():
            return None
        result = planner.plan
        try:
            for key in sorted(updates):
                result = planner.add_model(updates[key], now)
                touched |= {key, *(a.model for a in result.actions)}
        except Exception:  # its state may be half-updated: never use it again; this round plans in full
            log.exception("incremental planning of %s failed; planning in full", sorted(updates))
            self.drop()
            return None
        self._demands.update(updates)
        for key in (k for k, d in updates.items() if not d.wanted and k not in inputs.bodies):
            self._demands.pop(key, None)  # gone: only its planner row stays, unwanted
        self._wanted = wanted
        self.used += 1
        return IncrementalChange(result, frozenset(touched))

    def _updates(
        self, planner: IncrementalPlanner, changes: Changes, inputs: Inputs
    ) -> dict[str, ModelDemand] | None:
        """The demands to re-plan for these changes (``None``: one of them needs a full plan)."""
        demands = {d.name: d for d in inputs.demands}
        known = planner.problem.model_index
        updates: dict[str, ModelDemand] = {}
        for key in changes.spec | changes.added:
            demand = demands.get(key)
            if demand is None or (key not in known and key not in changes.added):
                return None  # invalid now, or never planned: a full round says why
            updates[key] = demand
        observed: dict[str, CurrentPlacement] | None = None
        for key in changes.reported - updates.keys():
            demand = demands.get(key)
            if demand is None or key not in known:
                return None
            if observed is None:
                observed = {c.model: c for c in inputs.current}
            if not same_placement(planner.problem.current.get(key), observed.get(key)):
                return None  # not where the plan put it (failed, unloaded, moved by someone): plan in full
            if demand != self._demands.get(key):
                updates[key] = demand  # its measured demand moved
        for key in changes.ended - updates.keys():
            demand = demands.get(key)
            if demand is not None and demand.wanted:
                return None  # a placement ended under a model that still wants one
            if key in self._wanted:  # its deletion not seen (or gone at once): no longer wanted
                before = demand or self._demands.get(key)
                if before is None:
                    return None
                updates[key] = dataclasses.replace(before, wanted=False)
        return updates

    def after_full_round(self, inputs: Inputs, wrote: bool, now: float) -> None:
        """After a full round: drop the planner when the round wrote placements; keep it when nothing it
        planned from changed; else build one for this fleet (a round with nothing to write: the cluster
        is at the plan). A fleet with multi-GPU nodes always plans in full: the incremental planner packs
        nodes, and only :func:`~residency_operator.planner.plan` partitions their GPUs (planner/gpus.py)."""
        multi_gpu = any(len(n.gpus) > 1 for n in inputs.nodes)
        if wrote or inputs.idle or len(inputs.demands) < self.min_models or multi_gpu:
            self.drop()
            return
        key = fleet_key(inputs)
        demands = {d.name: d for d in inputs.demands}
        if self.planner is not None and key == self._key and demands == self._demands:
            return
        planner = IncrementalPlanner(
            inputs.demands,
            inputs.nodes,
            inputs.current,
            inputs.profiles,
            now,
            self.config,
            spare_rows=self.spare_rows,
        )
        if not agrees(planner.plan, inputs.placements):
            log.info("incremental planner: its plan differs from the placements; planning in full")
            self.drop()
            return
        self.planner, self._key = planner, key
        self._demands, self._wanted = demands, {d.name for d in inputs.demands if d.wanted}
        self.builds += 1
