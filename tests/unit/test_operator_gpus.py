"""The operator on multi-GPU nodes: NodeProfile GPUs into the planner's view, spec.gpus written on a
split's placement, and status.gpuSet / status.gpus on the LLMModel (``kubectl get llm -o wide``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_operator_state import NOW, knobs, llm, loaded, node, profile, run

from conftest import MakeDir
from residency.api import ModelPlacementSpec
from residency.names import placement_name
from residency_operator.inputs import planner_inputs
from residency_operator.nodegpus import profile_gpus
from residency_operator.planner.options import gpu_bytes_needed
from residency_operator.state import ClusterState
from residency_operator.verdicts import model_verdict


def two_gpu_profile(name: str, gpu_bytes: int) -> dict[str, Any]:
    """An emulated node of two GPUs of ``gpu_bytes`` each, behind one host link."""
    body = profile(name, 2 * gpu_bytes)
    body["spec"].update(
        gpuCount=2,
        gpus=[
            {
                "index": i,
                "name": "emulated-cpu",
                "memoryBytes": gpu_bytes,
                "hbmGbps": 100.0,
                "hostToDeviceGbps": 10.0,
                "hostLink": 0,
            }
            for i in range(2)
        ],
        hostLinks=[{"id": 0, "gpus": [0, 1], "concurrentHostToDeviceGbps": 12.0}],
        deviceToDeviceGbps=20.0,
    )
    return body


def test_profile_gpus_reads_each_gpu_its_links_and_the_d2d_bandwidth() -> None:
    fields = profile_gpus(two_gpu_profile("n1", 5000)["spec"])
    assert [(g.index, g.memory_bytes, g.host_link) for g in fields["gpus"]] == [(0, 5000, 0), (1, 5000, 0)]
    (link,) = fields["host_links"]
    assert (link.gpus, link.concurrent_host_to_device_gbps) == ((0, 1), 12.0)
    assert fields["device_to_device_gbps"] == 20.0
    # gpuCount without a GPU list: that many identical GPUs sharing the node's memory equally.
    counted = profile_gpus({**profile("n2", 9000)["spec"], "gpuCount": 3})
    assert [g.memory_bytes for g in counted["gpus"]] == [3000, 3000, 3000]
    assert profile_gpus(profile("n3", 9000)["spec"]) == {}


def split_state(tmp_path: Path, model_dir: Path, placements: list[dict[str, Any]]) -> ClusterState:
    model = llm("big", model_dir)
    probe = planner_inputs(
        ClusterState([model], [profile("n1", 10**7)], [node("n1")], []), NOW, knobs(tmp_path)
    )
    need = gpu_bytes_needed(probe.demands[0], 1.0, "stream")
    # Each GPU holds 60 % of what the model needs: it fits two of them, not one.
    return ClusterState([model], [two_gpu_profile("n1", int(need * 0.6))], [node("n1")], placements)


def test_a_model_too_big_for_one_gpu_is_placed_on_both_and_shows_its_gpu_set(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    model_dir = make_model_dir("big", params=20_000)
    inputs, result, desired = run(split_state(tmp_path, model_dir, []), tmp_path)
    manifest = desired[placement_name("team-a/big")]
    spec = manifest["spec"]
    assert spec["nodeName"] == "n1"
    assert [g["index"] for g in spec["gpus"]] == [0, 1]
    # The API's own check: the shares sum to residentFraction, a GPU at most once.
    assert ModelPlacementSpec.model_validate(spec).gpu_indices() == [0, 1]
    extra = dict(model_verdict("team-a/big", inputs, result, None).extra)
    assert extra["gpuSet"] == "n1/0,1"
    assert [g["index"] for g in extra["gpus"]] == [0, 1]

    # Once the worker reports what each GPU holds, status shows its figures.
    reported = [
        {"index": 0, "residentFraction": 0.5, "residentBytes": 21_000},
        {"index": 1, "residentFraction": 0.5, "residentBytes": 20_500},
    ]
    running = loaded(manifest, gpus=reported)
    inputs, result, again = run(split_state(tmp_path, model_dir, [running]), tmp_path)
    assert again[placement_name("team-a/big")]["spec"]["gpus"] == spec["gpus"]  # stable: nothing to rewrite
    verdict = model_verdict("team-a/big", inputs, result, running)
    extra = dict(verdict.extra)
    assert verdict.phase == "Ready"
    assert extra["gpuSet"] == "n1/0,1"
    assert [g["residentBytes"] for g in extra["gpus"]] == [21_000, 20_500]


def test_a_single_gpu_node_writes_no_gpus_and_no_gpu_set(tmp_path: Path, make_model_dir: MakeDir) -> None:
    state = ClusterState(
        [llm("a", make_model_dir("a", params=20_000))], [profile("n1", 10**7)], [node("n1")], []
    )
    inputs, result, desired = run(state, tmp_path)
    assert "gpus" not in desired[placement_name("team-a/a")]["spec"]
    extra = dict(model_verdict("team-a/a", inputs, result, None).extra)
    assert "gpuSet" not in extra and "gpus" not in extra


def test_a_model_no_node_holds_is_refused_with_a_reason(tmp_path: Path, make_model_dir: MakeDir) -> None:
    model = llm("huge", make_model_dir("huge", params=20_000), offload={"maxFraction": 0.0})
    state = ClusterState([model], [two_gpu_profile("n1", 5_000)], [node("n1")], [])
    inputs, result, desired = run(state, tmp_path)
    assert desired == {}
    verdict = model_verdict("team-a/huge", inputs, result, None)
    assert (verdict.phase, verdict.reason) == ("Unschedulable", "ExceedsNodeCapacity")
    assert "never spans nodes" in verdict.message
