"""The worker's background profiler: a compact sensitivity curve for each model it serves on a GPU type
that has none, measured only while the GPU is otherwise idle.

It loads a second copy of the model under its own name (through the engine's public API: ``load``,
``set_residency``, ``submit``, ``unload``), moves it through a few resident fractions in both decode
modes at a short and a long sequence, and hands the curve to ``publish`` (the agent writes it as a
SensitivityProfile). The points are visited in rounds, a trial each a round, as ``residency profile``
measures them, so a device whose speed drifts slows the whole curve alike. Before every trial (a few
decode tokens), and every few milliseconds while one runs, it checks that no served model has a request
queued or running and that no admin command came since it started; if either, it cancels the trial in
flight (the engine drops it at its next step), unloads its copy and waits, keeping the trials already
measured. A request therefore shares the GPU with at most one step of the profiler's copy.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from residency.api.sensitivity import SensitivityProfileSpec
from residency_worker.engine import Engine, ModelOptions
from residency_worker.engine.profile import TrialInterrupted, measure_trials, profile_prompt
from residency_worker.engine.types import EngineError, ExecutionMode, ProfilePoint

log = logging.getLogger(__name__)

PROFILE_PREFIX = "profile-"
"""Names of the profiler's own model copies: never counted as served models."""


@dataclass(frozen=True)
class CompactSettings:
    """The compact curve: few points, few tokens each, so that it finishes in idle gaps."""

    fractions: tuple[float, ...] = (1.0, 0.5, 0.0)
    modes: tuple[ExecutionMode, ...] = ("stream", "cpu")
    sequence_lengths: tuple[int, ...] = (64, 512)
    decode_tokens: int = 8
    trials: int = 3
    idle_seconds: float = 2.0
    """How long the GPU must have been idle (no request to any served model) before measuring."""
    poll_seconds: float = 0.05

    @property
    def point_count(self) -> int:
        """Points of a model whose positions allow every sequence length."""
        return len(self.fractions) * len(self.modes) * len(self.sequence_lengths)


MAX_REMEASURES = 3
"""A curve that is no valid profile (noise) is measured afresh this many times before giving up."""
SETTLE_TOKENS = 2
"""After each residency change, a short request touches the moved weights (and, on a GPU, captures what
the new layout needs) before the measured trial."""


Point = tuple[float, ExecutionMode, int]
"""(resident fraction asked, decode mode, sequence length)."""


@dataclass
class ProfileJob:
    """One model directory to profile on this node's GPU, and what is measured so far.

    The points are visited in rounds (a warm-up round, then one a trial), so a measurement that yields
    resumes where it stopped: every trial measured before is kept."""

    model: str
    """The served model (``namespace/name``) the curve is for."""
    path: str
    dtype: str
    visits: dict[Point, int] = field(default_factory=dict)
    """Rounds each point has been through (its warm-up included)."""
    decode: dict[Point, list[float]] = field(default_factory=dict)
    prefill: dict[Point, list[float]] = field(default_factory=dict)
    achieved: dict[tuple[float, ExecutionMode], float] = field(default_factory=dict)
    refused: set[tuple[float, ExecutionMode]] = field(default_factory=set)
    yields: int = 0
    remeasured: int = 0
    """Times its curve was measured again because noise made it no valid profile."""

    def restart(self) -> None:
        """Forget every trial: the curve is measured afresh."""
        for measured in (self.visits, self.decode, self.prefill, self.achieved):
            measured.clear()
        self.refused.clear()

    def points(self) -> list[ProfilePoint]:
        """The points with measured trials: the median of each's trials, in grid order."""
        return [
            ProfilePoint(
                resident_fraction=fraction,
                achieved_resident_fraction=self.achieved[(fraction, mode)],
                execution_mode=mode,
                sequence_length=length,
                batch_size=1,
                decode_tokens_per_second=statistics.median(rates),
                prefill_tokens_per_second=statistics.median(self.prefill[(fraction, mode, length)]),
                trials=len(rates),
            )
            for (fraction, mode, length), rates in self.decode.items()
            if rates
        ]

    def spread(self) -> float:
        """The largest (max - min) / median of any point's decode trials: how noisy the curve is."""
        spreads = [
            (max(rates) - min(rates)) / statistics.median(rates)
            for rates in self.decode.values()
            if rates and statistics.median(rates) > 0
        ]
        return max(spreads, default=0.0)


@dataclass(frozen=True)
class MeasuredProfile:
    """A finished compact curve, ready to publish."""

    model: str
    path: str
    dtype: str
    gpu_type: str
    emulated: bool
    weight_bytes: int
    points: tuple[ProfilePoint, ...]
    spread: float
    """The largest trial spread of any point: how noisy the curve is."""
    trials: int
    measured_at: datetime
    yields: int

    def spec(self, node: str) -> dict[str, object]:
        """The SensitivityProfile spec (camelCase, as the CRD stores it)."""
        return {
            "modelPath": self.path,
            "modelName": self.model.split("/", 1)[-1],
            "gpuType": self.gpu_type,
            "dtype": self.dtype,
            "weightBytes": self.weight_bytes,
            "emulated": self.emulated,
            "measuredAt": self.measured_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "measuredBy": node,
            "points": [
                {
                    "residentFraction": round(p.achieved_resident_fraction, 6),
                    "executionMode": p.execution_mode,
                    "sequenceLength": p.sequence_length,
                    "batchSize": p.batch_size,
                    "decodeTokensPerSecond": p.decode_tokens_per_second,
                    "prefillTokensPerSecond": p.prefill_tokens_per_second,
                    "trials": p.trials,
                }
                for p in self.points
            ],
        }


