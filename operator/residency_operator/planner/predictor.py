"""Predicted decode and prefill rates of a model at a given GPU residency on a given node.

A measured sensitivity profile for the model and GPU type wins when one exists (made monotone, then
interpolated); otherwise an engine model fitted to every profile of the node's GPU type (planner/fit.py:
per-step and per-layer overheads plus bandwidth and compute terms); failing that, a memory-bandwidth
roofline of the node, scaled by the node's calibration factor. Sequence length and batch enter through
the bytes of KV cache read per step. :meth:`Predictor.source` says which of the three a prediction used.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from residency_operator.planner.fit import EngineFit, fit_engines
from residency_operator.planner.types import (
    GB,
    ExecutionMode,
    ModelDemand,
    NodeCapacity,
    ObservedPoint,
    ProfilePoint,
    SensitivityProfile,
)

PredictionSource = Literal["observed", "profile", "fitted", "roofline"]
"""Where a decode prediction came from: the model's own decode steps observed on this GPU type (the curve
below anchored to them), its measured curve, the engine model fitted per GPU type, or the node's bandwidth
roofline."""

OBSERVED_RATIO_BOUNDS = (0.25, 4.0)
"""How far an observed point may move a prediction: a broken clock or one wild window must not swing every
placement of the model (the same band as a node's calibration factor)."""

PREFILL_COMPUTE_EFFICIENCY = 0.5
"""Share of peak FLOPs a prefill reaches in practice (kernels, attention, launch overhead)."""


def typical_sequence_tokens(model: ModelDemand) -> int:
    """Tokens of context a typical decode step reads KV for."""
    if model.typical_sequence_length is not None:
        return max(1, min(model.typical_sequence_length, model.max_sequence_length))
    return max(1, model.max_sequence_length // 2)


def offload_gbps(node: NodeCapacity, mode: ExecutionMode) -> float:
    """Bandwidth an offloaded weight byte is served at: over the link (``stream``) or from host DRAM by
    the CPU (``cpu``), never faster than a resident byte read from HBM.

    A streamed byte lands in GPU memory and is read from there again; a CPU cannot out-read the GPU. So
    more residency never predicts a slower model, even where a node's measured bandwidths say otherwise
    (an emulated node measures its "HBM" and its link on the same DRAM, and the two readings cross
    under load).
    """
    gbps = node.host_to_device_gbps if mode == "stream" else node.host_memory_gbps
    return min(gbps, node.hbm_gbps)


def roofline_decode_step_seconds(
    model: ModelDemand,
    node: NodeCapacity,
    resident_fraction: float,
    mode: ExecutionMode,
    batch: int,
    sequence_tokens: int,
) -> float:
    """Seconds of one decode step of ``batch`` sequences, from bandwidths alone (uncalibrated).

    Resident weights are read from HBM, offloaded ones cross the link (``stream``) or are read from host
    DRAM by the CPU (``cpu``); every sequence reads its KV cache from HBM. The terms add: the study
    measured little overlap between offload traffic and compute in decode.
    """
    resident_fraction = min(1.0, max(0.0, resident_fraction))
    resident_bytes = resident_fraction * model.weight_bytes
    offloaded_bytes = model.weight_bytes - resident_bytes
    kv_bytes = model.kv_bytes_per_token * sequence_tokens * max(1, batch)
    return (resident_bytes + kv_bytes) / (node.hbm_gbps * GB) + offloaded_bytes / (
        offload_gbps(node, mode) * GB
    )


def roofline_prefill_seconds(
    model: ModelDemand, node: NodeCapacity, resident_fraction: float, mode: ExecutionMode, prompt_tokens: int
) -> float:
    """Seconds to prefill one prompt: each part is bound by the slower of its bytes and its FLOPs. The same in
    both modes (``mode`` only changes decode): offloaded layers stream in for a prompt."""
    resident_fraction = min(1.0, max(0.0, resident_fraction))
    prompt_tokens = max(1, prompt_tokens)
    flops = 2.0 * model.effective_parameter_count * prompt_tokens
    gpu_flops_per_second = node.gpu_tflops * 1e12 * PREFILL_COMPUTE_EFFICIENCY
    resident_seconds = max(
        resident_fraction * model.weight_bytes / (node.hbm_gbps * GB),
        resident_fraction * flops / gpu_flops_per_second,
    )
    # Offloaded layers stream in for prefill whatever the decode mode (see ``ExecutionMode``).
    offloaded_seconds = max(
        (1.0 - resident_fraction) * model.weight_bytes / (offload_gbps(node, "stream") * GB),
        (1.0 - resident_fraction) * flops / gpu_flops_per_second,
    )
    return resident_seconds + offloaded_seconds


def isotonic_increasing(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators): removes measurement noise dips."""
    blocks: list[tuple[float, int]] = []
    for value in values:
        total, count = value, 1
        while blocks and blocks[-1][0] / blocks[-1][1] > total / count:
            previous_total, previous_count = blocks.pop()
            total += previous_total
            count += previous_count
        blocks.append((total, count))
    fitted: list[float] = []
    for total, count in blocks:
        fitted.extend([total / count] * count)
    return fitted


@dataclass(frozen=True, slots=True)
class MonotoneCurve:
    """A non-decreasing piecewise-linear curve through measured (resident fraction, rate) points."""

    fractions: tuple[float, ...]
    rates: tuple[float, ...]

    @classmethod
    def from_points(cls, points: Iterable[tuple[float, float]]) -> MonotoneCurve:
        """Sort, merge duplicate fractions (mean), then force monotone with isotonic regression."""
        grouped: dict[float, list[float]] = {}
        for fraction, rate in points:
            grouped.setdefault(round(min(1.0, max(0.0, fraction)), 6), []).append(rate)
        if not grouped:
            raise ValueError("a sensitivity profile needs at least one point")
        fractions = sorted(grouped)
        means = [sum(grouped[f]) / len(grouped[f]) for f in fractions]
        return cls(tuple(fractions), tuple(isotonic_increasing(means)))

    def __call__(self, resident_fraction: float) -> float:
        """Rate at ``resident_fraction``, clamped to the measured range."""
        fractions, rates = self.fractions, self.rates
        if resident_fraction <= fractions[0]:
            return rates[0]
        if resident_fraction >= fractions[-1]:
            return rates[-1]
        index = bisect.bisect_right(fractions, resident_fraction)
        left, right = fractions[index - 1], fractions[index]
        weight = (resident_fraction - left) / (right - left)
        return rates[index - 1] + weight * (rates[index] - rates[index - 1])


@dataclass(frozen=True, slots=True)
class _IndexedProfile:
    profile: SensitivityProfile
    decode: MonotoneCurve
    prefill: MonotoneCurve | None


class Predictor:
    """Predicts rates from measured profiles where available, from the node roofline otherwise."""

    def __init__(
        self, profiles: Iterable[SensitivityProfile] = (), fits: Mapping[str, EngineFit] | None = None
    ) -> None:
        self.fits: dict[str, EngineFit] = dict(fits or {})
        self._observed_ratios: dict[tuple[str, ObservedPoint], float] = {}
        self._profiles: dict[tuple[str, str, str], list[_IndexedProfile]] = {}
        for profile in sorted(
            profiles, key=lambda p: (p.model, p.gpu_type, p.mode, p.sequence_length, p.batch)
        ):
            if not profile.points:
                continue
            decode = MonotoneCurve.from_points(
                (p.resident_fraction, p.decode_tokens_per_second) for p in profile.points
            )
            prefill_points = [p for p in profile.points if p.prefill_tokens_per_second is not None]
            prefill = (
                MonotoneCurve.from_points(
                    (p.resident_fraction, float(p.prefill_tokens_per_second or 0.0)) for p in prefill_points
                )
                if prefill_points
                else None
            )
            key = (profile.model, profile.gpu_type, profile.mode)
            self._profiles.setdefault(key, []).append(_IndexedProfile(profile, decode, prefill))

    @classmethod
    def calibrated(cls, profiles: Iterable[SensitivityProfile], models: Iterable[ModelDemand]) -> Predictor:
        """Profiles as measured, plus an engine model per GPU type fitted to them (for the models that
        have no profile of their own on a GPU type)."""
        profile_list = list(profiles)
        return cls(profile_list, fit_engines(profile_list, models))

    def source(self, model: ModelDemand, node: NodeCapacity, mode: ExecutionMode) -> PredictionSource:
        """Which model of the engine predicts this model on this node."""
        if self.observed_ratio(model, node) is not None:
            return "observed"
        if self._best_profile(model, node, mode) is not None:
            return "profile"
        return "fitted" if node.gpu_type in self.fits else "roofline"

    def _shape_step_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        batch: int,
        sequence_tokens: int,
    ) -> float:
        """Step seconds from the model's shape alone: the fitted engine, never faster than the node's
        bandwidth roofline (a fit to small models may find no byte cost under their overheads), else the
        bare roofline."""
        roofline = roofline_decode_step_seconds(model, node, resident_fraction, mode, batch, sequence_tokens)
        fit = self.fits.get(node.gpu_type)
        if fit is None:
            return roofline
        return max(roofline, fit.decode_step_seconds(model, resident_fraction, mode, batch, sequence_tokens))

    def profile_for(
        self, model: ModelDemand, node: NodeCapacity, mode: ExecutionMode
    ) -> SensitivityProfile | None:
        """The measured profile used for this model on this node's GPU type, if any."""
        indexed = self._best_profile(model, node, mode)
        return indexed.profile if indexed else None

    def _best_profile(
        self, model: ModelDemand, node: NodeCapacity, mode: ExecutionMode
    ) -> _IndexedProfile | None:
        candidates = self._profiles.get((model.name, node.gpu_type, mode))
        if not candidates:
            return None
        target = typical_sequence_tokens(model)
        # The closest measured sequence length; ties go to the larger batch (closer to serving).
        return min(candidates, key=lambda c: (abs(c.profile.sequence_length - target), -c.profile.batch))

    def observed_ratio(self, model: ModelDemand, node: NodeCapacity) -> float | None:
        """The model's observed decode rate ÷ what its profile, fit or roofline predicts for the same
        residency, mode, batch and context, when it was observed on this node's GPU type (else None).

        Every decode prediction of the model on that GPU type is scaled by it (within
        :data:`OBSERVED_RATIO_BOUNDS`): the curve keeps its shape and passes through what the model really
        does. The ratio is against the uncorrected curve, so it does not feed on itself."""
        observed = model.observed
        if observed is None or observed.gpu_type != node.gpu_type or observed.step_seconds <= 0:
            return None
        key = (model.name, observed)
        ratio = self._observed_ratios.get(key)
        if ratio is None:
            predicted = self._base_step_seconds(
                model,
                node,
                observed.resident_fraction,
                observed.mode,
                observed.batch,
                observed.sequence_tokens,
            )
            ratio = predicted / observed.step_seconds if predicted < float("inf") else 1.0
            self._observed_ratios[key] = ratio
        return ratio

    def observed_factor(self, model: ModelDemand, node: NodeCapacity) -> float:
        """What a predicted step time of the model on this node is multiplied by (1 without one observed)."""
        ratio = self.observed_ratio(model, node)
        if ratio is None:
            return 1.0
        low, high = OBSERVED_RATIO_BOUNDS
        return 1.0 / min(high, max(low, ratio))

    def decode_step_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        batch: int | None = None,
        sequence_tokens: int | None = None,
    ) -> float:
        """Predicted seconds per decode step of ``batch`` sequences (default: the model's max batch)."""
        seconds = self._base_step_seconds(model, node, resident_fraction, mode, batch, sequence_tokens)
        if model.observed is None:
            return seconds
        return seconds * self.observed_factor(model, node)

    def _base_step_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        batch: int | None = None,
        sequence_tokens: int | None = None,
    ) -> float:
        """The step from the profile, fit or roofline, before any observed point of the model."""
        batch = model.max_batch if batch is None else max(1, batch)
        sequence_tokens = (
            typical_sequence_tokens(model) if sequence_tokens is None else max(1, sequence_tokens)
        )
        shape_seconds = self._shape_step_seconds(model, node, resident_fraction, mode, batch, sequence_tokens)
        indexed = self._best_profile(model, node, mode)
        if indexed is None:
            if node.gpu_type in self.fits:
                return shape_seconds  # the fit is calibrated to this GPU type already
            return shape_seconds / max(1e-6, node.calibration_factor)
        measured = indexed.profile
        lowest_fraction = indexed.decode.fractions[0]
        anchor_fraction = max(resident_fraction, lowest_fraction)
        measured_rate = indexed.decode(anchor_fraction)
        if measured_rate <= 0:
            return float("inf")
        # Scale the measurement by the shape model's own ratio (fitted, else roofline) for what the profile
        # did not measure: residency below its lowest point, another batch, another sequence length.
        shape_at_measurement = self._shape_step_seconds(
            model, node, anchor_fraction, mode, measured.batch, measured.sequence_length
        )
        if shape_at_measurement <= 0:
            return 1.0 / measured_rate
        return (1.0 / measured_rate) * shape_seconds / shape_at_measurement

    def decode_tokens_per_second(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        batch: int | None = None,
        sequence_tokens: int | None = None,
    ) -> float:
        """Predicted per-sequence decode rate (tokens/s) — what ``slo.minDecodeTokensPerSecond`` bounds."""
        seconds = self.decode_step_seconds(model, node, resident_fraction, mode, batch, sequence_tokens)
        return 0.0 if seconds <= 0 or seconds == float("inf") else 1.0 / seconds

    def throughput_tokens_per_second(
        self, model: ModelDemand, node: NodeCapacity, resident_fraction: float, mode: ExecutionMode
    ) -> float:
        """Predicted aggregate decode rate of a full batch."""
        return model.max_batch * self.decode_tokens_per_second(model, node, resident_fraction, mode)

    def prefill_tokens_per_second(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        prompt_tokens: int = 512,
    ) -> float:
        """Predicted prefill rate (prompt tokens/s) for one prompt of ``prompt_tokens``."""
        roofline_seconds = roofline_prefill_seconds(model, node, resident_fraction, mode, prompt_tokens)
        indexed = self._best_profile(model, node, mode)
        if indexed is None or indexed.prefill is None:
            return max(1, prompt_tokens) * max(1e-6, node.calibration_factor) / roofline_seconds
        anchor_fraction = max(resident_fraction, indexed.prefill.fractions[0])
        measured_rate = indexed.prefill(anchor_fraction)
        roofline_at_anchor = roofline_prefill_seconds(
            model, node, anchor_fraction, mode, indexed.profile.sequence_length
        )
        measured_seconds = indexed.profile.sequence_length / max(1e-9, measured_rate)
        seconds = measured_seconds * roofline_seconds / roofline_at_anchor
        return max(1, prompt_tokens) / seconds

    def prefill_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        prompt_tokens: int,
    ) -> float:
        """Predicted seconds to prefill one prompt."""
        return max(1, prompt_tokens) / self.prefill_tokens_per_second(
            model, node, resident_fraction, mode, prompt_tokens
        )


