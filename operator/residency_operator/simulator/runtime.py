"""The simulated cluster's per-model state, the outcomes it records, and the router in front of it.

The router's admission rule is the router's own (``residency_operator.router.admission``): every policy's
requests pass the same gate, so a model whose queue grows past what it serves within the TTFT target is
refused at once (429) instead of queueing until it times out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from residency_operator.planner.types import ExecutionMode, ModelDemand
from residency_operator.router.admission import Admission
from residency_operator.simulator.cluster import SimModel
from residency_operator.simulator.trace import Request


@dataclass(slots=True)
class ActiveRequest:
    """A request admitted into a model's batch."""

    request: Request
    prefill_remaining_seconds: float
    first_token_seconds: float | None = None
    tokens_done: float = 0.0


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How one request fared."""

    model: str
    arrival_seconds: float
    output_tokens: int
    completed: bool
    ttft_seconds: float | None
    tpot_seconds: float | None
    met_slo: bool
    dropped: bool
    """Not served: timed out waiting, or refused by the router's admission (``refused``)."""
    refused: bool = False
    """Refused at once by the router's admission (429), as the real router does."""


@dataclass(slots=True)
class ModelRuntime:
    """Simulated state of one model."""

    spec: SimModel
    demand: ModelDemand
    node: str | None = None
    resident_fraction: float = 0.0
    mode: ExecutionMode = "stream"
    cached_node: str | None = None
    busy_until_seconds: float = 0.0
    queue: deque[Request] = field(default_factory=deque)
    active: list[ActiveRequest] = field(default_factory=list)
    last_used_seconds: float = -1.0
    last_active_seconds: float = -1.0
    """When the model last had a request queued or running, or finished loading (the worker's
    lastActiveTime)."""
    recent_arrivals: deque[tuple[float, int, int]] = field(default_factory=deque)
    """(arrival second, output tokens, prompt tokens) of the requests of the last demand window."""
    parked_since_seconds: float | None = None
    """When a preemption parked the requests in flight (None: none parked)."""
    admitted: set[int] = field(default_factory=set)
    """``id()`` of the requests the router admitted (sent to the worker) that have not ended yet: the
    queued ones not among them are held by the router until the model is ready."""
    last_decode: tuple[str, float, ExecutionMode, int, float] | None = None
    """(node, resident fraction, mode, batch, step seconds) of its last decode step: what its worker reports
    as ``status.observedStep`` (the planner learns the engine from it, as in a real cluster)."""

    @property
    def running(self) -> bool:
        return self.node is not None


@dataclass(slots=True)
class Counters:
    """Events a policy caused."""

    preemptions: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    loads: int = 0
    """Cold loads from storage."""
    resumes: int = 0
    """Models brought back from their host-memory copy, at link speed."""
    migrations: int = 0
    reload_seconds: float = 0.0
    restarted_requests: int = 0


class RouterGate:
    """The router's admission control for the simulated models (docs/serving.md, "429 and 503"): a request
    for a model that is ready is admitted while fewer than the model's limit are in flight (one batch plus
    what its measured completion rate serves in a quarter of the TTFT target, cut while first tokens come
    late), else refused at once. A request for a model that is not ready is held (the router's hold), and
    passes the gate once the model is ready. Each model's TTFT target is the scenario's TTFT SLO; its floor
    its batch size. ``enabled=False`` admits everything (the simulator before admission, for ablations)."""

    def __init__(self, models: Iterable[SimModel], ttft_target_seconds: float, enabled: bool = True) -> None:
        self.admission = Admission(ttft_target_seconds=ttft_target_seconds, enabled=enabled)
        for model in models:
            self.admission.floors[model.name] = float(model.max_batch)
        self.refused = 0

    def try_admit(self, model: str, now_seconds: float) -> bool:
        """Whether the router sends a request for ``model`` on now (counted in flight until it ends)."""
        admitted = self.admission.try_admit(model, now_seconds) is None
        self.refused += int(not admitted)
        return admitted

    def first_token(self, model: str, ttft_seconds: float, at_seconds: float) -> None:
        self.admission.first_token(model, ttft_seconds, at_seconds)

    def finish(self, model: str, duration_seconds: float, at_seconds: float) -> None:
        self.admission.finish(model, duration_seconds, at_seconds)

    def release(self, model: str) -> None:
        """An admitted request that ended without an answer (it timed out): its slot back."""
        self.admission.release(model)
