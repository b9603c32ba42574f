"""An engine model fitted per GPU type: a decode step costs a fixed overhead, per-layer overheads, and the
bytes and FLOPs it moves, each at a rate learnt from measured points (non-negative least squares).

The bandwidth roofline alone misses the engine's per-step and per-layer costs (kernel launches, Python,
the sampler, a streamed layer's copy setup), which dominate a small model's step; that is why it
predicts a small model several times too fast. Fitting one set of coefficients per GPU type to every
profile measured on it predicts a model nobody profiled from its shape alone.

Pure: no Kubernetes, no torch. scipy's bounded least squares (``lsq_linear``) does the fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

from residency_operator.planner.types import ExecutionMode, ModelDemand, SensitivityProfile

FEATURES = (
    "step",
    "layer",
    "resident_byte",
    "kv_byte",
    "flop",
    "stream_byte",
    "stream_layer",
    "cpu_byte",
    "cpu_layer",
)
"""What one decode step pays for, each at a fitted cost in seconds per unit: a fixed step overhead, an
overhead per layer, resident weight bytes and KV bytes read from GPU memory, FLOPs, and per offload mode
the offloaded bytes and layers (a streamed layer's copy, a host-computed layer's hand-over)."""

MIN_SAMPLES = 6
MIN_MODELS = 2
"""A fit needs points of at least two models: one model's curve cannot tell a per-layer cost from a
per-byte cost (every point has the same layers and weight bytes)."""


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured decode step: the model's shape, its placement, the batch and context, and seconds."""

    model: str
    layers: int
    weight_bytes: int
    parameter_count: int
    kv_bytes_per_token: int
    resident_fraction: float
    mode: ExecutionMode
    batch: int
    sequence_tokens: int
    step_seconds: float


def step_features(
    layers: int,
    weight_bytes: int,
    parameter_count: int,
    kv_bytes_per_token: int,
    resident_fraction: float,
    mode: ExecutionMode,
    batch: int,
    sequence_tokens: int,
) -> tuple[float, ...]:
    """The amounts of :data:`FEATURES` one decode step of this placement pays for."""
    resident_fraction = min(1.0, max(0.0, resident_fraction))
    offloaded_fraction = 1.0 - resident_fraction
    offloaded_bytes = offloaded_fraction * weight_bytes
    offloaded_layers = offloaded_fraction * layers
    batch = max(1, batch)
    return (
        1.0,
        float(layers),
        resident_fraction * weight_bytes,
        float(kv_bytes_per_token) * max(1, sequence_tokens) * batch,
        2.0 * parameter_count * batch,
        offloaded_bytes if mode == "stream" else 0.0,
        offloaded_layers if mode == "stream" else 0.0,
        offloaded_bytes if mode == "cpu" else 0.0,
        offloaded_layers if mode == "cpu" else 0.0,
    )


def sample_features(sample: StepSample) -> tuple[float, ...]:
    return step_features(
        sample.layers,
        sample.weight_bytes,
        sample.parameter_count,
        sample.kv_bytes_per_token,
        sample.resident_fraction,
        sample.mode,
        sample.batch,
        sample.sequence_tokens,
    )


