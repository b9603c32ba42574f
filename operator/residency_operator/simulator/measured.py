"""What a node really does, for scoring: an engine model fitted to a measured report, not the planner's.

The planner plans with its own predictor (the bandwidth roofline, or profiles and the fit where it has
them); the simulator serves requests at the step and prefill times of this model. The model is fitted to
every decode and prefill point of a ``residency report`` JSON (by default the committed H100 report,
reports/NVIDIA-H100-80GB-HBM3/report-curves-only.json) with the planner's fitted form
(planner/fit.py: step and layer overheads, bandwidth and compute terms) — the form is shared, the data
and so the coefficients are the engine's. The prefill is fitted the same way: a fixed and a per-layer
cost, FLOPs, and the offloaded bytes and layers streamed in.

Another GPU than the measured one: its byte and FLOP costs scale by the ratio of the measured GPU's
bandwidths (and peak FLOPs) to the node's; the step and layer overheads are kept as measured (they are
host-side launch and Python costs, which the GPU does not change); and no step or prefill is faster than
the node's bandwidth roofline (the fast H100 hides the byte cost of small models under their overheads,
which a slow L4 does not). Those are stated assumptions, not measurements.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from residency_operator.planner.fit import FEATURES, EngineFit, StepSample, fit_engine, fit_nonnegative
from residency_operator.planner.predictor import roofline_decode_step_seconds, roofline_prefill_seconds
from residency_operator.planner.types import (
    ExecutionMode,
    ModelDemand,
    NodeCapacity,
    ProfilePoint,
    SensitivityProfile,
)

REPORT = Path(__file__).resolve().parents[3] / "reports/NVIDIA-H100-80GB-HBM3/report-curves-only.json"
MEASURED_GPU_TFLOPS = 989.0
"""Dense bf16 peak of the H100 SXM the committed report measured (the report does not record FLOPs)."""

PROFILE_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)
"""Resident fractions of the curves :meth:`MeasuredEngine.profiles` measures, as a worker's profiler would."""

PREFILL_FEATURES = ("step", "layer", "flop", "offloaded_byte", "offloaded_layer")


class EngineModel(Protocol):
    """How long a node takes for a decode step and a prefill: what the simulator serves requests with."""

    def decode_step_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        batch: int | None = None,
        sequence_tokens: int | None = None,
    ) -> float: ...

    def prefill_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        prompt_tokens: int,
    ) -> float: ...


def prefill_features(model: ModelDemand, resident_fraction: float, prompt_tokens: int) -> tuple[float, ...]:
    offloaded = 1.0 - min(1.0, max(0.0, resident_fraction))
    return (
        1.0,
        float(model.effective_layer_count),
        2.0 * model.effective_parameter_count * max(1, prompt_tokens),
        offloaded * model.weight_bytes,
        offloaded * model.effective_layer_count,
    )


