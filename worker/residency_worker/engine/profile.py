"""Sensitivity profiling: decode and prefill tokens/s against resident fraction, per mode and sequence length.

The model is loaded once; each point changes its residency live (the same path a demotion takes),
warms up, and reports the median of repeated trials. The JSON follows the SensitivityProfile spec.
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
) -> tuple[list[float], list[float]]:
    """Decode and prefill tokens/s of each measured trial of one point (the warm-up trials are run and
    dropped): `batch_size` copies of `prompt`, each decoding `decode_tokens` tokens, submitted together and
    waited for, inside `around_trial()`. Prefill is the first request's prompt over its time to first
    token; decode is the batch's tokens after the first over the time from the last first token to the last
    finish. Shared by `residency profile` and the worker's background profiler."""
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
    decode_rates: list[float] = []
    prefill_rates: list[float] = []
    for trial in range(warmup_trials + trials):
        with around_trial():
            requests = [engine.submit(name, prompt, params) for _ in range(batch_size)]
            for request in requests:
                request.wait(None)
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


def profile_model(
    engine: Engine, path: str, settings: ProfileSettings | None = None, progress: Progress | None = None
) -> ProfileResult:
    """Measures every (fraction, mode, sequence length) point; points that do not fit are skipped."""
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
    vocab = runner.spec.vocab_size
    try:
        for fraction in settings.fractions:
            for mode in settings.modes:
                if settings.deadline is not None and time.monotonic() > settings.deadline:
                    for length in settings.sequence_lengths:
                        result.skipped.append(f"r={fraction} {mode} seq={length}: time budget spent")
                        if progress:
                            progress(f"r={fraction:.2f} {mode} seq={length} skipped (time budget)")
                    continue
                try:
                    residency = engine.set_residency(
                        name, fraction, decode_mode=mode, prefill_mode=settings.prefill_mode
                    )
                except EngineError as exc:
                    for length in settings.sequence_lengths:
                        result.skipped.append(f"r={fraction} {mode} seq={length}: {exc.message}")
                        if progress:
                            progress(f"r={fraction:.2f} {mode} seq={length} skipped")
                    continue
                for length in settings.sequence_lengths:
                    decode_rates, prefill_rates = measure_trials(
                        engine,
                        name,
                        profile_prompt(vocab, length),
                        settings.decode_tokens,
                        settings.trials,
                        warmup_trials=settings.warmup_trials,
                        batch_size=settings.batch_size,
                    )
                    result.points.append(
                        ProfilePoint(
                            resident_fraction=fraction,
                            achieved_resident_fraction=residency.resident_fraction,
                            execution_mode=mode,
                            sequence_length=length,
                            batch_size=settings.batch_size,
                            decode_tokens_per_second=statistics.median(decode_rates),
                            prefill_tokens_per_second=statistics.median(prefill_rates),
                            trials=settings.trials,
                        )
                    )
                    if progress:
                        progress(
                            f"r={fraction:.2f} {mode} seq={length}: "
                            f"{result.points[-1].decode_tokens_per_second:.1f} tok/s"
                        )
    finally:
        engine.unload(name)
    return result


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