@dataclass(frozen=True, slots=True)
class EngineFit:
    """Fitted seconds per unit of each of :data:`FEATURES`, for one GPU type."""

    gpu_type: str
    coefficients: tuple[float, ...]
    samples: int
    models: tuple[str, ...]
    median_relative_error: float
    """Median |fitted - measured| ÷ measured over the points it was fitted to (in-sample)."""

    def step_seconds(self, features: Sequence[float]) -> float:
        return float(sum(c * x for c, x in zip(self.coefficients, features, strict=True)))

    def decode_step_seconds(
        self,
        model: ModelDemand,
        resident_fraction: float,
        mode: ExecutionMode,
        batch: int,
        sequence_tokens: int,
    ) -> float:
        """Seconds of one decode step of ``batch`` sequences of this model at this placement."""
        return self.step_seconds(
            step_features(
                model.effective_layer_count,
                model.weight_bytes,
                model.effective_parameter_count,
                model.kv_bytes_per_token,
                resident_fraction,
                mode,
                batch,
                sequence_tokens,
            )
        )

    def step_seconds_grid(
        self,
        layers: np.ndarray[Any, Any],
        weight_bytes: np.ndarray[Any, Any],
        parameters: np.ndarray[Any, Any],
        kv_bytes_per_step: np.ndarray[Any, Any],
        batch: np.ndarray[Any, Any],
        fractions: np.ndarray[Any, Any],
        mode: ExecutionMode,
    ) -> np.ndarray[Any, Any]:
        """:meth:`decode_step_seconds` of every model (rows: arrays of one entry per model; the KV bytes
        of the whole step) at every resident fraction (columns), vectorised for the planner's tables."""
        named = dict(zip(FEATURES, self.coefficients, strict=True))
        resident = fractions[None, :]
        offloaded = 1.0 - resident
        seconds = (
            named["step"]
            + named["layer"] * layers[:, None]
            + named["resident_byte"] * resident * weight_bytes[:, None]
            + named["kv_byte"] * kv_bytes_per_step[:, None]
            + named["flop"] * 2.0 * parameters[:, None] * batch[:, None]
        )
        prefix = "stream" if mode == "stream" else "cpu"
        seconds = seconds + named[f"{prefix}_byte"] * offloaded * weight_bytes[:, None]
        return seconds + named[f"{prefix}_layer"] * offloaded * layers[:, None]  # type: ignore[no-any-return]

    def steps_over_roofline(
        self,
        roofline_seconds: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
        layers: np.ndarray[Any, Any],
        weight_bytes: np.ndarray[Any, Any],
        parameters: np.ndarray[Any, Any],
        kv_bytes: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
        batch: np.ndarray[Any, Any],
        fractions: np.ndarray[Any, Any],
        mode: ExecutionMode,
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The full-batch and one-sequence step seconds of a class table's grid by this fit, uncalibrated
        and never faster than the roofline's (``roofline_seconds``, ``kv_bytes``: full batch, one
        sequence), as :meth:`Predictor.decode_step_seconds` gives them for an unprofiled model."""
        full_roofline, single_roofline = roofline_seconds
        full_kv, single_kv = kv_bytes
        full = self.step_seconds_grid(layers, weight_bytes, parameters, full_kv, batch, fractions, mode)
        ones = np.ones_like(batch)
        single = self.step_seconds_grid(layers, weight_bytes, parameters, single_kv, ones, fractions, mode)
        return np.maximum(full_roofline, full), np.maximum(single_roofline, single)

    def describe(self) -> dict[str, float]:
        """The coefficients in readable units: overheads in ms, byte terms as GB/s, compute as TFLOP/s."""
        named = dict(zip(FEATURES, self.coefficients, strict=True))

        def rate(seconds_per_unit: float, scale: float) -> float:
            return math.inf if seconds_per_unit <= 0 else 1.0 / seconds_per_unit / scale

        return {
            "step_overhead_ms": named["step"] * 1e3,
            "layer_overhead_ms": named["layer"] * 1e3,
            "resident_gbps": rate(named["resident_byte"], 1e9),
            "kv_gbps": rate(named["kv_byte"], 1e9),
            "tflops": rate(named["flop"], 1e12),
            "stream_gbps": rate(named["stream_byte"], 1e9),
            "stream_layer_ms": named["stream_layer"] * 1e3,
            "cpu_gbps": rate(named["cpu_byte"], 1e9),
            "cpu_layer_ms": named["cpu_layer"] * 1e3,
        }


def fit_nonnegative(matrix: np.ndarray[Any, Any], observed: np.ndarray[Any, Any]) -> tuple[float, ...]:
    """Non-negative coefficients ``c`` minimising the relative error of ``matrix @ c`` against ``observed``
    (every row weighs the same whatever its magnitude)."""
    # Columns span 1 to 1e12: scale each to at most 1 so the solver sees a well-conditioned problem.
    scale = np.abs(matrix).max(axis=0)
    scale[scale == 0] = 1.0
    relative = matrix / scale / observed[:, None]
    result = lsq_linear(relative, np.ones(len(observed)), bounds=(0.0, np.inf), method="bvls")
    return tuple(float(c) for c in result.x / scale)


def fit_engine(
    gpu_type: str,
    samples: Sequence[StepSample],
    min_samples: int = MIN_SAMPLES,
    min_models: int = MIN_MODELS,
) -> EngineFit | None:
    """Least-squares fit of the step cost to ``samples`` in relative terms (every point counts the same
    whatever its speed), with every coefficient non-negative; None when the samples are too few or span
    too few models to separate per-layer from per-byte costs."""
    usable = [s for s in samples if s.step_seconds > 0 and math.isfinite(s.step_seconds)]
    models = tuple(sorted({s.model for s in usable}))
    if len(usable) < min_samples or len(models) < min_models:
        return None
    matrix = np.array([sample_features(s) for s in usable], dtype=np.float64)
    observed = np.array([s.step_seconds for s in usable], dtype=np.float64)
    # A term the samples never vary apart from the others is left out (cost 0), not guessed: at one batch
    # size FLOPs move with the weight bytes, and at one context (sequence x batch) the KV bytes do; a fit
    # would split their cost arbitrarily and extrapolate the split to other batches and lengths.
    kept = [
        index
        for index, name in enumerate(FEATURES)
        if not (name == "flop" and len({s.batch for s in usable}) == 1)
        and not (name == "kv_byte" and len({s.batch * s.sequence_tokens for s in usable}) == 1)
    ]
    fitted_kept = fit_nonnegative(matrix[:, kept], observed)
    coefficients_list = [0.0] * len(FEATURES)
    for index, value in zip(kept, fitted_kept, strict=True):
        coefficients_list[index] = value
    coefficients = tuple(coefficients_list)
    fitted = matrix @ np.array(coefficients)
    errors = np.abs(fitted - observed) / observed
    return EngineFit(
        gpu_type=gpu_type,
        coefficients=coefficients,
        samples=len(usable),
        models=models,
        median_relative_error=float(np.median(errors)),
    )


def samples_from_profiles(
    profiles: Iterable[SensitivityProfile], models: Mapping[str, ModelDemand]
) -> dict[str, list[StepSample]]:
    """Decode points of every profile whose model is known, as step samples grouped by GPU type. A point
    of per-sequence rate ``r`` at batch ``b`` is one step of ``1/r`` seconds."""
    grouped: dict[str, list[StepSample]] = {}
    for profile in profiles:
        model = models.get(profile.model)
        if model is None:
            continue
        for point in profile.points:
            if point.decode_tokens_per_second <= 0:
                continue
            grouped.setdefault(profile.gpu_type, []).append(
                StepSample(
                    model=_shape_key(model),
                    layers=model.effective_layer_count,
                    weight_bytes=model.weight_bytes,
                    parameter_count=model.effective_parameter_count,
                    kv_bytes_per_token=model.kv_bytes_per_token,
                    resident_fraction=point.resident_fraction,
                    mode=profile.mode,
                    batch=profile.batch,
                    sequence_tokens=profile.sequence_length,
                    step_seconds=1.0 / point.decode_tokens_per_second,
                )
            )
    return grouped


def _shape_key(model: ModelDemand) -> str:
    # Two LLMModels on one directory are one shape: they must not count as two models for MIN_MODELS.
    return f"{model.weight_bytes}/{model.effective_layer_count}/{model.kv_bytes_per_token}"


def fit_engines(
    profiles: Iterable[SensitivityProfile], models: Iterable[ModelDemand]
) -> dict[str, EngineFit]:
    """One fitted engine model per GPU type that has enough profiled points of enough model shapes."""
    by_name = {m.name: m for m in models}
    fits: dict[str, EngineFit] = {}
    for gpu_type, samples in sorted(samples_from_profiles(profiles, by_name).items()):
        fit = fit_engine(gpu_type, samples)
        if fit is not None:
            fits[gpu_type] = fit
    return fits
