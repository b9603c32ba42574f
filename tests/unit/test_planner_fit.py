"""The engine model fitted per GPU type (planner/fit.py) and where the predictor takes a prediction from."""

from __future__ import annotations

from dataclasses import replace

import pytest

from residency_operator.planner import ModelDemand, NodeCapacity, Predictor, ProfilePoint, SensitivityProfile
from residency_operator.planner.fit import FEATURES, StepSample, fit_engine, fit_engines, step_features
from residency_operator.planner.types import ExecutionMode

GB = 1e9
NODE = NodeCapacity(
    name="n1",
    gpu_type="H100",
    gpu_memory_bytes=80 * 1024**3,
    host_memory_bytes=256 * 1024**3,
    host_to_device_gbps=50.0,
    hbm_gbps=3000.0,
    host_memory_gbps=90.0,
)

# A stated engine: 2 ms a step, 0.15 ms a layer, HBM at 2 TB/s, link at 45 GB/s plus 0.4 ms a streamed layer,
# host DRAM at 60 GB/s plus 0.1 ms a host-computed layer, KV read at 1.5 TB/s. Compute is free.
TRUTH = {
    "step": 2e-3,
    "layer": 0.15e-3,
    "resident_byte": 1 / (2000 * GB),
    "kv_byte": 1 / (1500 * GB),
    "stream_byte": 1 / (45 * GB),
    "stream_layer": 0.4e-3,
    "cpu_byte": 1 / (60 * GB),
    "cpu_layer": 0.1e-3,
}


def engine_seconds(model: ModelDemand, fraction: float, mode: ExecutionMode, sequence: int = 512) -> float:
    features = step_features(
        model.effective_layer_count,
        model.weight_bytes,
        model.effective_parameter_count,
        model.kv_bytes_per_token,
        fraction,
        mode,
        1,
        sequence,
    )
    return sum(TRUTH.get(name, 0.0) * value for name, value in zip(FEATURES, features, strict=True))


def model(name: str, weight_gb: float, layers: int) -> ModelDemand:
    return ModelDemand(
        name=name,
        weight_bytes=int(weight_gb * GB),
        kv_bytes_per_token=16384,
        max_sequence_length=4096,
        max_batch=1,
        layer_count=layers,
        typical_sequence_length=512,
    )


SMALL, MEDIUM, LARGE, UNSEEN = (
    model("small", 1.0, 24),
    model("medium", 6.0, 36),
    model("large", 16.0, 32),
    model("unseen", 3.0, 28),
)
FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)


def measured_profiles(models: list[ModelDemand], noise: float = 0.0) -> list[SensitivityProfile]:
    profiles = []
    for index, m in enumerate(models):
        for mode in ("stream", "cpu"):
            for sequence in (512, 16384):
                points = []
                for j, fraction in enumerate(FRACTIONS):
                    wobble = 1.0 + noise * (1 if (index + j) % 2 else -1)  # deterministic ± noise
                    seconds = engine_seconds(m, fraction, mode, sequence)
                    points.append(ProfilePoint(fraction, wobble / seconds))
                profiles.append(SensitivityProfile(m.name, "H100", tuple(points), mode, sequence, 1))
    return profiles


def relative_error(predicted: float, actual: float) -> float:
    return abs(predicted - actual) / actual


def test_fit_predicts_an_unprofiled_shape_where_the_roofline_is_far_off() -> None:
    profiles = measured_profiles([SMALL, MEDIUM, LARGE])
    fits = fit_engines(profiles, [SMALL, MEDIUM, LARGE])
    assert set(fits) == {"H100"}
    fitted, roofline = Predictor(fits=fits), Predictor()
    for mode in ("stream", "cpu"):
        for fraction in (1.0, 0.6, 0.3, 0.0):
            actual = 1.0 / engine_seconds(UNSEEN, fraction, mode)
            got = fitted.decode_tokens_per_second(UNSEEN, NODE, fraction, mode, 1, 512)
            assert relative_error(got, actual) < 0.02, (mode, fraction, got, actual)
    # the bare roofline misses the overheads by a wide margin on a resident small model
    assert (
        relative_error(
            roofline.decode_tokens_per_second(SMALL, NODE, 1.0, "stream", 1, 512),
            1.0 / engine_seconds(SMALL, 1.0, "stream"),
        )
        > 1.0
    )


def test_fit_stays_close_under_measurement_noise() -> None:
    fits = fit_engines(measured_profiles([SMALL, MEDIUM, LARGE], noise=0.05), [SMALL, MEDIUM, LARGE])
    fitted = Predictor(fits=fits)
    errors = [
        relative_error(
            fitted.decode_tokens_per_second(UNSEEN, NODE, fraction, "stream", 1, 512),
            1.0 / engine_seconds(UNSEEN, fraction, "stream"),
        )
        for fraction in FRACTIONS
    ]
    assert max(errors) < 0.12
    assert fits["H100"].median_relative_error < 0.1


