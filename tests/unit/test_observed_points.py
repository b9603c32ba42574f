"""Observed decode steps refine a model's predicted curve online (issue 28): the worker's window, the
operator's reading of it, the predictor's anchoring, the plan that follows and the condition users see."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from residency_operator.conditions import Verdict
from residency_operator.events import prediction_event, with_prediction_check
from residency_operator.observations import observed_point, with_observed_point
from residency_operator.planner import ModelDemand, NodeCapacity, ObservedPoint, Predictor, plan
from residency_operator.planner.options import MODES, build_class_tables
from residency_operator.planner.types import PlannerConfig
from residency_operator.verdicts import observed_rates
from residency_worker.engine.observed import (
    MIN_OBSERVED_STEPS,
    StepWindow,
    observed_step_due,
    observed_step_wire,
)

GB = 1e9
NODE = NodeCapacity(
    name="gpu-a",
    gpu_type="L4",
    gpu_memory_bytes=24 * 1024**3,
    host_memory_bytes=128 * 1024**3,
    host_to_device_gbps=25.0,
    hbm_gbps=300.0,
    host_memory_gbps=40.0,
)
OTHER = replace(NODE, name="gpu-b", gpu_type="A100")
MODEL = ModelDemand(
    name="team-a/chat",
    weight_bytes=int(3 * GB),
    kv_bytes_per_token=32768,
    max_sequence_length=4096,
    max_batch=4,
    layer_count=28,
    typical_sequence_length=512,
)


def observed(model: ModelDemand, node: NodeCapacity, slowdown: float, **where: Any) -> ObservedPoint:
    """A point observed ``slowdown`` times slower than the roofline predicts there."""
    fraction, mode = where.get("fraction", 0.5), where.get("mode", "stream")
    batch, sequence = where.get("batch", 2), where.get("sequence", 700)
    predicted = Predictor().decode_step_seconds(model, node, fraction, mode, batch, sequence)
    return ObservedPoint(node.gpu_type, fraction, mode, batch, sequence, predicted * slowdown)


# -- the worker's window --------------------------------------------------------------------------------
def test_the_window_reports_the_median_step_at_its_most_common_batch() -> None:
    window = StepWindow(window_seconds=60.0)
    for i in range(MIN_OBSERVED_STEPS + 4):
        window.record(4, 300 + i, 0.020 if i != 3 else 5.0, 0.5, "stream", now=100.0 + i)  # one wild step
    for i in range(3):
        window.record(1, 50, 0.010, 0.5, "stream", now=130.0 + i)
    summary = window.summary(now=140.0)
    assert summary is not None
    assert (summary.batch, summary.step_seconds, summary.steps) == (4, 0.020, MIN_OBSERVED_STEPS + 4)
    assert summary.sequence_tokens == round(300 + (MIN_OBSERVED_STEPS + 3) / 2)
    assert (summary.resident_fraction, summary.mode) == (0.5, "stream")
    assert summary.decode_tokens_per_second == pytest.approx(50.0)


def test_the_window_forgets_old_steps_and_steps_of_another_placement() -> None:
    window = StepWindow(window_seconds=60.0)
    for i in range(MIN_OBSERVED_STEPS):
        window.record(2, 100, 0.02, 1.0, "stream", now=float(i))
    assert window.summary(now=30.0) is not None
    assert window.summary(now=200.0) is None  # all older than the window
    for i in range(MIN_OBSERVED_STEPS - 1):
        window.record(2, 100, 0.05, 0.4, "cpu", now=31.0 + i)  # demoted and switched to cpu mode
    assert window.summary(now=50.0) is None  # too few steps at the new placement, the old ones do not count
    window.record(2, 100, 0.05, 0.4, "cpu", now=49.0)
    summary = window.summary(now=50.0)
    assert summary is not None and (summary.resident_fraction, summary.mode, summary.step_seconds) == (
        0.4,
        "cpu",
        0.05,
    )


def test_an_observed_step_is_written_when_it_moved_or_a_window_passed() -> None:
    window = StepWindow()
    for i in range(MIN_OBSERVED_STEPS):
        window.record(2, 100, 0.02, 1.0, "stream", now=float(i))
    summary = window.summary(now=20.0)
    assert summary is not None
    wire = observed_step_wire(summary)
    assert (
        wire["stepSeconds"] == 0.02 and wire["executionMode"] == "stream" and wire["residentFraction"] == 1.0
    )
    assert observed_step_due(None, summary, None)
    assert not observed_step_due(wire, summary, 5.0)
    assert observed_step_due(wire, summary, summary.window_seconds + 1)
    assert observed_step_due({**wire, "stepSeconds": 0.03}, summary, 5.0)
    assert observed_step_due({**wire, "batch": 3}, summary, 5.0)
    assert observed_step_due({**wire, "residentFraction": 0.5}, summary, 5.0)


# -- the operator reads it ------------------------------------------------------------------------------
def test_a_placements_observed_step_becomes_a_point_on_its_nodes_gpu_type() -> None:
    placement = {
        "spec": {"nodeName": "gpu-a"},
        "status": {
            "observedStep": {
                "batch": 2,
                "sequenceTokens": 700,
                "stepSeconds": 0.05,
                "steps": 40,
                "windowSeconds": 60.0,
                "residentFraction": 0.5,
                "executionMode": "cpu",
            }
        },
    }
    point = observed_point(placement, {"gpu-a": "L4"})
    assert point == ObservedPoint("L4", 0.5, "cpu", 2, 700, 0.05)
    assert with_observed_point(MODEL, placement, {"gpu-a": "L4"}).observed == point
    assert observed_point(placement, {}) is None  # a node no profile describes: nothing to compare with
    broken = {"spec": {"nodeName": "gpu-a"}, "status": {"observedStep": {"batch": "x"}}}
    assert observed_point(broken, {"gpu-a": "L4"}) is None
    assert with_observed_point(MODEL, None, {"gpu-a": "L4"}) is MODEL


# -- the predictor anchors the curve ----------------------------------------------------------------------
def test_an_observed_point_scales_the_models_curve_on_that_gpu_type_only() -> None:
    seen = replace(MODEL, observed=observed(MODEL, NODE, slowdown=2.0))
    predictor = Predictor()
    assert predictor.observed_ratio(seen, NODE) == pytest.approx(0.5)
    assert predictor.source(seen, NODE, "stream") == "observed"
    for fraction in (1.0, 0.75, 0.5, 0.0):
        for mode in MODES:
            base = predictor.decode_tokens_per_second(MODEL, NODE, fraction, mode)
            assert predictor.decode_tokens_per_second(seen, NODE, fraction, mode) == pytest.approx(base / 2)
    # another GPU type learns nothing from it
    assert predictor.observed_ratio(seen, OTHER) is None
    assert predictor.decode_tokens_per_second(
        seen, OTHER, 0.5, "stream"
    ) == predictor.decode_tokens_per_second(MODEL, OTHER, 0.5, "stream")
    assert predictor.source(seen, OTHER, "stream") == "roofline"


def test_one_wild_window_moves_a_prediction_at_most_fourfold() -> None:
    broken = replace(MODEL, observed=observed(MODEL, NODE, slowdown=1000.0))
    predictor = Predictor()
    assert predictor.observed_ratio(broken, NODE) == pytest.approx(0.001)  # status shows what was seen
    base = predictor.decode_tokens_per_second(MODEL, NODE, 1.0, "stream")
    assert predictor.decode_tokens_per_second(broken, NODE, 1.0, "stream") == pytest.approx(base / 4)


def test_the_planner_tables_apply_the_observed_point_as_the_scalar_predictor_does() -> None:
    models = [
        replace(MODEL, observed=observed(MODEL, NODE, slowdown=1.7)),
        replace(MODEL, name="team-a/other", max_batch=2),
    ]
    predictor = Predictor()
    tables = build_class_tables(models, [NODE], predictor, PlannerConfig(), frozenset())
    for k, mode in enumerate(MODES):
        for i, demand in enumerate(models):
            for j, level in enumerate(tables.levels):
                expected = predictor.decode_tokens_per_second(demand, NODE, float(level), mode)
                assert tables.decode_tokens_per_second[0, k, i, j] == pytest.approx(expected, rel=1e-9)


# -- the plan follows ------------------------------------------------------------------------------------
def test_a_model_slower_than_predicted_is_re_planned_and_no_slo_is_promised_it_cannot_keep() -> None:
    """Under its roofline the model meets its SLO 30 % resident on a 2 GiB GPU. Observed 1.3 times slower
    there, it would need half of itself on the GPU: the next plan says so instead of promising the SLO."""
    small_gpu = replace(NODE, gpu_memory_bytes=2 * 1024**3)
    slo_model = replace(MODEL, max_batch=1, max_offload_fraction=0.9, allowed_modes=("stream",))
    slo = Predictor().decode_tokens_per_second(slo_model, small_gpu, 0.2, "stream", 1)
    slo_model = replace(slo_model, min_decode_tokens_per_second=slo)
    before = plan([slo_model], [small_gpu], []).placements["team-a/chat"]
    assert before.meets_slo and before.prediction_source == "roofline"
    point = observed(slo_model, small_gpu, 1.3, fraction=before.resident_fraction, mode=before.mode, batch=1)
    after = plan([replace(slo_model, observed=point)], [small_gpu], [])
    assert "team-a/chat" not in after.placements
    (refused,) = after.unschedulable
    assert refused.reason == "InsufficientGPUMemory" and "(50% resident) for SLO" in refused.message
    # with room for it, the model stays and its prediction is the observed rate, not the roofline's
    roomy = replace(NODE, gpu_memory_bytes=int(2.5 * 1024**3))
    placed = plan([replace(slo_model, observed=point)], [roomy], []).placements["team-a/chat"]
    assert placed.prediction_source == "observed" and placed.observed_ratio == pytest.approx(1 / 1.3)
    roofline_rate = Predictor().decode_tokens_per_second(
        slo_model, roomy, placed.resident_fraction, "stream", 1
    )
    assert placed.predicted_decode_tokens_per_second == pytest.approx(roofline_rate / 1.3, rel=1e-6)


# -- users see it ---------------------------------------------------------------------------------------
def ready(ratio: float) -> Verdict:
    extra: tuple[tuple[str, Any], ...] = (
        ("predictedDecodeTokensPerSecond", 10.0),
        (
            "observed",
            {
                "decodeTokensPerSecond": 9.0,
                "windowDecodeTokensPerSecond": 4.5,
                "windowBatch": 2,
                "ratioToPrediction": ratio,
            },
        ),
    )
    return Verdict("Ready", "Ready", "serving", (("Ready", "True", "Ready", "serving"),), extra)


def test_status_shows_the_window_and_its_ratio_to_the_prediction() -> None:
    planned = plan([replace(MODEL, observed=observed(MODEL, NODE, slowdown=4.0))], [NODE], [])
    placed = planned.placements["team-a/chat"]
    rates = observed_rates(12.0, {"stepSeconds": 0.25, "batch": 2}, placed)
    assert rates == {
        "decodeTokensPerSecond": 12.0,
        "windowDecodeTokensPerSecond": 4.0,
        "windowBatch": 2,
        "ratioToPrediction": 0.25,
    }
    assert observed_rates(None, {"stepSeconds": "x"}, placed) == {}


def test_a_window_far_below_the_curve_is_a_condition_and_one_warning_naming_the_window() -> None:
    slow = with_prediction_check(ready(0.3))
    condition = next(c for c in slow.conditions if c[0] == "DecodeAsPredicted")
    assert condition[1:3] == ("False", "DecodeBelowPrediction")
    assert (
        "last 60 s of decode steps" in condition[3]
        and "30% of what the model's curve predicted" in condition[3]
    )
    assert "plans this model with the observed rate" in condition[3]
    event = prediction_event({}, slow)
    assert event is not None and event[0] == "Warning"
    fine = with_prediction_check(ready(0.9))
    assert next(c for c in fine.conditions if c[0] == "DecodeAsPredicted")[1] == "True"