def calibrated_factor(
    previous_factor: float,
    observed_tokens_per_second: float,
    predicted_tokens_per_second: float,
    smoothing: float = 0.2,
) -> float:
    """Update a node's calibration factor from one observation (exponential moving average of the ratio).

    ``predicted_tokens_per_second`` must be the prediction made *with* ``previous_factor``.
    """
    if observed_tokens_per_second <= 0 or predicted_tokens_per_second <= 0:
        return previous_factor
    raw_ratio = previous_factor * observed_tokens_per_second / predicted_tokens_per_second
    updated = (1.0 - smoothing) * previous_factor + smoothing * raw_ratio
    # A single wild sample must not swing placements: keep the factor in a plausible band.
    return min(4.0, max(0.25, updated))


def profile_from_points(
    model: str,
    gpu_type: str,
    points: Iterable[tuple[float, float]],
    mode: ExecutionMode = "stream",
    sequence_length: int = 1024,
    batch: int = 1,
) -> SensitivityProfile:
    """Convenience constructor from (resident fraction, decode tokens/s) pairs."""
    return SensitivityProfile(
        model=model,
        gpu_type=gpu_type,
        points=tuple(ProfilePoint(fraction, rate) for fraction, rate in points),
        mode=mode,
        sequence_length=sequence_length,
        batch=batch,
    )
