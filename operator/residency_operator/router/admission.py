"""Admission control at the router: each model admits as many concurrent requests as it serves within a
time-to-first-token target; the rest are refused at once (429 + Retry-After), before any work is done.

The limit is one batch (spec.maxBatchSize) plus a queue allowance, and two things bound the allowance:
- **the measured service rate** (Little's law), a ceiling: a model finishes `rate` requests per second; one
  batch runs at once and the requests beyond it wait for a slot, which frees at that rate. At most
  `rate * target * QUEUE_SHARE` wait, so that the last one admitted waits at most QUEUE_SHARE of the target.
- **the first tokens seen**, a feedback loop on their tail: the router keeps each model's times to first
  token (from the moment a request reached it, plus its event loop's lag, which a request waits before the
  router can see it) of the requests admitted under the current limit, over the last TTFT_WINDOW_SECONDS,
  and holds their CONTROL_QUANTILE at SETPOINT_SHARE of the target. Above it, the allowance shrinks in
  proportion (at least by one); well below it, over at least 100 of them (a p99 of its own), and while the
  limit turns requests away, it grows by one. A first token later than the target itself acts at once,
  whatever the number of samples. So a machine whose CPUs are contended admits fewer, rather than letting
  each admitted request wait longer: the tail the client sees stays under the target, the margin
  (1 - SETPOINT_SHARE) covering what the router cannot see (the client's own side) and the quantile's noise.

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
SETPOINT_SHARE = 0.6
"""The feedback holds the router's TTFT quantile at this share of the target; the rest is margin for the
client's side of the wait, which the router cannot see (on the loaded 2-core test machine, any answer
takes up to 0.5 s at p99 there), and for the noise of a quantile over a few hundred samples."""
CONTROL_QUANTILE = 0.99
"""The quantile the feedback holds (nearest rank: over fewer than 100 samples, the slowest)."""
RAISE_BELOW_SHARE = 0.75
"""The allowance grows only while the quantile is under this share of the setpoint (a dead band between,
so that the limit does not swing on the quantile's noise)."""
TTFT_WINDOW_SECONDS = 10.0
"""The first tokens the feedback looks at: those of the last this many seconds (and, of those, only the
requests admitted since the limit last changed: the ones before it waited behind another limit)."""
MIN_FIRST_TOKENS = 16
MIN_FIRST_TOKENS_TO_RAISE = 100
"""A raise needs a real p99 under the band: at least this many first tokens under the current limit (the
slowest of 16 is only about their p94, and raising on it overshoots: in the load test the limit swung
between 10 and 22 around a median of 16, and the median first token waited for that queue)."""
"""Fewer first tokens under the current limit say too little of its tail to act on (unless one of them
came later than the target: then the goal is already missed, and the limit is cut at once)."""


@dataclass
class ModelGate:
    """The admission state of one model."""

    limit: float
    in_flight: int = 0
    seconds_per_request: float = 1.0  # moving average of admitted requests' durations
    finished_at: deque[float] = field(default_factory=deque)  # completions of the rate window
    recent_refusals: float = 0.0  # refusals, decaying with a time constant of seconds_per_request
    refusals_seen_at: float = 0.0
    first_tokens: deque[tuple[float, float]] = field(default_factory=deque)
    """(seen at, seconds) of the first tokens of requests admitted since the limit was set, last window."""
    limit_set_at: float = -math.inf  # when the feedback last moved the limit
    refused_since_set: bool = False  # whether the limit turned a request away since then (a raise is used)
    held_quantile_seconds: float | None = None  # the quantile the feedback last acted on, or held


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
        refusal = self.refusal(key, now)
        if refusal is None:
            self.gate(key).in_flight += 1
        return refusal

    def refusal(self, key: str, now: float) -> Refusal | None:
        """Refuses a request for `key` when the model is at its limit (counted as refused); None, admitting
        nothing, when it is not (see `try_admit`)."""
        gate = self.gate(key)
        limit = self.limit_of(key, now)
        if gate.in_flight < limit or not self.enabled:
            return None
        self._decay(gate, now)
        gate.recent_refusals += 1
        gate.refused_since_set = True
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
        """Feeds an admitted request's time to first token (`ttft_seconds`, seen at `now`) to the feedback
        that holds the model's TTFT tail at the setpoint (see the module's docstring)."""
        gate = self.gate(key)
        if now - ttft_seconds < gate.limit_set_at:
            return  # admitted under the limit before: it says nothing of this one
        samples = gate.first_tokens
        samples.append((now, ttft_seconds))
        while samples and samples[0][0] < now - TTFT_WINDOW_SECONDS:
            samples.popleft()
        target = self.target_of(key)
        late = ttft_seconds > target
        if len(samples) < MIN_FIRST_TOKENS and not late:
            return
        observed = quantile([seconds for _, seconds in samples], CONTROL_QUANTILE)
        gate.held_quantile_seconds = observed
        setpoint = target * SETPOINT_SHARE
        floor = self.floor_of(key)
        bound = self.rate_bound(key, now)
        current = max(floor, gate.limit if bound is None else min(gate.limit, bound))
        if observed > setpoint:
            allowance = current - floor
            self._set_limit(gate, floor + max(0.0, min(allowance * setpoint / observed, allowance - 1)), now)
        elif (
            observed < setpoint * RAISE_BELOW_SHARE
            and len(samples) >= MIN_FIRST_TOKENS_TO_RAISE
            and gate.refused_since_set
            and not late
        ):
            ceiling = self.max_limit if bound is None else max(floor, bound)
            if current + 1.0 <= ceiling:
                self._set_limit(gate, current + 1.0, now)

    def ttft_quantile(self, key: str, now: float) -> float | None:
        """The CONTROL_QUANTILE of the first tokens the feedback holds now (None: none in the window)."""
        samples = [s for at, s in self.gate(key).first_tokens if at >= now - TTFT_WINDOW_SECONDS]
        return quantile(samples, CONTROL_QUANTILE) if samples else None

    @staticmethod
    def _set_limit(gate: ModelGate, limit: float, now: float) -> None:
        gate.limit = limit
        gate.limit_set_at = now
        gate.first_tokens.clear()
        gate.refused_since_set = False

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


def quantile(samples: list[float], q: float) -> float:
    """The nearest-rank `q` quantile of `samples` (not empty): the least sample with at least that share of
    them at or below it (so p99 of fewer than 100 samples is the largest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
