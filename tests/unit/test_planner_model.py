"""Unit tests of the planner's world model: roofline predictor, profile interpolation, cost model."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from residency_operator.planner.costs import (
    amortised_cost_tokens_per_second,
    demote_cost,
    load_cost,
    migrate_cost,
    preempt_cost,
    promote_cost,
    resume_cost,
)
from residency_operator.planner.options import (
    _model_row,
    build_class_tables,
    evaluate_option,
    gpu_bytes_needed,
    host_bytes_needed,
)
from residency_operator.planner.predictor import (
    MonotoneCurve,
    Predictor,
    calibrated_factor,
    isotonic_increasing,
    profile_from_points,
    typical_sequence_tokens,
)
from residency_operator.planner.types import GIB, ModelDemand, NodeCapacity, PlannerConfig
from residency_operator.planner.value import gpu_busy_fraction

NODE = NodeCapacity(
    name="n",
    gpu_type="H100",
    gpu_memory_bytes=80 * GIB,
    host_memory_bytes=512 * GIB,
    host_to_device_gbps=50.0,
    hbm_gbps=2000.0,
    host_memory_gbps=100.0,
    storage_read_gbps=2.0,
)
MODEL = ModelDemand(
    name="ns/m", weight_bytes=16_000_000_000, kv_bytes_per_token=0, max_batch=1, max_sequence_length=2048
)


def test_roofline_decode_fully_resident() -> None:
    # 16 GB read from 2000 GB/s HBM per token: 8 ms, 125 tokens/s.
    rate = Predictor().decode_tokens_per_second(MODEL, NODE, 1.0, "stream")
    assert rate == pytest.approx(125.0)


def test_roofline_decode_half_offloaded_stream_and_cpu() -> None:
    predictor = Predictor()
    # stream: 8 GB / 2000 GB/s + 8 GB / 50 GB/s = 4 ms + 160 ms
    assert predictor.decode_step_seconds(MODEL, NODE, 0.5, "stream") == pytest.approx(0.164)
    # cpu: 8 GB / 2000 GB/s + 8 GB / 100 GB/s = 4 ms + 80 ms
    assert predictor.decode_step_seconds(MODEL, NODE, 0.5, "cpu") == pytest.approx(0.084)


def test_roofline_kv_reads_scale_with_batch_and_sequence() -> None:
    model = ModelDemand(name="ns/kv", weight_bytes=0, kv_bytes_per_token=1_000_000, max_batch=4)
    predictor = Predictor()
    # 4 sequences x 1000 tokens x 1 MB = 4 GB from HBM = 2 ms
    assert predictor.decode_step_seconds(model, NODE, 1.0, "stream", batch=4, sequence_tokens=1000) == (
        pytest.approx(0.002)
    )


def test_calibration_factor_scales_roofline() -> None:
    slow = dataclasses.replace(NODE, calibration_factor=0.5)
    assert Predictor().decode_tokens_per_second(MODEL, slow, 1.0, "stream") == pytest.approx(62.5)


def test_calibrated_factor_moves_towards_observation_and_is_bounded() -> None:
    assert calibrated_factor(1.0, observed_tokens_per_second=50, predicted_tokens_per_second=100) == (
        pytest.approx(0.9)
    )
    assert calibrated_factor(1.0, 0.0, 100.0) == 1.0
    assert calibrated_factor(4.0, 1e6, 1.0, smoothing=1.0) == 4.0


def test_measured_profile_wins_over_roofline() -> None:
    profile = profile_from_points("ns/m", "H100", [(0.5, 20.0), (1.0, 100.0)], batch=1, sequence_length=1024)
    model = ModelDemand(
        name="ns/m",
        weight_bytes=16_000_000_000,
        kv_bytes_per_token=0,
        max_batch=1,
        typical_sequence_length=1024,
    )
    predictor = Predictor([profile])
    assert predictor.decode_tokens_per_second(model, NODE, 1.0, "stream") == pytest.approx(100.0)
    assert predictor.decode_tokens_per_second(model, NODE, 0.75, "stream") == pytest.approx(60.0)
    other_gpu = dataclasses.replace(NODE, gpu_type="L4")
    assert predictor.decode_tokens_per_second(model, other_gpu, 1.0, "stream") == pytest.approx(125.0)


def test_isotonic_fit_removes_dips() -> None:
    assert isotonic_increasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]


@settings(max_examples=60, deadline=None)
@given(
    points=st.lists(st.tuples(st.floats(0.05, 1.0), st.floats(0.1, 500.0)), min_size=1, max_size=12),
    probes=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=20),
)
def test_profile_interpolation_is_monotone(points: list[tuple[float, float]], probes: list[float]) -> None:
    curve = MonotoneCurve.from_points(points)
    ordered = sorted(probes)
    values = [curve(p) for p in ordered]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(values))
    assert min(values) >= min(r for _, r in points) - 1e-9
    assert max(values) <= max(r for _, r in points) + 1e-9


BANDWIDTH = st.floats(0.05, 5000.0)


@settings(max_examples=80, deadline=None)
@given(link=BANDWIDTH, hbm=BANDWIDTH, host=BANDWIDTH, weight_mb=st.floats(0.1, 20_000.0))
def test_more_residency_never_predicts_a_slower_model(
    link: float, hbm: float, host: float, weight_mb: float
) -> None:
    """Whatever a node measured (an emulated node's link can read faster than its "HBM")."""
    node = dataclasses.replace(NODE, host_to_device_gbps=link, hbm_gbps=hbm, host_memory_gbps=host)
    model = dataclasses.replace(MODEL, weight_bytes=int(weight_mb * 1e6), kv_bytes_per_token=4096)
    predictor = Predictor()
    levels = [i / 20 for i in range(21)]
    for mode in ("stream", "cpu"):
        decode = [predictor.decode_tokens_per_second(model, node, r, mode) for r in levels]
        prefill = [predictor.prefill_tokens_per_second(model, node, r, mode, 256) for r in levels]
        for rates in (decode, prefill):
            assert all(a <= b * (1 + 1e-9) for a, b in itertools.pairwise(rates)), (mode, rates)


@pytest.mark.parametrize(("link", "hbm", "host"), [(100.0, 29.7, 29.7), (29.0, 5.0, 29.7), (0.5, 0.5, 100.0)])
def test_a_model_alone_on_a_roomy_node_is_fully_resident_whatever_the_bandwidths(
    link: float, hbm: float, host: float
) -> None:
    """Regression: an emulated node whose link measured faster than its memory got a 30 % placement."""
    from residency_operator.planner import plan

    node = dataclasses.replace(
        NODE, gpu_memory_bytes=64 * 2**20, host_to_device_gbps=link, hbm_gbps=hbm, host_memory_gbps=host
    )
    small = ModelDemand(
        name="ns/chat",
        weight_bytes=394_368,
        kv_bytes_per_token=512,
        max_sequence_length=64,
        max_batch=1,
        layer_count=4,
        bytes_per_layer=74_016,
        parameter_count=197_184,
        min_decode_tokens_per_second=1.0,
        max_offload_fraction=0.75,
        workspace_bytes=1_060_000,
    )
    for solver in ("milp", "greedy"):
        placed = plan([small], [node], [], config=PlannerConfig(solver=solver)).placements["ns/chat"]  # type: ignore[arg-type]
        assert placed.resident_fraction == 1.0, (solver, placed)


def test_memory_footprint() -> None:
    model = ModelDemand(
        name="ns/m",
        weight_bytes=10 * GIB,
        kv_bytes_per_token=1024,
        max_sequence_length=1024,
        max_batch=2,
        workspace_bytes=GIB,
        layer_count=10,
    )
    # resident 5 GiB + KV 2 MiB + workspace 1 GiB + double buffer of a 1 GiB layer (both modes stream for
    # prefill) + one 1 GiB layer of granularity (the engine keeps whole layers) whenever partly resident
    assert gpu_bytes_needed(model, 0.5, "stream") == 5 * GIB + 2 * 1024 * 1024 + GIB + 2 * GIB + GIB
    assert gpu_bytes_needed(model, 0.5, "cpu") == gpu_bytes_needed(model, 0.5, "stream")
    assert gpu_bytes_needed(model, 1.0, "stream") == 10 * GIB + 2 * 1024 * 1024 + GIB
    assert host_bytes_needed(model, 0.25) == round(7.5 * GIB)


def test_busy_fraction_grows_with_demand_and_is_capped() -> None:
    low = gpu_busy_fraction(1.0, 0.01, 0.02, 8.0, 0.95)
    high = gpu_busy_fraction(100.0, 0.01, 0.02, 8.0, 0.95)
    assert 0 < low < high <= 0.95
    assert gpu_busy_fraction(float("inf"), 0.01, 0.02, 8.0, 0.95) == 0.0


def test_cost_model_units() -> None:
    load = load_cost(MODEL, NODE, 1.0)
    # 16 GB from storage at 2 GB/s + 16 GB to the GPU at 50 GB/s + 1 s start-up
    assert load.seconds == pytest.approx(8.0 + 0.32 + 1.0)
    assert load.bytes_moved == 32_000_000_000
    preempt = preempt_cost(MODEL, NODE, kv_cache_bytes=1_000_000_000)
    assert preempt.seconds == pytest.approx(0.02 + 0.05)
    assert preempt.bytes_moved == 1_000_000_000
    resume = resume_cost(MODEL, NODE, 0.5, kv_cache_bytes=1_000_000_000)
    assert resume.bytes_moved == 9_000_000_000
    assert resume.seconds == pytest.approx(9e9 / 50e9 + 0.25)
    assert promote_cost(MODEL, NODE, 0.5, 0.75).bytes_moved == 4_000_000_000
    assert demote_cost(MODEL, NODE, 0.75, 0.5).seconds == pytest.approx(4e9 / 50e9)
    assert promote_cost(MODEL, NODE, 0.75, 0.5).bytes_moved == 0
    migrate = migrate_cost(MODEL, NODE, NODE, 1.0, kv_cache_bytes=0)
    assert migrate.seconds == pytest.approx(preempt_cost(MODEL, NODE, 0).seconds + load.seconds)
    # Preemption is cheap next to the reload it implies: the study's central observation.
    assert preempt.seconds < resume.seconds < load.seconds


def test_measured_reload_overrides_estimate() -> None:
    measured = dataclasses.replace(MODEL, last_reload_seconds=3.5)
    assert resume_cost(measured, NODE, 1.0).seconds == 3.5


def test_amortised_cost() -> None:
    cost = load_cost(MODEL, NODE, 1.0)
    assert amortised_cost_tokens_per_second(cost, 100.0, 600.0) == pytest.approx(100.0 * cost.seconds / 600.0)
    assert amortised_cost_tokens_per_second(cost, 100.0, 0.0) == 0.0


def test_prefill_streams_offloaded_layers_in_both_modes() -> None:
    """cpu mode changes decode only: a prompt is compute-bound, so its offloaded layers stream to the GPU
    (as the worker runs them, ``PREFILL_MODE``) rather than run at host speed."""
    predictor = Predictor()
    model = dataclasses.replace(MODEL, parameter_count=8 * 10**9)
    # 512 tokens x 2 x 8e9 FLOPs at half of 100 TFLOPS: 82 ms per half; the offloaded 8 GB over 50 GB/s:
    # 160 ms. Resident half max(4 ms of HBM, 82 ms of FLOPs) + offloaded half max(160 ms, 82 ms).
    expected = 0.08192 + 0.16
    assert predictor.prefill_seconds(model, NODE, 0.5, "stream", 512) == pytest.approx(expected)
    assert predictor.prefill_seconds(model, NODE, 0.5, "cpu", 512) == pytest.approx(expected)
    # the memory a placement holds for it: the same staging buffers in both modes
    assert gpu_bytes_needed(model, 0.5, "cpu") == gpu_bytes_needed(model, 0.5, "stream")


def test_prefill_work_counts_in_gpu_time_and_slows_decoding() -> None:
    """Prompt tokens/s take the GPU's time too: enough of them leave too little to decode at the SLO."""
    config = PlannerConfig()
    predictor = Predictor()
    model = dataclasses.replace(
        MODEL,
        min_decode_tokens_per_second=5.0,
        demand_decode_tokens_per_second=1.0,
        parameter_count=8 * 10**9,
        max_offload_fraction=0.75,
    )
    quiet = evaluate_option(predictor, model, NODE, 0.5, "cpu", config)
    assert quiet.allowed and quiet.meets_slo
    verdicts = []
    for prompt_tokens_per_second in (200.0, 2000.0):
        prompts = dataclasses.replace(
            model, prompt_tokens_per_second=prompt_tokens_per_second, typical_prompt_tokens=512
        )
        busy = evaluate_option(predictor, prompts, NODE, 0.5, "cpu", config)
        share = prompt_tokens_per_second / predictor.prefill_tokens_per_second(prompts, NODE, 0.5, "cpu", 512)
        assert busy.busy_fraction == pytest.approx(min(0.95, quiet.busy_fraction + share))
        assert busy.tolerance == pytest.approx(max(0.0, quiet.tolerance - share))
        assert busy.meets_slo == (busy.decode_tokens_per_second * (1 - share) >= 5.0)
        verdicts.append(busy.meets_slo)
        # The vectorised tables say the same as the scalar evaluation.
        tables = build_class_tables([prompts], [NODE], predictor, config, frozenset())
        level = list(tables.levels).index(0.5)
        assert tables.busy_fraction[0, 1, 0, level] == pytest.approx(busy.busy_fraction)
        assert tables.tolerance[0, 1, 0, level] == pytest.approx(busy.tolerance)
        assert bool(tables.feasible[0, 1, 0, level]) == (busy.meets_slo and busy.allowed)
    # 11.9 tok/s decoding: a tenth of the time prefilling leaves the SLO met, nine tenths do not
    assert verdicts == [True, False]


def test_model_row_matches_the_model_properties() -> None:
    model = dataclasses.replace(MODEL, max_batch=4, typical_sequence_length=700, max_offload_fraction=0.4)
    row = _model_row(model)
    assert row[1] == model.kv_bytes_per_token * typical_sequence_tokens(model) * 4
    assert row[5] == model.min_resident_fraction
    assert row[6] == model.kv_reservation_bytes + model.workspace_bytes
    assert row[7] == 2 * model.effective_bytes_per_layer
    assert row[11] == model.effective_parameter_count
