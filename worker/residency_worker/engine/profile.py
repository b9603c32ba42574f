"""Sensitivity profiling: decode and prefill tokens/s against resident fraction, per mode and sequence length.

The model is loaded once; each point changes its residency live (the same path a demotion takes),
and reports the median of trials interleaved with the other points' (see ``profile_model``).
The JSON follows the SensitivityProfile spec.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from residency.api.placement import PREFILL_MODE
from residency_worker.engine.engine import Engine
from residency_worker.engine.generate import Request
from residency_worker.engine.runner import ModelOptions
from residency_worker.engine.types import EngineError, ExecutionMode, ProfilePoint, SamplingParams

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileSettings:
    dtype: str = "bfloat16"
    fractions: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5, 0.25, 0.0)
    sequence_lengths: tuple[int, ...] = (128, 512)
    modes: tuple[ExecutionMode, ...] = ("stream", "cpu")
    decode_tokens: int = 16
    trials: int = 3
    warmup_trials: int = 1
    batch_size: int = 1
    prefill_mode: ExecutionMode = PREFILL_MODE  # as placements prefill, in every decode mode
    deadline: float | None = None  # time.monotonic() after which the remaining points are skipped

    @property
    def points(self) -> int:
        return len(self.fractions) * len(self.modes) * len(self.sequence_lengths)

    @property
    def rounds(self) -> int:
        """Visits of every point: the warm-up rounds, then one a measured trial."""
        return self.warmup_trials + self.trials

    @property
    def visits(self) -> int:
        """How many times ``profile_model`` reports progress when nothing is cut short."""
        return self.points * self.rounds


@dataclass
class ProfileResult:
    model_path: str
    model_type: str
    gpu_name: str
    emulated: bool
    dtype: str
    weight_bytes: int
    points: list[ProfilePoint] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # points that did not fit the budget, with why

    def to_json(self) -> dict[str, Any]:
        """The SensitivityProfile spec (camelCase, as the CRD stores it)."""
        return {
            "modelPath": self.model_path,
            "gpuType": self.gpu_name,
            "dtype": self.dtype,
            "weightBytes": self.weight_bytes,
            "emulated": self.emulated,
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


def profile_prompt(vocab_size: int, length: int) -> list[int]:
    """The prompt every profile point measures: `length` fixed token ids spread over the vocabulary."""
    return [(7 * i + 3) % vocab_size for i in range(length)]


def measure_trials(
    engine: Engine,
    name: str,
    prompt: list[int],
    decode_tokens: int,
    trials: int,
    warmup_trials: int = 1,
    batch_size: int = 1,
    around_trial: Callable[[], AbstractContextManager[object]] = nullcontext,
    interrupted: Callable[[], bool] | None = None,
) -> tuple[list[float], list[float]]:
    """Decode and prefill tokens/s of each measured trial of one point (the warm-up trials are run and
    dropped): `batch_size` copies of `prompt`, each decoding `decode_tokens` tokens, submitted together and
    waited for, inside `around_trial()`. Prefill is the first request's prompt over its time to first
    token; decode is the batch's tokens after the first over the time from the last first token to the last
    finish. Shared by `residency profile` and the worker's background profiler.

    While a trial runs, `interrupted()` (when given) is asked every few milliseconds; once it says yes the
    trial's requests are cancelled (the engine drops them at its next step) and :class:`TrialInterrupted`
    is raised, so whatever needs the GPU waits for one step of this model, not for the whole trial."""
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
    decode_rates: list[float] = []
    prefill_rates: list[float] = []
    for trial in range(warmup_trials + trials):
        with around_trial():
            requests = [engine.submit(name, prompt, params) for _ in range(batch_size)]
            for request in requests:
                _wait(engine, name, request, requests, interrupted)
        if trial < warmup_trials:
            continue
        first = requests[0]
        assert first.first_token_at is not None and first.finished_at is not None
        prefill_rates.append(len(prompt) / max(first.first_token_at - first.submitted_at, 1e-9))
        decode_seconds = max(r.finished_at or 0.0 for r in requests) - max(
            r.first_token_at or 0.0 for r in requests
        )
        decode_rates.append(batch_size * (decode_tokens - 1) / max(decode_seconds, 1e-9))
    return decode_rates, prefill_rates


class TrialInterrupted(Exception):
    """A trial was cancelled part-way because `interrupted()` said so."""

    def __init__(self, tokens: int) -> None:
        super().__init__(f"trial interrupted after {tokens} tokens")
        self.tokens = tokens  # decoded by the trial's first request before it was dropped


INTERRUPT_POLL_SECONDS = 0.005
CANCEL_WAIT_SECONDS = 30.0


def _wait(
    engine: Engine,
    name: str,
    request: Request,
    trial: list[Request],
    interrupted: Callable[[], bool] | None,
) -> None:
    if interrupted is None:
        request.wait(None)
        return
    while not request.done.wait(INTERRUPT_POLL_SECONDS):
        if interrupted():
            runner = engine.runner(name)
            for other in trial:
                runner.cancel(other)
            for other in trial:
                other.done.wait(CANCEL_WAIT_SECONDS)  # dropped at its next step
            raise TrialInterrupted(len(trial[0].token_ids))
    request.wait(0)  # raises the request's error, if any


def profile_model(
    engine: Engine, path: str, settings: ProfileSettings | None = None, progress: Progress | None = None
) -> ProfileResult:
    """Measures every (fraction, mode, sequence length) point; points that do not fit are skipped.

    The trials are interleaved: each round visits every point once (a live residency change, then one
    trial per sequence length), and a point's rate is the median of its rounds. A machine whose speed
    drifts while the curve is measured (a shared host, clocks, a neighbour's load) then slows every point
    alike instead of bending the curve: on the shared 2-core CI machine one configuration measured twice a
    minute apart differed by up to 2x when each point's trials ran back to back.
    """
    settings = settings or ProfileSettings()
    name = f"profile-{uuid.uuid4().hex[:8]}"
    longest = max(settings.sequence_lengths)
    report = engine.load(
        name,
        path,
        ModelOptions(
            dtype=settings.dtype,
            resident_fraction=min(settings.fractions),
            decode_mode="cpu",
            max_batch_size=settings.batch_size,
            max_sequence_length=longest + settings.decode_tokens + 1,
            max_queue=settings.batch_size,
        ),
    )
    runner = engine.runner(name)
    result = ProfileResult(
        model_path=report.path,
        model_type=report.model_type,
        gpu_name=engine.tier.gpu_name,
        emulated=engine.tier.emulated,
        dtype=settings.dtype,
        weight_bytes=report.residency.weight_bytes,
    )
    prompts = {n: profile_prompt(runner.spec.vocab_size, n) for n in settings.sequence_lengths}
    cells = [_Cell(fraction, mode) for fraction in settings.fractions for mode in settings.modes]
    settle = SamplingParams(max_tokens=2, ignore_eos=True)  # after each residency change, not measured
    say = progress or (lambda _: None)
    try:
        for round_index in range(settings.rounds):
            trial = round_index - settings.warmup_trials
            label = (
                f"warm-up {round_index + 1} of {settings.warmup_trials}"
                if trial < 0
                else f"trial {trial + 1} of {settings.trials}"
            )
            for cell in cells:
                if settings.deadline is not None and time.monotonic() > settings.deadline:
                    break
                if cell.refused is None:
                    try:
                        residency = engine.set_residency(
                            name, cell.fraction, decode_mode=cell.mode, prefill_mode=settings.prefill_mode
                        )
                    except EngineError as exc:
                        cell.refused = exc.message
                if cell.refused is not None:
                    for length in settings.sequence_lengths:
                        say(f"{label}: {cell.text(length)} skipped")
                    continue
                cell.achieved = residency.resident_fraction
                # one short request touches the moved weights before the measured ones
                engine.submit(name, prompts[min(prompts)], settle).wait(None)
                for length in settings.sequence_lengths:
                    decode, prefill = measure_trials(
                        engine,
                        name,
                        prompts[length],
                        settings.decode_tokens,
                        trials=1,
                        warmup_trials=0,
                        batch_size=settings.batch_size,
                    )
                    if round_index >= settings.warmup_trials:
                        cell.decode.setdefault(length, []).extend(decode)
                        cell.prefill.setdefault(length, []).extend(prefill)
                    say(f"{label}: {cell.text(length)}: {decode[0]:.1f} tok/s")
    finally:
        engine.unload(name)
    for cell in cells:
        for length in settings.sequence_lengths:
            point = cell.point(length, settings.batch_size)
            if point is not None:
                result.points.append(point)
            else:
                why = cell.refused or "time budget spent"
                result.skipped.append(f"r={cell.fraction} {cell.mode} seq={length}: {why}")
    return result


@dataclass
class _Cell:
    """One (fraction, mode) of the grid: where its residency landed and each length's measured trials."""

    fraction: float
    mode: ExecutionMode
    achieved: float | None = None
    refused: str | None = None  # why the residency change was refused
    decode: dict[int, list[float]] = field(default_factory=dict)
    prefill: dict[int, list[float]] = field(default_factory=dict)

    def text(self, length: int) -> str:
        return f"r={self.fraction:.2f} {self.mode} seq={length}"

    def point(self, length: int, batch_size: int) -> ProfilePoint | None:
        decode = self.decode.get(length)
        if self.achieved is None or not decode:
            return None
        return ProfilePoint(
            resident_fraction=self.fraction,
            achieved_resident_fraction=self.achieved,
            execution_mode=self.mode,
            sequence_length=length,
            batch_size=batch_size,
            decode_tokens_per_second=statistics.median(decode),
            prefill_tokens_per_second=statistics.median(self.prefill[length]),
            trials=len(decode),
        )


def plot_profile(result: ProfileResult, png_path: Path) -> None:
    """Decode and prefill tokens/s against resident fraction, one line per (mode, sequence length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (decode_axis, prefill_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({(p.execution_mode, p.sequence_length) for p in result.points})
    for mode, length in keys:
        points = sorted(
            (p for p in result.points if (p.execution_mode, p.sequence_length) == (mode, length)),
            key=lambda p: p.achieved_resident_fraction,
        )
        xs = [p.achieved_resident_fraction for p in points]
        style = "-o" if mode == "stream" else "--s"
        decode_axis.plot(
            xs, [p.decode_tokens_per_second for p in points], style, label=f"{mode}, seq {length}"
        )
        prefill_axis.plot(
            xs, [p.prefill_tokens_per_second for p in points], style, label=f"{mode}, seq {length}"
        )
    tier = f"{result.gpu_name}{' (EMULATED on CPU)' if result.emulated else ''}"
    for axis, what in ((decode_axis, "decode"), (prefill_axis, "prefill")):
        axis.set_xlabel("resident fraction of weight bytes")
        axis.set_ylabel(f"{what} tokens/s")
        axis.set_title(f"{what}: {Path(result.model_path).name} on {tier}", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    log.info("wrote %s at %s", png_path, time.strftime("%H:%M:%S"))
