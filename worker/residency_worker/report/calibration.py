"""How well each predictor foretells measured decode rates it did not see: error tables for a report.

Methods (every prediction goes through `residency_operator.planner.Predictor`):
  roofline        unprofiled, no fit: the node's measured bandwidths alone
  fitted (LOSO)   unprofiled shape: the engine model fitted to the *other* shapes' points on this GPU
                  (leave one shape out), predicting this shape from its shape alone
  profile (LOO)   profiled: the model's own curve at this mode and length with this point left out,
                  interpolated (below its lowest point scaled by the fitted engine of the other points)
  fitted (LOO)    profiled: the engine model fitted to every point but this one (its own curve's other
                  points included), predicting this point from the shape

Run: ``python -m residency_worker.report.calibration reports/<gpu>/report.json`` prints the tables.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from residency_operator.planner import ModelDemand, Predictor, ProfilePoint, SensitivityProfile
from residency_operator.planner.fit import StepSample, fit_engine
from residency_worker.report.predict import node_capacity

METHODS = ("roofline", "fitted_loso", "profile_loo", "fitted_loo")
LABELS = {
    "roofline": "roofline (unprofiled, no fit)",
    "fitted_loso": "fitted, shape left out (unprofiled)",
    "profile_loo": "profile curve, point left out (profiled)",
    "fitted_loo": "fitted, point left out (profiled)",
}


def _demand(result: dict[str, Any], length: int) -> ModelDemand:
    shape = result["shape"]
    return ModelDemand(
        name=f"{shape['label']}@{shape.get('arch', '')}",
        weight_bytes=result["weight_bytes"],
        kv_bytes_per_token=result["kv_bytes_per_token"],
        max_sequence_length=length + 64,
        max_batch=1,
        layer_count=result["layers"],
        typical_sequence_length=length,
    )


def _samples(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], StepSample]]:
    pairs = []
    for result in results:
        for point in result["curve_points"]:
            rate = point["decode_tokens_per_second"]
            if rate <= 0:
                continue
            demand = _demand(result, point["sequence_length"])
            sample = StepSample(
                model=demand.name,
                layers=demand.effective_layer_count,
                weight_bytes=demand.weight_bytes,
                parameter_count=demand.effective_parameter_count,
                kv_bytes_per_token=demand.kv_bytes_per_token,
                resident_fraction=point["achieved_resident_fraction"],
                mode=point["execution_mode"],
                batch=point.get("batch_size", 1),
                sequence_tokens=point["sequence_length"],
                step_seconds=1.0 / rate,
            )
            pairs.append((result, sample))
    return pairs


def calibration_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured curve point: shape, mode, length, fraction, observed and each prediction."""
    env = report["environment"]
    node = node_capacity(
        report["bandwidths"], env["gpu_name"], env["gpu_memory_bytes"], env["host_memory_bytes"]
    )
    pairs = _samples(report["shapes"])
    roofline = Predictor()
    rows: list[dict[str, Any]] = []
    loso_fits = {
        shape: fit_engine(node.gpu_type, [s for _, s in pairs if s.model != shape], min_models=1)
        for shape in {s.model for _, s in pairs}
    }
    for result, sample in pairs:
        demand = _demand(result, sample.sequence_tokens)
        mode, length, fraction = sample.mode, sample.sequence_tokens, sample.resident_fraction
        observed = 1.0 / sample.step_seconds
        others = [s for _, s in pairs if s is not sample]
        loo_fit = fit_engine(node.gpu_type, others, min_models=1)
        loso_fit = loso_fits[sample.model]
        curve = [
            s for s in others if s.model == sample.model and s.mode == mode and s.sequence_tokens == length
        ]

        def rate(
            predictor: Predictor, demand: ModelDemand = demand, fraction: float = fraction, mode: Any = mode
        ) -> float:
            return predictor.decode_tokens_per_second(
                demand, node, fraction, mode, 1, demand.max_sequence_length - 64
            )

        predicted: dict[str, float | None] = {
            "roofline": rate(roofline),
            "fitted_loso": rate(Predictor(fits={node.gpu_type: loso_fit})) if loso_fit else None,
            "fitted_loo": rate(Predictor(fits={node.gpu_type: loo_fit})) if loo_fit else None,
            "profile_loo": (
                rate(
                    Predictor(
                        [_profile(demand.name, node.gpu_type, mode, length, curve)],
                        {node.gpu_type: loo_fit} if loo_fit else None,
                    )
                )
                if len(curve) >= 2
                else None
            ),
        }
        rows.append(
            {
                "shape": sample.model,
                "mode": mode,
                "sequence_length": length,
                "resident_fraction": fraction,
                "observed": observed,
                "predicted": predicted,
            }
        )
    return rows


def _profile(name: str, gpu: str, mode: Any, length: int, samples: list[StepSample]) -> SensitivityProfile:
    return SensitivityProfile(
        model=name,
        gpu_type=gpu,
        points=tuple(ProfilePoint(s.resident_fraction, 1.0 / s.step_seconds) for s in samples),
        mode=mode,
        sequence_length=length,
        batch=1,
    )


def error_summary(
    rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], str] = lambda row: "all"
) -> dict[str, dict[str, dict[str, float]]]:
    """Per group (``key``) and method: median and worst |predicted - observed| ÷ observed, and how many."""
    groups: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for method in METHODS:
            value = row["predicted"].get(method)
            if value is None or row["observed"] <= 0:
                continue
            error = abs(value - row["observed"]) / row["observed"]
            groups.setdefault(key(row), {}).setdefault(method, []).append(error)
    return {
        group: {
            method: {"median": statistics.median(errors), "worst": max(errors), "points": len(errors)}
            for method, errors in methods.items()
        }
        for group, methods in groups.items()
    }


def render_tables(report: dict[str, Any]) -> str:
    """Markdown: the error per method over all points, then per shape (median / worst)."""
    rows = calibration_rows(report)
    overall = error_summary(rows)["all"]
    lines = [
        f"Predictor error on {report['environment']['gpu_name']}"
        f"{' (emulated tier)' if report.get('emulated') else ''}, "
        f"{report['settings'].get('trials')} trials a point, {len(rows)} points",
        "",
        "| method | median error | worst error | points |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        if method in overall:
            e = overall[method]
            median, worst = 100 * e["median"], 100 * e["worst"]
            lines.append(f"| {LABELS[method]} | {median:.1f} % | {worst:.1f} % | {e['points']:.0f} |")
    per_shape = error_summary(rows, key=lambda row: row["shape"])
    lines += ["", "| shape | " + " | ".join(LABELS[m] for m in METHODS) + " |"]
    lines.append("|---" * (len(METHODS) + 1) + "|")
    for shape, methods in sorted(per_shape.items()):
        cells = [
            f"{100 * methods[m]['median']:.1f} / {100 * methods[m]['worst']:.1f} %" if m in methods else "—"
            for m in METHODS
        ]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    lines += ["", "(per shape: median / worst error)"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m residency_worker.report.calibration REPORT.json", file=sys.stderr)
        return 2
    print(render_tables(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
