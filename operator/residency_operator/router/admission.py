"""Admission control at the router: each model admits as many concurrent requests as it serves within a
time-to-first-token target; the rest are refused at once (429 + Retry-After), before any work is done.

The limit adapts to what the model shows (AIMD, as TCP and Netflix's concurrency-limits do): a first token
later than the target cuts the limit by a tenth (at most once per target interval, so one slow burst does
not collapse it); a quick first token while the limit is nearly used raises it by one. `Retry-After` says
when the refused request would find a slot: the requests refused lately, drained at the model's measured
rate (limit / seconds per request). Pure: no I/O, the clock is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_TTFT_TARGET_SECONDS = 2.0


@dataclass
class ModelGate:
    """The admission state of one model."""

    limit: float
    in_flight: int = 0
    seconds_per_request: float = 1.0  # moving average of admitted requests' durations
    recent_refusals: float = 0.0  # refusals, decaying with a time constant of seconds_per_request
    refusals_seen_at: float = 0.0
    last_cut_at: float = -math.inf


@dataclass(frozen=True)
class Refusal:
    retry_after_seconds: int
    message: str


@dataclass
class Admission:
    ttft_target_seconds: float = DEFAULT_TTFT_TARGET_SECONDS
    initial_limit: float = 32.0
    min_limit: float = 1.0
    max_limit: float = 4096.0
    max_retry_after_seconds: int = 30
    enabled: bool = True  # off: every request is admitted (counted, never refused), as before admission
    gates: dict[str, ModelGate] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    """Per model, its own TTFT target (spec.slo.maxTimeToFirstTokenSeconds) where it has one."""

    floors: dict[str, float] = field(default_factory=dict)
    """Per model, the least limit: its batch size (spec.maxBatchSize). Fewer requests than one batch in
    flight cannot shorten anyone's wait for a first token, only leave the batch part empty."""

    def target_of(self, key: str) -> float:
        return self.targets.get(key, self.ttft_target_seconds)

    def floor_of(self, key: str) -> float:
        return max(self.min_limit, self.floors.get(key, self.min_limit))

    def gate(self, key: str) -> ModelGate:
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = ModelGate(limit=self.initial_limit)
        return gate

    def try_admit(self, key: str, now: float) -> Refusal | None:
        """Admits a request for `key` (in flight until `finish`), or says why not and when to retry."""
        gate = self.gate(key)
        if gate.in_flight < math.floor(gate.limit) or not self.enabled:
            gate.in_flight += 1
            return None
        self._decay(gate, now)
        gate.recent_refusals += 1
        drain_rate = max(gate.limit, 1.0) / max(gate.seconds_per_request, 1e-3)  # requests per second
        wait_seconds = gate.recent_refusals / drain_rate
        retry = min(self.max_retry_after_seconds, max(1, math.ceil(wait_seconds)))
        message = (
            f"model {key} is at its admission limit ({gate.in_flight} requests in flight, limit "
            f"{math.floor(gate.limit)} for a {self.target_of(key):g} s time-to-first-token target); "
            f"retry after {retry} s"
        )
        return Refusal(retry, message)

    def first_token(self, key: str, ttft_seconds: float, now: float) -> None:
        """Adapts the limit to an admitted request's time to first token."""
        gate = self.gate(key)
        target = self.target_of(key)
        if ttft_seconds > target:
            if now - gate.last_cut_at >= target:
                gate.limit = max(self.floor_of(key), gate.limit * 0.9)
                gate.last_cut_at = now
        elif ttft_seconds < target / 2 and gate.in_flight >= 0.8 * gate.limit:
            gate.limit = min(self.max_limit, gate.limit + 1.0)

    def finish(self, key: str, duration_seconds: float) -> None:
        """An admitted request ended (answered, failed or cancelled)."""
        gate = self.gate(key)
        gate.in_flight = max(0, gate.in_flight - 1)
        gate.seconds_per_request += 0.1 * (duration_seconds - gate.seconds_per_request)

    def release(self, key: str) -> None:
        """An admitted attempt that did not run (worker away or not ready): its slot back, no statistics."""
        gate = self.gate(key)
        gate.in_flight = max(0, gate.in_flight - 1)

    @staticmethod
    def _decay(gate: ModelGate, now: float) -> None:
        elapsed = max(0.0, now - gate.refusals_seen_at)
        gate.recent_refusals *= math.exp(-elapsed / max(gate.seconds_per_request, 0.1))
        gate.refusals_seen_at = now
