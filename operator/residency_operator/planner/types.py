"""Plain typed inputs and outputs of the planner.

The operator converts CRD objects into these; the simulator builds them directly. Nothing here knows
about Kubernetes. Every quantity carries its unit in its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

GIB = 1024**3
GB = 1e9

ExecutionMode = Literal["stream", "cpu"]
"""How offloaded layers decode: ``stream`` copies them to the GPU each step, ``cpu`` computes them on the host
where they live. Prefill streams them in both modes, as the worker does (``residency.api.placement.
PREFILL_MODE``): a prompt is compute-bound, and the GPU computes it faster even counting the copy."""

PlacementState = Literal["loaded", "preempted", "idle"]
"""``loaded`` runs on the GPU; ``preempted`` keeps weights and KV cache pinned in host memory; ``idle`` is
loaded but served no traffic recently (it counts as loaded for memory)."""

ActionKind = Literal["load", "promote", "demote", "reconfigure", "preempt", "resume", "migrate", "evict"]

SolverName = Literal["milp", "greedy", "incremental"]


@dataclass(frozen=True, slots=True)
class ObservedPoint:
    """A model's median decode step as its worker observed it over a window: where it ran and how fast."""

    gpu_type: str
    resident_fraction: float
    mode: ExecutionMode
    batch: int
    sequence_tokens: int
    step_seconds: float