def test_fit_coefficients_are_never_negative_and_describe_reads_back_the_overheads() -> None:
    fit = fit_engines(measured_profiles([SMALL, MEDIUM, LARGE]), [SMALL, MEDIUM, LARGE])["H100"]
    assert all(c >= 0 for c in fit.coefficients)
    described = fit.describe()
    assert described["step_overhead_ms"] + 24 * described["layer_overhead_ms"] == pytest.approx(
        2.0 + 24 * 0.15, rel=0.05
    )
    assert described["stream_gbps"] == pytest.approx(45.0, rel=0.1)


def test_one_model_or_too_few_points_gives_no_fit() -> None:
    assert fit_engines(measured_profiles([SMALL]), [SMALL]) == {}
    samples = [
        StepSample("a", 24, 10**9, 5 * 10**8, 16384, 1.0, "stream", 1, 512, 0.01),
        StepSample("b", 32, 10**10, 5 * 10**9, 16384, 1.0, "stream", 1, 512, 0.02),
    ]
    assert fit_engine("H100", samples) is None
    # profiles of a model the planner does not know contribute nothing
    assert fit_engines(measured_profiles([SMALL, MEDIUM]), [SMALL]) == {}


def test_source_names_profile_then_fitted_then_roofline() -> None:
    profiles = measured_profiles([SMALL, MEDIUM])
    calibrated = Predictor.calibrated(profiles, [SMALL, MEDIUM, UNSEEN])
    assert calibrated.source(SMALL, NODE, "stream") == "profile"
    assert calibrated.source(UNSEEN, NODE, "stream") == "fitted"
    other_gpu = replace(NODE, gpu_type="L4")
    assert calibrated.source(UNSEEN, other_gpu, "stream") == "roofline"
    assert Predictor().source(SMALL, NODE, "stream") == "roofline"


def test_a_profiled_model_uses_its_curve_and_the_fit_only_beyond_it() -> None:
    profiles = measured_profiles([SMALL, MEDIUM])
    calibrated = Predictor.calibrated(profiles, [SMALL, MEDIUM])
    measured = 1.0 / engine_seconds(SMALL, 0.5, "stream")
    assert calibrated.decode_tokens_per_second(SMALL, NODE, 0.5, "stream", 1, 512) == pytest.approx(measured)
    # another sequence length: the curve scaled by the fitted engine's ratio, which knows the overheads
    longer = 1.0 / engine_seconds(SMALL, 0.5, "stream", sequence=8192)
    got = calibrated.decode_tokens_per_second(SMALL, NODE, 0.5, "stream", 1, 8192)
    assert relative_error(got, longer) < 0.05


def test_the_plan_predicts_an_unprofiled_model_with_the_fit_and_says_so() -> None:
    from residency_operator.planner import plan

    profiles = measured_profiles([SMALL, MEDIUM])
    unseen = replace(UNSEEN, max_batch=1, min_decode_tokens_per_second=1.0)
    planned = plan([replace(SMALL, max_batch=1), replace(MEDIUM, max_batch=1), unseen], [NODE], [], profiles)
    sources = {name: p.prediction_source for name, p in planned.placements.items()}
    assert sources == {"small": "profile", "medium": "profile", "unseen": "fitted"}
    placed = planned.placements["unseen"]
    expected = Predictor.calibrated(profiles, [SMALL, MEDIUM, unseen]).decode_tokens_per_second(
        unseen, NODE, placed.resident_fraction, placed.mode
    )
    assert placed.predicted_decode_tokens_per_second == pytest.approx(expected, rel=1e-6)
    # far below the roofline's promise: the fitted overheads are in the plan
    roofline = Predictor().decode_tokens_per_second(unseen, NODE, placed.resident_fraction, placed.mode)
    assert placed.predicted_decode_tokens_per_second < 0.5 * roofline
    assert plan([unseen], [NODE], []).placements["unseen"].prediction_source == "roofline"


def test_the_planner_tables_use_the_fit_vectorised_as_the_scalar_predictor_does() -> None:
    from residency_operator.planner.options import MODES, build_class_tables
    from residency_operator.planner.types import PlannerConfig

    profiles = measured_profiles([SMALL, MEDIUM, LARGE])
    models = [replace(UNSEEN, max_batch=4), replace(model("tiny", 0.2, 8), max_batch=2)]
    predictor = Predictor.calibrated(profiles, [SMALL, MEDIUM, LARGE, *models])
    tables = build_class_tables(models, [NODE], predictor, PlannerConfig(), frozenset())
    for k, mode in enumerate(MODES):
        for i, demand in enumerate(models):
            for j, level in enumerate(tables.levels):
                expected = predictor.decode_tokens_per_second(demand, NODE, float(level), mode)
                assert tables.decode_tokens_per_second[0, k, i, j] == pytest.approx(expected, rel=1e-9)
