"""The API's multi-GPU contract: a placement names its GPUs, their shares sum to residentFraction."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from residency.api import GpuShare, ModelPlacementSpec, ModelRef, NodeProfileSpec, gpu_set_label


def _spec(resident_fraction: float, gpus: list[GpuShare]) -> ModelPlacementSpec:
    return ModelPlacementSpec(
        model=ModelRef(namespace="team-a", name="big"),
        node_name="gpu-a",
        source_path="/models/big",
        resident_fraction=resident_fraction,
        gpus=gpus,
    )


def test_a_split_placement_lists_its_gpus_in_pipeline_order() -> None:
    spec = _spec(0.9, [GpuShare(index=1, resident_fraction=0.5), GpuShare(index=0, resident_fraction=0.4)])
    assert spec.gpu_indices() == [1, 0]
    wire = spec.to_wire()["gpus"]
    assert wire == [{"index": 1, "residentFraction": 0.5}, {"index": 0, "residentFraction": 0.4}]


def test_a_placement_written_before_splits_runs_on_gpu_0() -> None:
    assert _spec(0.7, []).gpu_indices() == [0]


def test_shares_that_do_not_sum_to_the_resident_fraction_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"sum to 0\.800000, not residentFraction 0\.900000"):
        _spec(0.9, [GpuShare(index=0, resident_fraction=0.4), GpuShare(index=1, resident_fraction=0.4)])


def test_a_gpu_named_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="more than once"):
        _spec(0.8, [GpuShare(index=0, resident_fraction=0.4), GpuShare(index=0, resident_fraction=0.4)])


def test_gpu_index_out_of_range_is_refused() -> None:
    with pytest.raises(ValidationError):
        GpuShare(index=64, resident_fraction=0.1)


def test_gpu_set_label_names_node_and_gpus() -> None:
    assert gpu_set_label("gpu-a", [0, 1]) == "gpu-a/0,1"
    assert gpu_set_label("gpu-a", []) == "gpu-a"


def test_a_profile_without_gpus_still_parses() -> None:
    profile = NodeProfileSpec.model_validate(
        {
            "nodeName": "gpu-a",
            "gpuType": "emulated-cpu",
            "gpuMemoryBytes": 1,
            "hostMemoryBytes": 1,
            "hostToDeviceGbps": 1.0,
            "hbmGbps": 1.0,
            "emulated": True,
        }
    )
    assert profile.gpus == [] and profile.host_links == []
