"""The planner counts a partial placement's GPU bytes as the engine will hold them (issue 28, item 4):
whole units in the engine's order (residency.sizing.resident_units) and its staging buffers, from the unit
sizes the operator reads from the safetensors headers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from residency.sizing import resident_units
from residency_operator.planner import ModelDemand, NodeCapacity, plan
from residency_operator.planner.options import exact_weights, gpu_bytes_needed, host_bytes_needed

MIB = 2**20
# a small, coarse model: an untied 40 MiB head (norm + LM head), 4 layers of 20 MiB, a 40 MiB embedding
UNITS = (40 * MIB, 20 * MIB, 20 * MIB, 20 * MIB, 20 * MIB, 40 * MIB)
COARSE = ModelDemand(
    name="ns/coarse",
    weight_bytes=sum(UNITS),
    kv_bytes_per_token=1024,
    max_sequence_length=256,
    max_batch=1,
    layer_count=4,
    bytes_per_layer=40 * MIB,  # the operator's largest streamable unit: here the head
    max_offload_fraction=0.9,
    workspace_bytes=8 * MIB,
)
EXACT = replace(COARSE, unit_bytes=UNITS)


def test_the_engines_choice_of_units() -> None:
    assert resident_units(UNITS, 1.0) == (frozenset(range(6)), sum(UNITS))
    # 50 % of 160 MiB: the head and two layers come to exactly 80 MiB
    assert resident_units(UNITS, 0.5) == (frozenset({0, 1, 2}), 80 * MIB)
    # a target below the head alone: layers get closer (the head is skipped, not overshot)
    chosen, held = resident_units(UNITS, 0.1)
    assert 0 not in chosen and held == 20 * MIB
    # offload.maxFraction is a floor: more units until at least min_fraction is resident
    assert resident_units(UNITS, 0.1, min_fraction=0.3)[1] >= 0.3 * sum(UNITS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resident_units(UNITS, 1.5)


def test_exact_bytes_drop_the_unit_of_slack_and_size_staging_by_a_layer() -> None:
    held, staging = exact_weights(EXACT, 0.5)
    assert (held, staging) == (80 * MIB, 2 * 20 * MIB)  # the head streams in layer-sized chunks
    fixed = EXACT.kv_reservation_bytes + EXACT.workspace_bytes
    assert gpu_bytes_needed(EXACT, 0.5, "stream") == 80 * MIB + 40 * MIB + fixed
    # without unit sizes: the fraction, one more (head-sized) unit and two head-sized buffers
    assert gpu_bytes_needed(COARSE, 0.5, "stream") == 80 * MIB + 3 * 40 * MIB + fixed
    assert host_bytes_needed(EXACT, 0.5) == 80 * MIB
    # only the untied embedding offloaded: nothing streams, so no staging
    assert exact_weights(EXACT, 0.76) == (120 * MIB, 0)
    assert gpu_bytes_needed(EXACT, 1.0, "stream") == gpu_bytes_needed(COARSE, 1.0, "stream")


def test_a_small_coarse_model_gets_its_partial_placement_back() -> None:
    """On a GPU with room for 60 % of it, the approximate count finds no partial placement that fits;
    the exact one places it partly resident."""
    fixed = COARSE.kv_reservation_bytes + COARSE.workspace_bytes
    node = NodeCapacity(
        name="gpu-a",
        gpu_type="L4",
        gpu_memory_bytes=fixed + 140 * MIB,
        host_memory_bytes=4 * 2**30,
        host_to_device_gbps=20.0,
        hbm_gbps=300.0,
        host_memory_gbps=40.0,
        reserved_gpu_bytes=0,
    )
    rough = plan([COARSE], [node], [])
    exact = plan([EXACT], [node], [])
    assert "ns/coarse" not in rough.placements or rough.placements["ns/coarse"].resident_fraction < 0.5
    placed = exact.placements["ns/coarse"]
    assert placed.resident_fraction >= 0.5
    assert placed.gpu_bytes <= node.gpu_memory_bytes
