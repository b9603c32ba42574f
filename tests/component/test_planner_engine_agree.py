"""The planner's GPU-memory promise holds for what the engine reserves, at every level and mode.

The planner sizes a placement from a model's directory alone (config + safetensors headers); the worker's
engine keeps whole units (layers, head, embedding) resident and reserves the bytes it really needs. If
the engine needs more than the planner counted, the worker refuses a placement the planner thought fit
(PlacementDoesNotFit) on a node packed to the byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from residency.api import LLMModelSpec
from residency.api.placement import PREFILL_MODE
from residency.modelgen import make_model
from residency_operator.planner import PlannerConfig
from residency_operator.planner.options import gpu_bytes_needed
from residency_operator.state import OperatorKnobs, demand
from residency_operator.validation import validate_model
from residency_worker.engine import make_gpu_tier
from residency_worker.engine.loading import load_weights
from residency_worker.engine.placement import budget_need, plan_residency

pytestmark = pytest.mark.component

SHAPES = [("llama", "tiny", 64, 1), ("qwen2", "small", 64, 1), ("llama", "small", 512, 4)]


@pytest.mark.parametrize(("arch", "preset", "max_sequence_length", "max_batch_size"), SHAPES)
def test_engine_reserves_no_more_than_the_planner_counted(
    tmp_path: Path, arch: str, preset: str, max_sequence_length: int, max_batch_size: int
) -> None:
    directory = make_model(tmp_path / f"{arch}-{preset}", arch, preset, seed=3)
    knobs = OperatorKnobs(allowed_model_roots=[tmp_path])
    offload = {"maxFraction": 0.75}
    spec = LLMModelSpec.model_validate(
        {
            "source": {"path": str(directory)},
            "maxSequenceLength": max_sequence_length,
            "maxBatchSize": max_batch_size,
            "offload": offload,
        }
    ).model_dump(by_alias=True, exclude_none=True)
    info = validate_model(spec, knobs.allowed_model_roots, knobs.remote_code_roots)
    assert not hasattr(info, "reason"), info
    model = demand("ns/m", {"metadata": {"name": "m", "namespace": "ns"}, "spec": spec}, info, knobs)  # type: ignore[arg-type]
    weights = load_weights(directory, "bfloat16", make_gpu_tier(2**30, force_emulated=True))
    # the directory's sizing counts each tensor's alignment padding as the engine's cache lays it out
    assert weights.weight_bytes == model.weight_bytes, (weights.weight_bytes, model.weight_bytes)
    over: list[str] = []
    inexact: list[str] = []
    for level in sorted(set(PlannerConfig().residency_levels) | {1.0}):
        if level < 1.0 - offload["maxFraction"] - 1e-9:
            continue
        chosen = plan_residency(weights, level, 1.0 - offload["maxFraction"])
        for mode in ("stream", "cpu"):
            engine_bytes = budget_need(
                weights,
                chosen,
                decode_mode=mode,
                prefill_mode=PREFILL_MODE,  # as the agent loads a placement of either mode
                max_batch_size=max_batch_size,
                max_sequence_length=max_sequence_length,
            ).total_bytes
            planned_bytes = gpu_bytes_needed(model, level, mode)  # type: ignore[arg-type]
            if engine_bytes > planned_bytes:
                over.append(f"{level:.2f} {mode}: engine {engine_bytes} > planner {planned_bytes}")
            # exact, not merely enough: the planner counts the engine's own units and staging, plus the
            # operator's per-model slack knob; in cpu mode the engine keeps only resident layers' KV on the
            # GPU, which the planner does not subtract
            if mode == "stream" and planned_bytes != engine_bytes + knobs.workspace_bytes:
                inexact.append(f"{level:.2f}: engine {engine_bytes} != planner {planned_bytes}")
    assert not over, over
    assert not inexact, inexact
    assert model.unit_bytes == tuple(weights.unit_bytes(u) for u in weights.units)
