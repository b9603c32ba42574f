"""Whether a split is worth its GPUs: what it serves within its model's SLO, against the model's demand and
against what those GPUs would serve for the fleet's other models.

A split is chosen when it is faster than offloading on one GPU (planner/gpus.py). That alone let a model
take several GPUs for a split that serves a small part of its demand, or none of it within its SLO, while
the GPUs it took would have served other models: on 4 x L4 nodes a 32B model split over three L4s serves
about 36 tokens/s and the small models that lose those GPUs take turns on the rest. So each split is also
weighed here, in tokens/s served within SLO:

- **What it serves** (:func:`slo_capacity`): the largest batch whose per-sequence rate still meets
  ``slo.minDecodeTokensPerSecond``, times that rate, at the best residency that fits; at most the model's
  demand. Its **gain** is that less what the model would serve offloaded on one GPU of the node.
- **What it displaces** (:class:`GpuMarket`): the demand of other models that no longer fit in the
  single GPUs left once the split takes its GPUs. Models are packed into the fleet's free single-GPU memory
  highest priority first, then densest demand (tokens/s per byte) first, whole-GPU footprints; what does
  not fit is displaced. The split's cost is the demand it displaces beyond what is displaced without it.
- **Whose demand counts**: a split that meets its SLO and serves most of its model's demand
  (``MOST_OF_DEMAND``) competes in its priority tier, as every placement does (priorities are strict tiers):
  only models of its priority or above count. One that serves less, or whose model is idle, competes with
  every model.

The split is made unless it displaces more than it gains (a running split: ``KEEP_MARGIN`` times more, as
moving it costs a reload). Where it displaces nothing (GPUs nobody else needs) the speed rule alone decides,
so a model that only a split can hold still gets one whenever its GPUs are not worth more elsewhere.
This is an estimate made before the solvers run: it ignores time-sharing and partial residency of the other
models, which the solvers then decide on the GPUs left.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from residency_operator.planner.options import gpu_bytes_needed
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.types import ModelDemand, NodeCapacity, PlannerConfig

MOST_OF_DEMAND = 0.5
"""A split serving at least this share of its model's demand within SLO competes in its priority tier."""
KEEP_MARGIN = 1.5
"""A running split gives its GPUs up only where it displaces this many times what it gains (hysteresis)."""


def slo_capacity(
    predictor: Predictor, model: ModelDemand, unit: NodeCapacity, levels: Iterable[float]
) -> float:
    """Decode tokens/s the model serves on ``unit`` with every sequence at or above its SLO, at the highest of
    ``levels`` (resident fractions that fit: a rate never falls with more of the model resident) in the best
    of its allowed modes: the largest batch whose per-sequence rate meets the SLO, times that rate; 0 where
    even one sequence misses it (or nothing fits). Without an SLO, a full batch."""
    slo = model.min_decode_tokens_per_second or 0.0
    best = 0.0
    for level in sorted(levels)[-1:]:
        for mode in model.allowed_modes:
            for batch in range(model.max_batch, 0, -1):
                rate = predictor.decode_tokens_per_second(model, unit, level, mode, batch=batch)
                if rate >= slo - 1e-9:
                    best = max(best, batch * rate)
                    break
    return best


def asks_for_service(model: ModelDemand) -> bool:
    """Its demand is unknown or above zero, a request waits for it, or it has never been loaded."""
    demand = model.demand_decode_tokens_per_second
    return demand is None or demand > 0 or model.waiting_requests > 0 or not model.has_served


def served(capacity: float, model: ModelDemand) -> float:
    """Tokens/s a placement of ``capacity`` serves of the model's demand (all of it where none is measured
    yet but the model asks for service: a new model, or requests waiting)."""
    demand = model.demand_decode_tokens_per_second
    if demand is None or (demand <= 0 and asks_for_service(model)):
        return capacity
    return min(capacity, demand)


@dataclass(frozen=True, slots=True)
class Worth:
    """A split weighed against its GPUs' other use (tokens/s within SLO)."""

    gain: float
    """What it serves beyond the model's best offload on one GPU."""
    displaced: float
    """Demand of the models that counted and no longer fit the single GPUs left."""
    whole_fleet: bool
    """Whether every model's demand counted (it serves less than most of its demand, or is idle)."""

    def wins(self, running: bool) -> bool:
        if self.displaced <= 1e-9:
            return True
        return self.gain * (KEEP_MARGIN if running else 1.0) >= self.displaced


@dataclass(frozen=True, slots=True)
class _Claim:
    priority: int
    density: float
    footprint: int
    demand: float


class GpuMarket:
    """The fleet's single-GPU memory and the models that would use it: what a split's GPUs are worth to
    them. ``free_bytes`` is the usable memory of every single GPU not yet given to a split this round."""

    def __init__(
        self,
        others: Sequence[ModelDemand],
        free_bytes: int,
        largest_gpu_bytes: int,
        config: PlannerConfig,
    ) -> None:
        self.free_bytes = free_bytes
        claims = []
        for model in others:
            demand = model.demand_decode_tokens_per_second
            # unknown demand: only its availability is at stake, as the objective values it
            asked = config.availability_value_tokens_per_second if demand is None else max(0.0, demand)
            footprint = max(1, min(gpu_bytes_needed(model, 1.0, "stream"), largest_gpu_bytes))
            claims.append(_Claim(model.priority, asked / footprint, footprint, asked))
        self._claims = sorted(claims, key=lambda c: (-c.priority, -c.density))
        self._ends = list(itertools.accumulate(c.footprint for c in self._claims))
        """Bytes the claims up to each one take, in packing order."""
        self._tails: dict[int | None, list[float]] = {}

    def _tail(self, min_priority: int | None) -> list[float]:
        """Per position, the demand that counts of the claims from there on (suffix sums)."""
        tail = self._tails.get(min_priority)
        if tail is None:
            counted = [
                c.demand if min_priority is None or c.priority >= min_priority else 0.0 for c in self._claims
            ]
            tail = [*list(itertools.accumulate(reversed(counted)))[::-1], 0.0]
            self._tails[min_priority] = tail
        return tail

    def displaced(self, free_bytes: int, min_priority: int | None) -> float:
        """Demand (of models of ``min_priority`` or above; all where None) not fitting ``free_bytes``."""
        first = bisect.bisect_right(self._ends, free_bytes)  # the first claim that does not fit whole
        if first == len(self._claims):
            return 0.0
        tail = self._tail(min_priority)
        claim = self._claims[first]
        start = self._ends[first] - claim.footprint
        counts = min_priority is None or claim.priority >= min_priority
        fits = max(0, free_bytes - start)
        partial = claim.demand * (1.0 - fits / claim.footprint) if counts else 0.0
        return partial + tail[first + 1]

    def worth(self, model: ModelDemand, split: float, alone: float, taken_bytes: int) -> Worth:
        """The split of ``taken_bytes`` of single-GPU memory that serves ``split`` tokens/s within SLO, where
        one GPU would serve ``alone``."""
        demand = model.demand_decode_tokens_per_second
        serves_most = (
            split > 0
            and asks_for_service(model)
            and (demand is None or served(split, model) >= MOST_OF_DEMAND * demand)
        )
        floor = None if not serves_most else model.priority
        displaced = self.displaced(self.free_bytes - taken_bytes, floor) - self.displaced(
            self.free_bytes, floor
        )
        gain = served(split, model) - served(alone, model)
        return Worth(gain, max(0.0, displaced), floor is None)

    def take(self, taken_bytes: int) -> None:
        """A split was made: its GPUs are no longer single GPUs for the others."""
        self.free_bytes -= taken_bytes