def sequence_lengths(path: str, settings: CompactSettings) -> tuple[int, ...]:
    """The settings' sequence lengths, each cut to what the model's positions allow with the decode."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        limit = int(config.get("max_position_embeddings") or 0)
    except (OSError, ValueError):
        limit = 0
    if limit <= settings.decode_tokens + 2:
        return settings.sequence_lengths
    room = limit - settings.decode_tokens - 1
    return tuple(sorted({min(n, room) for n in settings.sequence_lengths}))


class Yielded(Exception):
    """A request or an admin command came: the profiler steps aside."""


class BackgroundProfiler:
    """Profiles queued models one at a time, in the GPU's idle time; ``publish`` gets each curve."""

    def __init__(
        self,
        engine: Engine,
        publish: Callable[[MeasuredProfile], None],
        settings: CompactSettings | None = None,
    ) -> None:
        self.engine = engine
        self.publish = publish
        self.settings = settings or CompactSettings()
        self._lock = threading.Lock()
        self._jobs: list[ProfileJob] = []
        self._done: set[tuple[str, str]] = set()
        self._commands = 0
        self._busy_since = time.monotonic()
        self.wake = threading.Event()
        self.measuring = threading.Event()
        """Set while a trial of the profiler's own copy runs (tests and metrics read it)."""
        self.copy_gone = threading.Event()
        """Set while the profiler holds no model copy (an admin command waits for it)."""
        self.copy_gone.set()
        self.trial_starts: list[float] = []
        """``time.perf_counter()`` at the start of every trial (the engine's request clock)."""
        self.interrupted_trials: list[int] = []
        """Tokens each trial cancelled part-way (for a request or a command) had decoded."""

    # -- what the agent calls -------------------------------------------------------------------------
    def want(self, model: str, path: str, dtype: str) -> bool:
        """Queue ``path`` for profiling unless it is queued or done already; True when newly queued."""
        key = (path, dtype)
        with self._lock:
            if key in self._done or any((j.path, j.dtype) == key for j in self._jobs):
                return False
            self._jobs.append(ProfileJob(model, path, dtype))
        self.wake.set()
        return True

    def forget(self, path: str, dtype: str) -> None:
        """A profile for ``path`` exists already (published by someone else): do not measure it."""
        with self._lock:
            self._done.add((path, dtype))
            self._jobs = [j for j in self._jobs if (j.path, j.dtype) != (path, dtype)]

    def interrupt(self, wait_seconds: float = 30.0) -> None:
        """An admin command (a placement change, an admin endpoint): any measurement in flight yields, and
        this returns once the profiler's copy is unloaded (it finishes at most the trial in flight), so the
        command finds the memory the copy held."""
        with self._lock:
            self._commands += 1
            self._busy_since = time.monotonic()
        self.copy_gone.wait(wait_seconds)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    # -- the loop -------------------------------------------------------------------------------------
    def busy(self) -> bool:
        """Whether any served model has a request queued or running."""
        for name in self.engine.names():
            if name.startswith(PROFILE_PREFIX):
                continue
            try:
                runner = self.engine.runner(name)
            except EngineError:
                continue  # unloaded meanwhile
            if runner.queue_depth or runner.active_sequences:
                return True
        return False

    def idle_long_enough(self) -> bool:
        now = time.monotonic()
        if self.busy():
            with self._lock:
                self._busy_since = now
            return False
        with self._lock:
            return now - self._busy_since >= self.settings.idle_seconds

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: wait for a job and idle time, measure, publish."""
        while not stop.is_set():
            with self._lock:
                job = self._jobs[0] if self._jobs else None
            if job is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            if not self.idle_long_enough():
                stop.wait(self.settings.poll_seconds)
                continue
            try:
                result = self.measure(job)
            except Yielded:
                job.yields += 1
                continue
            except EngineError as exc:
                log.warning("profiling %s failed: %s; not retried", job.path, exc.message)
                self._finish(job)
                continue
            self._finish(job)
            try:  # the API server would refuse it (e.g. a curve falling as residency rises: noise)
                SensitivityProfileSpec.model_validate(result.spec("this-node"))
            except ValidationError as exc:
                again = job.remeasured < MAX_REMEASURES
                log.warning(
                    "the curve measured of %s is not a valid profile, not published (%s): %s",
                    job.path,
                    "measured again" if again else "measured again at its next load",
                    exc.errors()[0]["msg"],
                )
                with self._lock:
                    self._done.discard((job.path, job.dtype))
                    if again:  # noise on a busy node: all points afresh
                        job.remeasured += 1
                        job.restart()
                        self._jobs.append(job)
                continue
            try:
                self.publish(result)
            except Exception:  # the agent logs the API error; the next load of the model asks again
                log.exception("could not publish the profile of %s", job.path)
                with self._lock:
                    self._done.discard((job.path, job.dtype))

    def _finish(self, job: ProfileJob) -> None:
        with self._lock:
            self._done.add((job.path, job.dtype))
            self._jobs = [j for j in self._jobs if j is not job]

    def _wanted_elsewhere(self, commands_at_start: int) -> bool:
        """An admin command came since the measurement began, or a served model has work."""
        with self._lock:
            commanded = self._commands != commands_at_start
        return commanded or self.busy()

    def _check(self, commands_at_start: int) -> None:
        if self._wanted_elsewhere(commands_at_start):
            raise Yielded

    def measure(self, job: ProfileJob) -> MeasuredProfile:
        """The job's remaining points (raises :class:`Yielded` when it must step aside)."""
        settings = self.settings
        with self._lock:
            commands_at_start = self._commands
        name = f"{PROFILE_PREFIX}{uuid.uuid4().hex[:8]}"
        lengths = sequence_lengths(job.path, settings)
        self.copy_gone.clear()
        try:
            return self._measure(job, name, lengths, commands_at_start)
        finally:
            self.copy_gone.set()

    def _measure(
        self, job: ProfileJob, name: str, lengths: tuple[int, ...], commands_at_start: int
    ) -> MeasuredProfile:
        settings = self.settings
        longest = max(lengths)
        report = self.engine.load(
            name,
            job.path,
            ModelOptions(
                dtype=job.dtype,
                resident_fraction=min(settings.fractions),
                decode_mode="cpu",
                max_batch_size=1,
                max_sequence_length=longest + settings.decode_tokens + 1,
                max_queue=1,
            ),
        )
        try:
            vocab = self.engine.runner(name).spec.vocab_size
            for round_index in range(1 + settings.trials):  # round 0 warms up, then a trial a round
                for fraction in settings.fractions:
                    for mode in settings.modes:
                        self._visit(
                            job, name, vocab, round_index, (fraction, mode), lengths, commands_at_start
                        )
        finally:
            self.engine.unload(name)
        points = job.points()
        if not points:
            raise EngineError("NoPoints", f"no profile point of {job.path} fits on this GPU")
        return MeasuredProfile(
            model=job.model,
            path=report.path,
            dtype=job.dtype,
            gpu_type=self.engine.tier.gpu_name,
            emulated=self.engine.tier.emulated,
            weight_bytes=report.residency.weight_bytes,
            points=tuple(points),
            spread=job.spread(),
            trials=settings.trials,
            measured_at=datetime.now(UTC),
            yields=job.yields,
        )

    def _visit(
        self,
        job: ProfileJob,
        name: str,
        vocab: int,
        round_index: int,
        cell: tuple[float, ExecutionMode],
        lengths: tuple[int, ...],
        commands: int,
    ) -> None:
        """One round's visit of a (fraction, mode): its residency, then one trial per length not yet
        through this round (a resumed job skips what it measured before it yielded)."""
        fraction, mode = cell
        todo = [n for n in lengths if job.visits.get((fraction, mode, n), 0) <= round_index]
        if not todo or cell in job.refused:
            return
        self._check(commands)
        try:
            residency = self.engine.set_residency(name, fraction, decode_mode=mode)
        except EngineError as exc:  # does not fit next to what is served: skip the point
            log.info("profile %s: r=%s %s skipped (%s)", job.path, fraction, mode, exc.message)
            job.refused.add(cell)
            return
        job.achieved[cell] = residency.resident_fraction
        self._trial(name, vocab, min(lengths), commands, SETTLE_TOKENS)  # not measured: see profile_model
        for length in todo:
            decode, prefill = self._trial(name, vocab, length, commands, self.settings.decode_tokens)
            point = (fraction, mode, length)
            job.visits[point] = job.visits.get(point, 0) + 1
            if round_index > 0:  # round 0 is the warm-up
                job.decode.setdefault(point, []).extend(decode)
                job.prefill.setdefault(point, []).extend(prefill)

    def _trial(
        self, name: str, vocab: int, length: int, commands: int, tokens: int
    ) -> tuple[list[float], list[float]]:
        """One trial's decode and prefill tok/s; it steps aside for a command or a request, before it
        starts and while it runs."""

        @contextmanager
        def trial() -> Iterator[None]:  # marked as measuring while it runs
            self._check(commands)
            self.trial_starts.append(time.perf_counter())
            self.measuring.set()
            try:
                yield
            finally:
                self.measuring.clear()

        try:
            return measure_trials(
                self.engine,
                name,
                profile_prompt(vocab, length),
                tokens,
                trials=1,
                warmup_trials=0,
                around_trial=trial,
                interrupted=lambda: self._wanted_elsewhere(commands),
            )
        except TrialInterrupted as exc:  # a request or a command came mid-trial: dropped at once
            self.interrupted_trials.append(exc.tokens)
            raise Yielded from exc
