"""`residency report`: run every section on this node's GPU (or the emulated tier) and write the report."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from residency_worker.engine import Engine, make_gpu_tier
from residency_worker.report.environment import describe, measure_bandwidths
from residency_worker.report.measure import Budget, ReportSettings, Shape, ShapeResult, run_shape
from residency_worker.report.predict import median_errors, node_capacity, predictions

Progress = Callable[[str], None]

GOALS = {
    "reload_over_peak": 0.8,
    "ours_over_accelerate": 3.0,
    "resume_speedup_over_from_pretrained": 5.0,
    "predictor_median_error": 0.15,
}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "gpu"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def summarise(
    results: list[dict[str, Any]], bandwidths: dict[str, Any], errors: dict[str, float | None]
) -> dict[str, Any]:
    """The figures each finding and goal rests on, per shape (report.json form); None where skipped."""
    peak = bandwidths["pinned_host_to_device"]["gbps"]
    shapes: dict[str, Any] = {}
    for result in results:
        curves: dict[str, dict[str, float]] = {}
        for point in result["curve_points"]:
            key = f"{point['execution_mode']}/{point['sequence_length']}"
            curves.setdefault(key, {})[f"{point['resident_fraction']:g}"] = point["decode_tokens_per_second"]
        normalised = {
            key: {r: rate / values["1"] for r, rate in values.items()}
            for key, values in curves.items()
            if values.get("1")
        }
        reload_gbps = _median([t["gbps"] for t in result["reload_pinned"]])
        naive_gbps = _median([b / s / 1e9 for b, s in result["naive_reload"]])
        resume_seconds = _median(result["resume_seconds"])
        preemption = []
        for p in result["preemptions"]:
            save, reload, restore = p["kv_save"], p["reload"], p["kv_restore"]
            total = save["seconds"] + reload["seconds"] + restore["seconds"]
            preemption.append(
                {
                    "kv_tokens": p["kv_tokens"],
                    "kv_bytes": save["moved_bytes"],
                    "kv_save_seconds": save["seconds"],
                    "kv_restore_seconds": restore["seconds"],
                    "reload_bytes": reload["moved_bytes"],
                    "reload_seconds": reload["seconds"],
                    "reload_share": reload["seconds"] / total if total else None,
                    "kv_share": (save["seconds"] + restore["seconds"]) / total if total else None,
                }
            )
        peer = result["peer"]
        ours = peer.get("ours_tokens_per_second", {})
        ours_best = max(ours.values()) if ours else None
        from_pretrained = _median(peer.get("from_pretrained_seconds", []))
        amplification = result["amplification"]
        shapes[result["shape"]["label"]] = {
            "weight_bytes": result["weight_bytes"],
            "curves": curves,
            "normalised": normalised,
            "preemption": preemption,
            "reload_gbps": reload_gbps,
            "reload_over_peak": _ratio(reload_gbps, peak),
            "naive_gbps": naive_gbps,
            "naive_over_peak": _ratio(naive_gbps, peak),
            "reload_speedup_over_naive": _ratio(reload_gbps, naive_gbps),
            "resume_seconds": resume_seconds,
            "ours_tokens_per_second": ours,
            "accelerate_tokens_per_second": peer.get("accelerate_tokens_per_second"),
            "ours_over_accelerate": _ratio(ours_best, peer.get("accelerate_tokens_per_second")),
            "from_pretrained_seconds": from_pretrained,
            "resume_speedup_over_from_pretrained": _ratio(from_pretrained, resume_seconds),
            "pageable_reload_slowdown": _ratio(
                amplification.get("reload_gbps_pinned"), amplification.get("reload_gbps_pageable")
            ),
            "pageable_decode_slowdown": _ratio(
                amplification.get("decode_stream_pinned"), amplification.get("decode_stream_pageable")
            ),
        }

    def worst(key: str, lowest: bool = True) -> float | None:
        values = [s[key] for s in shapes.values() if s.get(key) is not None]
        return (min(values) if lowest else max(values)) if values else None

    goals = {
        "reload_over_peak": worst("reload_over_peak"),
        "ours_over_accelerate": worst("ours_over_accelerate"),
        "resume_speedup_over_from_pretrained": worst("resume_speedup_over_from_pretrained"),
        "predictor_median_error": errors.get("profile_loo"),
    }
    met = {
        key: (
            None
            if value is None
            else (value <= GOALS[key] if key == "predictor_median_error" else value >= GOALS[key])
        )
        for key, value in goals.items()
    }
    return {
        "shapes": shapes,
        "goals": goals,
        "goal_targets": GOALS,
        "goals_met": met,
        "predictor_errors": errors,
    }


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    """Adds the predictions and the summary to a report of measurements (report.json form)."""
    env = report["environment"]
    node = node_capacity(
        report["bandwidths"], env["gpu_name"], env["gpu_memory_bytes"], env["host_memory_bytes"]
    )
    rows = predictions(report["shapes"], node)
    return {
        **report,
        "predictions": rows,
        "summary": summarise(report["shapes"], report["bandwidths"], median_errors(rows)),
    }


def combine(base: dict[str, Any], curves: dict[str, Any]) -> dict[str, Any]:
    """`base` with each shape's decode curves taken from `curves`, a curves-only run of the same shapes.

    Both runs' environments and ceilings are kept; the report says which figures came from which run.
    """
    by_label = {s["shape"]["label"]: s for s in curves["shapes"] if s["curve_points"]}
    shapes = [
        {**s, "curve_points": by_label[s["shape"]["label"]]["curve_points"]}
        if s["shape"]["label"] in by_label
        else s
        for s in base["shapes"]
    ]
    note = (
        "Decode curves (section a and the predictor) come from a separate curves-only run created "
        f"{curves['created']} "
        f"on {curves['environment']['gpu_name']} (driver {curves['environment']['driver']}, "
        f"pinned host→device {curves['bandwidths']['pinned_host_to_device']['gbps']:.1f} GB/s); "
        f"every other section from the run created {base['created']}."
    )
    combined = {
        **base,
        "shapes": shapes,
        "curves_run": {k: curves[k] for k in ("created", "environment", "bandwidths", "settings", "skipped")},
        "notes": [*base.get("notes", []), note],
    }
    return analyse(combined)


def run_report(
    settings: ReportSettings,
    out_root: Path,
    models_root: Path,
    *,
    gpu_memory_bytes: int | None = None,
    emulate: bool = False,
    progress: Progress = lambda _: None,
) -> Path:
    """Measures everything, writes report.json, report.md and the plots; returns the report's folder."""
    from residency_worker.report.render import render

    budget = Budget(settings.budget_seconds)
    if gpu_memory_bytes is None and (emulate or not torch.cuda.is_available()):
        gpu_memory_bytes = 8 * 2**30  # the emulated tier needs a declared budget
    tier = make_gpu_tier(gpu_memory_bytes, force_emulated=emulate)
    pageable_tier = make_gpu_tier(gpu_memory_bytes, force_emulated=emulate, pin_host_memory=False)
    environment = describe(tier)
    out_dir = out_root / ("emulated-cpu" if tier.emulated else slug(tier.gpu_name))
    out_dir.mkdir(parents=True, exist_ok=True)
    models_root = models_root.resolve()
    models_root.mkdir(parents=True, exist_ok=True)
    progress("measuring bandwidths")
    bandwidths = measure_bandwidths(tier, pageable_tier, settings.bandwidth_bytes, trials=5)
    engine = Engine(tier, [models_root], node="report", calibration_bytes=0)
    pageable_engine = Engine(pageable_tier, [models_root], node="report-pageable", calibration_bytes=0)
    results: list[ShapeResult] = []
    started = time.perf_counter()

    def assemble() -> dict[str, Any]:
        report = {
            "report": "residency report",
            "emulated": tier.emulated,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_seconds": time.perf_counter() - started,
            "environment": dataclasses.asdict(environment),
            "settings": {**dataclasses.asdict(settings), "shapes": [s.label for s in settings.shapes]},
            "bandwidths": dataclasses.asdict(bandwidths),
            "shapes": [r.to_json() for r in results],
            "skipped": budget.skipped,
        }
        return analyse(report)

    def save() -> dict[str, Any]:  # after every shape: a run cut short keeps what it measured
        report = assemble()
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        return report

    try:
        # the short sections first for every shape, then the long curve sweeps with the time left
        first = tuple(section for section in settings.sections if section != "curves")

        def measure(shape: Shape, sections: tuple[str, ...]) -> ShapeResult:
            return run_shape(
                shape, models_root, engine, pageable_engine, settings, budget, progress, sections=sections
            )

        for shape in settings.shapes:
            if budget.allows(f"{shape.label}: all sections"):
                results.append(measure(shape, first))
                save()
                gc.collect()
        for result in results if "curves" in settings.sections else []:
            curve = measure(result.shape, ("curves",))
            result.curve_points = curve.curve_points
            save()
            gc.collect()
    finally:
        engine.close()
        pageable_engine.close()
    # the peak again at the end: the better of the two is the link's ceiling on a shared machine
    late = measure_bandwidths(tier, pageable_tier, settings.bandwidth_bytes, trials=5)
    if late.pinned_host_to_device.gbps > bandwidths.pinned_host_to_device.gbps:
        bandwidths = dataclasses.replace(bandwidths, pinned_host_to_device=late.pinned_host_to_device)
    report = save()
    render(report, out_dir)
    return out_dir
