"""Admission control at the router: each model admits as many concurrent requests as it serves within a
time-to-first-token target; the rest are refused at once (429 + Retry-After), before any work is done.

Two bounds, the lower one holds:
- **the measured service rate** (Little's law): a model finishes `rate` requests per second; one batch
  (spec.maxBatchSize) runs at once and the requests beyond it wait in the worker's queue for a slot, which
  frees at that rate. Admitting at most `batch + rate * target * QUEUE_SHARE` keeps the wait of the last
  one admitted within QUEUE_SHARE of the target, the rest of the target left to its prefill, the network
  and the event loops on the way.
- **the first tokens seen** (AIMD, as TCP and Netflix's concurrency-limits do): a first token later than
  ROUTER_SHARE_OF_TARGET of the target cuts the limit by a tenth (so one slow burst does not collapse
  it); a quick one while the limit is nearly used raises it by one, up to the rate bound. Each at most
  once per target interval: a model serving dozens of requests a second would otherwise raise its limit
  on every quick one, far faster than the cuts its slow tail calls for.

A model's limit never falls below one batch: fewer in flight cannot shorten anyone's wait, only leave the
batch part empty. `Retry-After` says when the refused request would find a slot: the requests refused
lately, drained at the model's measured rate. Pure: no I/O, the clock is passed in.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

DEFAULT_TTFT_TARGET_SECONDS = 2.0
DEFAULT_BATCH = 8.0
"""The batch of a model whose spec names none (LLMModel's spec.maxBatchSize defaults to 8)."""
QUEUE_SHARE = 0.25
"""The share of the TTFT target an admitted request may spend waiting for a batch slot."""
RATE_WINDOW_SECONDS = 10.0
"""The service rate is the completions of this window, per second."""
MIN_COMPLETIONS_FOR_RATE = 8
"""Fewer completions in the window say nothing of the rate: the bound waits for them."""
ROUTER_SHARE_OF_TARGET = 0.75
"""A first token the router sees later than this share of the target cuts the limit: the client's own
part of its wait (its network, its event loop, the router's loop before the request reaches the app) is
not in the router's view."""


@dataclass
class ModelGate:
    """The admission state of one model."""

    limit: float
    in_flight: int = 0
    seconds_per_request: float = 1.0  # moving average of admitted requests' durations
    finished_at: deque[float] = field(default_factory=deque)  # completions of the rate window
    recent_refusals: float = 0.0  # refusals, decaying with a time constant of seconds_per_request
    refusals_seen_at: float = 0.0
    last_cut_at: float = -math.inf
    last_raise_at: float = -math.inf


@dataclass(frozen=True)
class Refusal:
    retry_after_seconds: int
    message: str


@dataclass
class Admission:
    ttft_target_seconds: float = DEFAULT_TTFT_TARGET_SECONDS
    initial_limit: float | None = None
    """A new model's limit until its rate is measured; None: two batches (one running, one waiting)."""
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
            batch = self.floors.get(key, DEFAULT_BATCH)
            initial = 2 * batch if self.initial_limit is None else self.initial_limit
            gate = self.gates[key] = ModelGate(limit=min(self.max_limit, initial))
        return gate

    def service_rate(self, key: str, now: float) -> float | None:
        """Requests per second the model finished over the rate window; None before enough finished."""
        gate = self.gate(key)
        while gate.finished_at and gate.finished_at[0] < now - RATE_WINDOW_SECONDS:
            gate.finished_at.popleft()
        if len(gate.finished_at) < MIN_COMPLETIONS_FOR_RATE:
            return None
        return len(gate.finished_at) / RATE_WINDOW_SECONDS

    def rate_bound(self, key: str, now: float) -> float | None:
        """The most requests in flight that the measured rate serves within the target (see above)."""
        rate = self.service_rate(key, now)
        if rate is None:
            return None
        bound = self.floor_of(key) + rate * self.target_of(key) * QUEUE_SHARE
        return min(self.max_limit, bound)

    def limit_of(self, key: str, now: float) -> int:
        """Requests the model admits at once now: the lower bound of the two, never under one batch."""
        gate = self.gate(key)
        bound = self.rate_bound(key, now)
        limit = gate.limit if bound is None else min(gate.limit, bound)
        return math.floor(max(self.floor_of(key), limit))

    def try_admit(self, key: str, now: float) -> Refusal | None:
        """Admits a request for `key` (in flight until `finish`), or says why not and when to retry."""
        gate = self.gate(key)
        limit = self.limit_of(key, now)
        if gate.in_flight < limit or not self.enabled:
            gate.in_flight += 1
            return None
        self._decay(gate, now)
        gate.recent_refusals += 1
        # requests per second that free a slot: measured, else guessed from the limit and their durations
        drain_rate = self.service_rate(key, now) or max(limit, 1) / max(gate.seconds_per_request, 1e-3)
        wait_seconds = gate.recent_refusals / drain_rate
        retry = min(self.max_retry_after_seconds, max(1, math.ceil(wait_seconds)))
        message = (
            f"model {key} is at its admission limit ({gate.in_flight} requests in flight, limit "
            f"{limit} for a {self.target_of(key):g} s time-to-first-token target); retry after {retry} s"
        )
        return Refusal(retry, message)

    def first_token(self, key: str, ttft_seconds: float, now: float) -> None:
        """Adapts the limit to an admitted request's time to first token."""
        gate = self.gate(key)
        target = self.target_of(key)
        if ttft_seconds > target * ROUTER_SHARE_OF_TARGET:
            if now - gate.last_cut_at >= target:
                gate.limit = max(self.floor_of(key), gate.limit * 0.9)
                gate.last_cut_at = now
        elif (
            ttft_seconds < target / 2
            and gate.in_flight >= 0.8 * self.limit_of(key, now)
            and now - max(gate.last_raise_at, gate.last_cut_at) >= target
        ):
            bound = self.rate_bound(key, now)
            ceiling = self.max_limit if bound is None else max(self.floor_of(key), bound)
            gate.limit = max(gate.limit, min(ceiling, gate.limit + 1.0))
            gate.last_raise_at = now

    def finish(self, key: str, duration_seconds: float, now: float | None = None) -> None:
        """An admitted request ended (answered, failed or cancelled) at `now` (its end counts to the rate)."""
        gate = self.gate(key)
        gate.in_flight = max(0, gate.in_flight - 1)
        gate.seconds_per_request += 0.1 * (duration_seconds - gate.seconds_per_request)
        if now is not None:
            gate.finished_at.append(now)

    def release(self, key: str) -> None:
        """An admitted attempt that did not run (worker away or not ready): its slot back, no statistics."""
        gate = self.gate(key)
        gate.in_flight = max(0, gate.in_flight - 1)

    @staticmethod
    def _decay(gate: ModelGate, now: float) -> None:
        elapsed = max(0.0, now - gate.refusals_seen_at)
        gate.recent_refusals *= math.exp(-elapsed / max(gate.seconds_per_request, 0.1))
        gate.refusals_seen_at = now
