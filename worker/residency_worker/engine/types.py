"""Plain data the engine reports: transfer timings, residency, model status, profile points, errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ExecutionMode = Literal["stream", "cpu"]
ModelState = Literal["loading", "ready", "preempted", "unloaded", "failed"]
TransferPath = Literal["pinned", "pageable"]
TransferDirection = Literal["host_to_device", "device_to_host", "host_to_host"]


class EngineError(Exception):
    """An engine failure the caller can act on; `reason` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_seconds = retry_after_seconds


def as_dict(value: Any) -> dict[str, Any]:
    """A JSON-ready dict of one of the dataclasses below."""
    result: dict[str, Any] = asdict(value)
    return result


@dataclass(frozen=True)
class TransferTiming:
    """One measured transfer: device synchronised before both clock reads."""

    what: str  # "weights" | "kv" | "calibration"
    direction: TransferDirection
    moved_bytes: int
    seconds: float
    gbps: float  # 1e9 bytes per second
    path: TransferPath
    copies: int
    streams: int
    emulated: bool

    @staticmethod
    def of(
        what: str,
        direction: TransferDirection,
        moved_bytes: int,
        seconds: float,
        *,
        path: TransferPath,
        copies: int,
        streams: int,
        emulated: bool,
    ) -> TransferTiming:
        seconds = max(seconds, 1e-9)
        return TransferTiming(
            what=what,
            direction=direction,
            moved_bytes=moved_bytes,
            seconds=seconds,
            gbps=moved_bytes / seconds / 1e9,
            path=path,
            copies=copies,
            streams=streams,
            emulated=emulated,
        )


@dataclass(frozen=True)
class GpuResidencyReport:
    """What one GPU of a model's pipeline holds, measured from its tier's allocations."""

    index: int  # the worker's number for the GPU
    requested_fraction: float  # the share of weight bytes the placement asked of it
    resident_fraction: float  # weight bytes on it / the model's weight bytes
    resident_bytes: int  # weights + KV on it
    reserved_bytes: int  # its reservation there (weights, KV, staging, workspace)


@dataclass(frozen=True)
class ResidencyReport:
    """Where a model's weights are, exactly, in bytes."""

    model: str
    requested_fraction: float
    resident_fraction: float  # resident_weight_bytes / weight_bytes, exact
    resident_weight_bytes: int
    weight_bytes: int
    resident_units: list[str]
    offloaded_units: list[str]
    decode_mode: ExecutionMode
    prefill_mode: ExecutionMode
    gpu_reserved_bytes: int  # weights + KV reservation + staging + workspace
    kv_reserved_bytes: int
    emulated: bool
    gpus: list[GpuResidencyReport] = field(default_factory=list)  # pipeline order


@dataclass(frozen=True)
class ObservedDemand:
    """Traffic a model saw over its last window (see ``ModelRunner.demand``)."""

    decode_tokens_per_second: float
    prompt_tokens_per_second: float
    typical_prompt_tokens: int | None  # mean prompt length; None without a request in the window
    window_seconds: float
    age_seconds: float  # how long the model has served here (a young window undercounts a steady rate)


@dataclass
class ModelTimings:
    """Measured costs of one model's lifecycle operations; the latest of each."""

    weight_bytes: int = 0
    load_seconds: float | None = None
    reload_seconds: float | None = None
    kv_save_seconds: float | None = None
    kv_restore_seconds: float | None = None
    kv_bytes: int = 0
    host_to_device_gbps: float | None = None
    load_transfer: TransferTiming | None = None
    reload_transfer: TransferTiming | None = None
    kv_save_transfer: TransferTiming | None = None
    kv_restore_transfer: TransferTiming | None = None
    residency_change_transfer: TransferTiming | None = None
    decode_tokens_per_second: float | None = None
    prefill_tokens_per_second: float | None = None
    paced_seconds: float = 0.0
    """Seconds the model held back decode steps, ahead of its SLO, while a neighbour on its GPU had requests
    waiting for a batch slot (cumulative since load)."""
    emulated: bool = True


@dataclass(frozen=True)
class PreemptReport:
    model: str
    kv_save: TransferTiming
    sequences_parked: int
    released_gpu_bytes: int
    seconds: float


@dataclass(frozen=True)
class ResumeReport:
    model: str
    reload: TransferTiming
    kv_restore: TransferTiming
    sequences_resumed: int
    seconds: float


@dataclass(frozen=True)
class LoadReport:
    model: str
    path: str
    model_type: str
    dtype: str
    load_seconds: float
    read_seconds: float  # safetensors → pinned host cache
    host_to_device: TransferTiming
    residency: ResidencyReport
    mode_choice: dict[str, float] = field(default_factory=dict)  # measured seconds per mode


@dataclass(frozen=True)
class ModelStatus:
    name: str
    path: str
    state: ModelState
    queue_depth: int
    active_sequences: int
    residency: ResidencyReport
    timings: ModelTimings


@dataclass(frozen=True)
class GpuReport:
    """One GPU the worker drives."""

    index: int
    device: str
    gpu_name: str
    budget_bytes: int
    reserved_bytes: int
    allocated_bytes: int
    host_to_device_peak: TransferTiming | None
    lost: str | None = None  # why the GPU is gone (nothing is placed on it any more)


@dataclass(frozen=True)
class NodeReport:
    """The node's GPUs together (budget, reserved and allocated bytes are sums over ``gpus``)."""

    node: str
    device: str
    gpu_name: str
    emulated: bool
    budget_bytes: int
    reserved_bytes: int
    allocated_bytes: int
    host_to_device_peak: TransferTiming | None
    nvml_used_bytes: int | None = None  # the physical GPU, all processes (real GPUs with NVML only)
    nvml_total_bytes: int | None = None
    gpus: list[GpuReport] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k likeliest


@dataclass(frozen=True)
class ProfilePoint:
    """One measurement of a sensitivity profile."""

    resident_fraction: float
    achieved_resident_fraction: float
    execution_mode: ExecutionMode
    sequence_length: int
    batch_size: int
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    trials: int