@dataclass(frozen=True, slots=True)
class ModelDemand:
    """What one LLMModel asks for, and how much traffic it is seeing."""

    name: str
    """Namespaced name, ``namespace/name``; the key of every map in the planner."""
    weight_bytes: int
    kv_bytes_per_token: int
    max_sequence_length: int = 4096
    max_batch: int = 8
    priority: int = 0
    preemptible: bool = True
    min_decode_tokens_per_second: float | None = None
    """Per-sequence decode rate the placement must keep (the SLO); ``None`` means any rate will do."""
    max_offload_fraction: float = 0.0
    """At most this share of weight bytes may live in host memory (``offload.maxFraction``)."""
    layer_count: int | None = None
    bytes_per_layer: int | None = None
    unit_bytes: tuple[int, ...] = ()
    """Bytes of each unit the engine places (head, layers, untied embedding, from the safetensors headers):
    with them a partial placement's resident bytes and staging buffers are counted exactly as the worker
    will hold them; without, from the fraction plus one unit of slack."""
    parameter_count: int | None = None
    """Used for the prefill compute roofline; derived from weight bytes (2 bytes each) when absent."""
    demand_decode_tokens_per_second: float | None = None
    """Observed or forecast output tokens/s across all requests; ``None`` means unbounded."""
    typical_sequence_length: int | None = None
    """Prompt + generated tokens of a typical request; the predictor uses it for KV reads (default: max/2)."""
    prompt_tokens_per_second: float | None = None
    """Observed prompt tokens/s across all requests: the prefill work the model's GPU must also do. Its
    share of the GPU's time is counted with the decode time and slows this model's own decoding; ``None``
    (nothing observed) counts no prefill time."""
    typical_prompt_tokens: int | None = None
    """Prompt tokens of a typical request (the weights are read once per prompt); default: half the
    typical sequence."""
    workspace_bytes: int = 512 * 1024**2
    """Activations and allocator slack kept free on the GPU beside the weights and KV reservation."""
    allowed_modes: tuple[ExecutionMode, ...] = ("stream", "cpu")
    storage_read_gbps: float | None = None
    """Measured read bandwidth of the model's source (for cold loads); node default when ``None``."""
    last_reload_seconds: float | None = None
    """Last observed reload (resume) duration; the cost model prefers it to its own estimate."""
    wanted: bool = True
    """False when the model is scaled to zero or being deleted: it is evicted, and never unschedulable."""
    waiting_requests: int = 0
    """Requests waiting for this model now (the router holds them while it is not running). A waiting
    model the solvers leave out takes the GPU memory of idle models (see ``planner/swapin.py``)."""
    has_served: bool = True
    """False while the model has never been loaded anywhere: nobody could call it yet, so a demand of 0 is
    no evidence that it is idle (``planner/demand.py``); it is placed at its declared priority."""
    observed: ObservedPoint | None = None
    """The model's decode steps as observed on a node (``ModelPlacementStatus.observedStep``): on that GPU
    type the predictor anchors the model's curve to it (see ``Predictor.observed_ratio``)."""
    yielded_priority: int = 0
    """Set by the planner, not its callers: how far ``priority`` was lowered because the model is idle
    (see ``planner/demand.py``); ``declared_priority`` is what the user wrote."""
    host_copy_kept: bool = False
    """Set by the planner, not its callers: a ``preemptible: false`` model that is idle, whose weights and KV
    cache keep a place in its node's host memory set aside for this plan: it may leave the GPU, never host
    memory (``planner/demand.py``). With no demand it is planned ``preemptible``; quiet for the worker's
    idle interval only, it may give way to a waiting model (``planner/swapin.py``)."""

    @property
    def declared_priority(self) -> int:
        """``spec.priority`` as written, before an idle model yields (see ``planner/demand.py``)."""
        return self.priority + self.yielded_priority

    @property
    def min_resident_fraction(self) -> float:
        """The smallest resident fraction ``offload.maxFraction`` allows."""
        return max(0.0, 1.0 - self.max_offload_fraction)

    @property
    def effective_layer_count(self) -> int:
        """Number of transformer layers (estimated from weight size when not declared)."""
        if self.layer_count is not None and self.layer_count > 0:
            return self.layer_count
        if self.bytes_per_layer:
            return max(1, round(self.weight_bytes / self.bytes_per_layer))
        return 32

    @property
    def effective_bytes_per_layer(self) -> int:
        """Bytes of one layer, used to size the double buffer of stream mode."""
        if self.bytes_per_layer:
            return self.bytes_per_layer
        return max(1, self.weight_bytes // self.effective_layer_count)

    @property
    def effective_prompt_tokens(self) -> int:
        """Prompt tokens of a typical request (see ``typical_prompt_tokens``)."""
        if self.typical_prompt_tokens is not None and self.typical_prompt_tokens > 0:
            return self.typical_prompt_tokens
        sequence = self.typical_sequence_length or self.max_sequence_length
        return max(1, min(sequence, self.max_sequence_length) // 2)

    @property
    def effective_parameter_count(self) -> int:
        """Parameter count for compute estimates."""
        return self.parameter_count if self.parameter_count else self.weight_bytes // 2

    @property
    def kv_reservation_bytes(self) -> int:
        """GPU bytes reserved for the KV cache of a full batch at maximum sequence length."""
        return self.kv_bytes_per_token * self.max_sequence_length * self.max_batch


def waiting_demand(model: ModelDemand) -> float:
    """Demand of a model that is not running, whose traffic no worker measures: the requests waiting for
    it, each at its SLO (1 tok/s without one), at most a full batch. Zero when none waits, so a model
    nobody asks for does not outbid models whose traffic is measured; a waiting one is worth at least
    what its waiting requests ask for."""
    rate = model.min_decode_tokens_per_second or 1.0
    return float(min(model.waiting_requests, model.max_batch)) * rate


def with_backlog(model: ModelDemand) -> ModelDemand:
    """A model's measured demand, raised to at least :func:`waiting_demand`: requests queued beyond its
    free batch slots mean the last minute's rate lags what is asked now. Without this, a model that just
    resumed, its backlog still queued, was worth less than the same backlog waiting for a model that does
    not run (valued so by its caller), and two models of one tier took turns preempting each other every
    round, each reload serving nothing. The same holds whether the model runs or not: were only a running
    model raised, one whose old report is below its backlog (a placement still pending) would be admitted
    on the low figure, found too busy to keep once it ran, preempted, and admitted again, every round."""
    demand = model.demand_decode_tokens_per_second
    if demand is None or not model.waiting_requests:
        return model
    backlog = waiting_demand(model)
    return model if backlog <= demand else replace(model, demand_decode_tokens_per_second=backlog)


@dataclass(frozen=True, slots=True)
class GpuCapacity:
    """One GPU of a multi-GPU node: its memory budget and bandwidths (``NodeProfile.spec.gpus``)."""

    index: int
    memory_bytes: int
    hbm_gbps: float
    host_to_device_gbps: float
    """Pinned host-to-device GB/s of this GPU copying alone."""
    host_link: int = 0
    """The host link (PCIe root or switch) it copies through; GPUs with one id share it."""
    reserved_bytes: int = 0
    """Memory on this GPU the planner does not place (CUDA context, other pods)."""

    @property
    def usable_bytes(self) -> int:
        """Bytes the planner may fill on this GPU."""
        return max(0, self.memory_bytes - self.reserved_bytes)


@dataclass(frozen=True, slots=True)
class HostLinkCapacity:
    """A host link several GPUs of a node copy through, with what it carries when all of them copy."""

    id: int
    gpus: tuple[int, ...]
    concurrent_host_to_device_gbps: float


@dataclass(frozen=True, slots=True)
class GpuShare:
    """One GPU of a placement's pipeline and the share of the model's weight bytes it holds."""

    index: int
    resident_fraction: float


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """A GPU node as the planner sees it: memory, bandwidths and whether it may take work."""

    name: str
    gpu_type: str
    gpu_memory_bytes: int
    host_memory_bytes: int
    host_to_device_gbps: float
    """Measured pinned host-to-device bandwidth (GB/s, 1e9 bytes)."""
    hbm_gbps: float
    host_memory_gbps: float
    """Host DRAM bandwidth available to CPU execution of offloaded layers."""
    gpu_tflops: float = 100.0
    """Dense bf16 compute the prefill roofline may count on."""
    storage_read_gbps: float = 2.0
    schedulable: bool = True
    cordoned: bool = False
    disrupting: bool = False
    calibration_factor: float = 1.0
    """Observed / predicted decode rate on this node, learned by the operator; scales the roofline."""
    reserved_gpu_bytes: int = 0
    """GPU memory used by things the planner does not place (CUDA context, other pods)."""
    reserved_host_bytes: int = 0
    device_to_host_gbps: float | None = None
    load_overhead_seconds: float = 1.0
    """Fixed cost of starting a model (allocations, graph capture) on top of the bytes it moves."""
    gpus: tuple[GpuCapacity, ...] = ()
    """Each GPU of a node with several (empty: one GPU, described by the node-level fields). The node-level
    ``gpu_memory_bytes`` and ``reserved_gpu_bytes`` are then the sums over them; the planner packs the GPUs
    (planner/gpus.py)."""
    host_links: tuple[HostLinkCapacity, ...] = ()
    """Host links shared by several of ``gpus``, with their measured concurrent bandwidth."""
    device_to_device_gbps: float | None = None
    """GPU-to-GPU copy GB/s (activations between the stages of a split); the host link's when unknown."""
    pipeline_hop_seconds: float = 0.0
    """Seconds a decode step spends passing activations between GPUs: set by the planner on the GPU set a
    split model runs on (planner/gpus.py), 0 on one GPU."""
    machine: str | None = None
    """Set by the planner on a GPU set of a multi-GPU node: the node it is part of (a model cached in that
    node's host memory resumes on any of its GPU sets)."""
    reserved_for: frozenset[str] | None = None
    """Set by the planner on the GPU sets it formed for split models (planner/gpus.py): only those models may
    run there."""
    closed_to: frozenset[str] = frozenset()
    """Set by the planner on a node whose host memory holds the copy of an idle ``preemptible: false`` model
    that left its GPU: the busy pinned models of a lower priority waiting for a place may not be placed there
    (placed, they would never give the room back; ``PlanningProblem``)."""

    @property
    def accepts_work(self) -> bool:
        """Whether the planner may put anything on this node."""
        return self.schedulable and not self.cordoned and not self.disrupting

    @property
    def effective_device_to_host_gbps(self) -> float:
        """Device-to-host bandwidth, assumed equal to host-to-device when not measured."""
        return self.device_to_host_gbps if self.device_to_host_gbps else self.host_to_device_gbps


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """One measurement of a sensitivity curve."""

    resident_fraction: float
    decode_tokens_per_second: float
    prefill_tokens_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class SensitivityProfile:
    """Measured decode (and prefill) rate of one model on one GPU type, as residency varies."""

    model: str
    gpu_type: str
    points: tuple[ProfilePoint, ...]
    mode: ExecutionMode = "stream"
    sequence_length: int = 1024
    batch: int = 1


@dataclass(frozen=True, slots=True)
class CurrentPlacement:
    """What the cluster is doing now for one model (observed, not desired)."""

    model: str
    node: str
    resident_fraction: float
    mode: ExecutionMode = "stream"
    state: PlacementState = "loaded"
    kv_cache_bytes: int = 0
    """KV bytes in use now (saved to host on preemption)."""
    gpus: tuple[int, ...] = ()
    """The node's GPUs it runs on, in pipeline order (empty: GPU 0, or a single-GPU node)."""

    @property
    def is_running(self) -> bool:
        """Loaded or idle: it holds GPU memory."""
        return self.state in ("loaded", "idle")


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """Knobs of the planner; defaults are what the operator runs with."""

    residency_levels: tuple[float, ...] = (
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.75,
        0.8,
        0.85,
        0.9,
        0.95,
        1.0,
    )
    """Discrete resident fractions the solver chooses among (plus each model's current fraction)."""
    amortisation_horizon_seconds: float = 600.0
    """Transition costs are spread over this horizon when weighed against throughput gains."""
    hysteresis_fraction: float = 0.05
    """A change must beat the current placement by this share of its value to be worth making."""
    demand_headroom: float = 2.0
    """Capacity up to this multiple of the observed demand counts as served: traffic is bursty, and a
    placement sized to the mean queues every burst."""
    availability_value_tokens_per_second: float = 1.0
    """Value of merely being loaded (so idle models stay available while room allows)."""
    excess_throughput_weight: float = 0.5
    """Capacity beyond demand still counts a little (lower latency), so free memory is never left idle:
    at most this share of the availability value."""
    memory_penalty_per_gib: float = 1e-3
    offload_penalty_per_gib: float = 2e-3
    """Tie-breaker against offloaded bytes, above the memory penalty: among equal predicted values (e.g. an
    emulated tier, where host and "GPU" memory are the same DRAM) a model stays fully resident if it fits."""
    """Tie-breaker: among equal values, prefer the placement that uses fewer GPU bytes."""
    gpu_time_penalty: float = 0.08
    """Tie-breaker for GPU time: a whole GPU's time weighs like 80 GiB of its memory."""
    max_gpu_busy_fraction: float = 0.95
    """Models on one GPU take turns; their demand may keep it busy at most this share of the time."""
    incumbent_time_slack: float = 0.0
    """Share of a GPU's time the models already running on it may claim beyond all of it, and beyond what
    each one's SLO tolerates of the others, before the least important of them is moved off (the greedy's
    seating): the time claimed is an estimate from the last minute's demand, and a move is a cold load on
    another node. Off by default: a model kept so may miss its SLO beside its neighbours by the estimate,
    which the plan-validity property (tests/unit/test_planner_properties.py) forbids, and on
    priority-burst a production burst met a batch model kept on the H100 (seed 5: top tier 80 % -> 72 %).
    At 0.1 the oversubscribed fleets migrated 43 % less and served 2-5 % more (docs/planner.md, "Fewer
    reseatings")."""
    solver: Literal["auto", "milp", "greedy"] = "auto"
    milp_max_options: int = 3000
    """``auto`` uses the exact MILP up to this many (model, node, level, mode) options."""
    milp_time_limit_seconds: float = 2.0
    bound_max_options: int = 5000
    """The LP relaxation bound of the greedy is computed up to this many options; above, a simple bound."""
    default_kv_save_overhead_seconds: float = 0.05
    keep_preempted_cache: bool = True
    """Keep weights and KV of preempted models pinned in host memory while it fits (fast resume)."""
    repack_rounds: int = 0
    """Neighbourhoods a full greedy plan re-solves exactly where it left busy models out (planner/repack.py);
    0 (the default) turns repacking off. Off because on the simulator's fleet scenarios every neighbourhood
    MILP (about 300 options) hit its time limit before a feasible solution: 0.6 s more per plan, nothing
    repacked. It finds the exact answer on small fragmented cases (tests/unit/test_planner_repack.py)."""
    repack_max_models: int = 2000
    """Fleets of more models skip repacking (each neighbourhood is a MILP; the scale goal is one second
    for 10 000 models)."""
    idle_models_yield: bool = True
    """A model with no demand yields its priority to busy models of any priority (``planner/demand.py``);
    False: priorities are strict tiers over memory, busy or not."""
    idle_gives_way_to_any_priority: bool = True
    """A running model that is idle now (no request for the worker's idle interval) may give its GPU memory
    to a waiting model of any priority, its weights kept in host memory (``planner/swapin.py``); it comes
    back at its own priority with its next request. False: only to a waiting model of its own priority or
    higher. (fleet-zipf-shift, first 300 s, seed 11: SLO-met goodput 2214 -> 2509 tok/s, top tier 98% both;
    fleet-edge-bursts, first 400 s: 2334 -> 2575; priority-burst unchanged.)"""
    idle_pinned_models_leave_gpu: bool = True
    """An idle ``preemptible: false`` model may give up all of its GPU memory like any idle model, its
    weights and KV cache kept in host memory that the plan sets aside on its node (never evicted past host
    memory; ``planner/demand.py``), and is resumed at link speed when its demand returns. False: the older
    rule, such a model is only demoted within its ``offload.maxFraction`` and SLO and keeps its GPU."""
    idle_demand_tokens_per_second: float = 0.0
    """Known demand at or below this (and no request waiting) counts as idle. 0: no request over the demand
    window. (On fleet-zipf-shift, 600 s, seed 11, residency's SLO-met goodput was 2838 tok/s with strict
    tiers, 3130 yielding at 0 tok/s, 3347 at 5, 3172 at 20; at 5 the incremental planner's plans fell to
    0.93 of a full plan's value in test_planner_incremental, so the default stays at no demand.)"""
    allow_gpu_splits: bool = True
    """A model larger than one GPU may run split by layers across several GPUs of one node (planner/gpus.py);
    False: every model runs on one GPU, the rest of it offloaded to host memory (the simulator's
    ``residency-no-split`` policy)."""


@dataclass(frozen=True, slots=True)
class PlannedPlacement:
    """Where one model runs in the plan, with the prediction that status shows."""

    model: str
    node: str
    resident_fraction: float
    mode: ExecutionMode
    gpu_bytes: int
    host_bytes: int
    gpu_busy_fraction: float
    """Share of the node's GPU time its observed demand is predicted to take."""
    predicted_decode_tokens_per_second: float
    """Per-sequence decode rate at the model's batch (what the SLO is checked against)."""
    predicted_throughput_tokens_per_second: float
    """Aggregate decode rate of a full batch."""
    predicted_prefill_tokens_per_second: float
    meets_slo: bool = True
    prediction_source: str = "roofline"
    """Where the decode prediction came from: ``observed``, ``profile``, ``fitted`` or ``roofline``
    (Predictor.source)."""
    observed_ratio: float | None = None
    """The model's observed decode rate ÷ what its profile, fit or roofline predicted at the same residency,
    batch and context (Predictor.observed_ratio); None without an observation on this GPU type."""
    gpus: tuple[GpuShare, ...] = ()
    """On a multi-GPU node: its GPUs in pipeline order, each with its share of the weight bytes (the shares
    sum to ``resident_fraction``); empty on a single-GPU node."""


@dataclass(frozen=True, slots=True)
class CachedModel:
    """A preempted model whose weights and KV cache stay pinned in a node's host memory."""

    model: str
    node: str
    host_bytes: int


@dataclass(frozen=True, slots=True)
class Action:
    """One step that takes the cluster from its current state towards the plan."""

    kind: ActionKind
    model: str
    reason: str
    from_node: str | None = None
    to_node: str | None = None
    from_resident_fraction: float = 0.0
    to_resident_fraction: float = 0.0
    mode: ExecutionMode | None = None
    bytes_moved: int = 0
    predicted_seconds: float = 0.0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """A wanted model the plan could not run, and why, in words a person understands."""

    model: str
    reason: str
    """CamelCase reason for the status condition, e.g. ``InsufficientGPUMemory``."""
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The planner's answer: the desired state, the ordered steps to reach it, and what did not fit."""

    placements: dict[str, PlannedPlacement]
    actions: tuple[Action, ...]
    unschedulable: tuple[Unschedulable, ...]
    cached: tuple[CachedModel, ...] = ()
    solver: SolverName = "greedy"
    objective: float = 0.0
    """Value of the plan: Σ served throughput (tokens/s) + availability - amortised transition cost."""
    upper_bound: float = 0.0
    optimality_gap: float = 0.0
    """(upper_bound - objective) / upper_bound; 0 for a proven optimum."""
    solve_seconds: float = 0.0
    planned_at_seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())