@dataclass(frozen=True, slots=True)
class MeasuredEngine:
    """Decode and prefill costs fitted to one measured GPU, scaled to other nodes by their bandwidths."""

    decode: EngineFit
    prefill_coefficients: tuple[float, ...]
    hbm_gbps: float
    host_to_device_gbps: float
    host_memory_gbps: float
    gpu_tflops: float
    source: str

    @classmethod
    def from_report(cls, path: Path = REPORT) -> MeasuredEngine:
        """Fit to every decode curve point of a report JSON (its ``shapes[].curve_points``)."""
        report: dict[str, Any] = json.loads(path.read_text())
        decode_samples: list[StepSample] = []
        prefill_rows: list[tuple[float, ...]] = []
        prefill_seconds: list[float] = []
        for result in report["shapes"]:
            label = f"{result['shape']['label']}@{result['shape'].get('arch', '')}"
            for point in result["curve_points"]:
                model = ModelDemand(
                    name=label,
                    weight_bytes=int(result["weight_bytes"]),
                    kv_bytes_per_token=int(result["kv_bytes_per_token"]),
                    layer_count=int(result["layers"]),
                )
                fraction = float(point["achieved_resident_fraction"])
                length = int(point["sequence_length"])
                if point["decode_tokens_per_second"] > 0:
                    decode_samples.append(
                        StepSample(
                            model=label,
                            layers=model.effective_layer_count,
                            weight_bytes=model.weight_bytes,
                            parameter_count=model.effective_parameter_count,
                            kv_bytes_per_token=model.kv_bytes_per_token,
                            resident_fraction=fraction,
                            mode=point["execution_mode"],
                            batch=int(point.get("batch_size", 1)),
                            sequence_tokens=length,
                            step_seconds=1.0 / float(point["decode_tokens_per_second"]),
                        )
                    )
                if point.get("prefill_tokens_per_second"):
                    prefill_rows.append(prefill_features(model, fraction, length))
                    prefill_seconds.append(length / float(point["prefill_tokens_per_second"]))
        gpu = str(report["environment"]["gpu_name"])
        decode = fit_engine(gpu, decode_samples, min_models=1)
        if decode is None or not prefill_rows:
            raise ValueError(f"{path}: too few measured curve points to fit an engine model")
        prefill = fit_nonnegative(np.array(prefill_rows), np.array(prefill_seconds))
        bandwidths = report["bandwidths"]
        return cls(
            decode=decode,
            prefill_coefficients=prefill,
            hbm_gbps=float(bandwidths["device_read_gbps"]),
            host_to_device_gbps=float(bandwidths["pinned_host_to_device"]["gbps"]),
            host_memory_gbps=float(bandwidths["host_read_gbps"]),
            gpu_tflops=MEASURED_GPU_TFLOPS,
            source=f"{gpu} report {report.get('created', '')}".strip(),
        )

    def _decode_scales(self, node: NodeCapacity) -> dict[str, float]:
        hbm = self.hbm_gbps / node.hbm_gbps
        return {
            "resident_byte": hbm,
            "kv_byte": hbm,
            "flop": self.gpu_tflops / node.gpu_tflops,
            "stream_byte": self.host_to_device_gbps / node.host_to_device_gbps,
            "cpu_byte": self.host_memory_gbps / node.host_memory_gbps,
        }

    def decode_step_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        batch: int | None = None,
        sequence_tokens: int | None = None,
    ) -> float:
        """Seconds of one decode step of ``batch`` sequences on ``node`` (default: a full batch, half the
        longest sequence, as the planner's predictor assumes)."""
        batch = model.max_batch if batch is None else max(1, batch)
        if sequence_tokens is None:
            sequence_tokens = model.typical_sequence_length or max(1, model.max_sequence_length // 2)
        scales = self._decode_scales(node)
        scaled = EngineFit(
            self.decode.gpu_type,
            tuple(
                c * scales.get(name, 1.0) for name, c in zip(FEATURES, self.decode.coefficients, strict=True)
            ),
            self.decode.samples,
            self.decode.models,
            self.decode.median_relative_error,
        )
        return max(
            scaled.decode_step_seconds(model, resident_fraction, mode, batch, sequence_tokens),
            roofline_decode_step_seconds(model, node, resident_fraction, mode, batch, sequence_tokens),
        )

    def prefill_seconds(
        self,
        model: ModelDemand,
        node: NodeCapacity,
        resident_fraction: float,
        mode: ExecutionMode,
        prompt_tokens: int,
    ) -> float:
        """Seconds to prefill one prompt on ``node`` (offloaded layers stream in, whatever ``mode``)."""
        scales = {
            "flop": self.gpu_tflops / node.gpu_tflops,
            "offloaded_byte": self.host_to_device_gbps / node.host_to_device_gbps,
        }
        features = prefill_features(model, resident_fraction, prompt_tokens)
        fitted = sum(
            c * scales.get(name, 1.0) * x
            for name, c, x in zip(PREFILL_FEATURES, self.prefill_coefficients, features, strict=True)
        )
        return max(
            float(fitted), roofline_prefill_seconds(model, node, resident_fraction, mode, prompt_tokens)
        )

    def profiles(
        self, models: Sequence[ModelDemand], nodes: Sequence[NodeCapacity]
    ) -> list[SensitivityProfile]:
        """The curves the workers' background profilers would publish: each model on each GPU type, both
        decode modes, at its typical sequence length, batch 1 — read off this engine."""
        result = []
        seen: set[tuple[str, str]] = set()
        for node in nodes:
            for model in models:
                if (model.name, node.gpu_type) in seen:
                    continue
                seen.add((model.name, node.gpu_type))
                length = model.typical_sequence_length or max(1, model.max_sequence_length // 2)
                for mode in ("stream", "cpu"):
                    points = tuple(
                        ProfilePoint(
                            fraction,
                            1.0 / self.decode_step_seconds(model, node, fraction, mode, 1, length),
                            512 / self.prefill_seconds(model, node, fraction, mode, 512),
                        )
                        for fraction in PROFILE_FRACTIONS
                    )
                    result.append(SensitivityProfile(model.name, node.gpu_type, points, mode, length, 1))
        return result
