"""A node with two emulated GPUs (issue 30): a model too big for either GPU alone becomes Ready split by
layers across both, answers through the router, and keeps its text across a preemption and resume."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import NodePool
from harness import SMALL_LIMITS, Process, apply, kubectl, wait_for
from residency.api import LLMModelSpec
from residency_operator.planner.options import gpu_bytes_needed
from residency_operator.state import OperatorKnobs, demand
from residency_operator.validation import validate_model
from test_e2e_serving import complete, llm, phase


def whole_need_bytes(directory: Path, models_root: Path) -> int:
    """GPU bytes the planner counts for the model wholly resident on one GPU (the operator's own sizing)."""
    knobs = OperatorKnobs(allowed_model_roots=[models_root])
    spec = LLMModelSpec.model_validate(
        {"source": {"path": str(directory)}, **SMALL_LIMITS, "offload": {"maxFraction": 0.0}}
    ).model_dump(by_alias=True, exclude_none=True)
    info = validate_model(spec, knobs.allowed_model_roots, knobs.remote_code_roots)
    assert not hasattr(info, "reason"), info
    body = {"metadata": {"name": "m", "namespace": "ns"}, "spec": spec}
    return gpu_bytes_needed(demand("ns/m", body, info, knobs), 1.0, "stream")  # type: ignore[arg-type]


def test_a_model_too_big_for_one_gpu_is_split_across_two_answers_and_survives_preemption(
    namespace: str, operator: Process, gpu_nodes: NodePool, router: str, models_root: Path
) -> None:
    model_dir = models_root / "tiny-deep"  # 16 layers: a split can cut it fine
    need = whole_need_bytes(model_dir, models_root)
    per_gpu = int(need * 0.75)  # neither GPU holds it whole; the two together do
    node = gpu_nodes.add("gpu-split-1", str(per_gpu), extra_args=("--emulated-gpus", "2"))
    profile = wait_for(node.profile, 60, what="NodeProfile")
    assert profile["spec"]["gpuCount"] == 2 and len(profile["spec"]["gpus"]) == 2
    assert all(g["memoryBytes"] == per_gpu for g in profile["spec"]["gpus"])

    # no offload allowed: the model must be wholly on GPUs, and no single GPU holds it
    apply(llm("big", model_dir, priority=1, offload={"maxFraction": 0.0}), namespace)
    try:
        status = wait_for(lambda: phase(namespace, "big", "Ready"), 180, what="big Ready split")
    except AssertionError:
        print(kubectl("get", "llm", "-n", namespace, "-o", "yaml").stdout[-3000:])
        print(kubectl("get", "mpl", "-o", "yaml").stdout[-3000:])
        print(kubectl("get", "nodeprofile", "-o", "yaml").stdout[-3000:])
        raise
    assert status["node"] == "gpu-split-1" and status["residentPercent"] == 100
    assert status["gpuSet"] in ("gpu-split-1/0,1", "gpu-split-1/1,0"), status.get("gpuSet")
    per_gpu_status = status["gpus"]
    assert len(per_gpu_status) == 2
    assert all(g["residentBytes"] > 0 and 0 < g["residentFraction"] < 1 for g in per_gpu_status), status
    assert all(g["residentBytes"] <= per_gpu for g in per_gpu_status), (per_gpu_status, per_gpu)
    assert abs(sum(g["residentFraction"] for g in per_gpu_status) - 1.0) < 0.01
    wide = kubectl("get", "llm", "big", "-n", namespace, "-o", "wide").stdout
    assert "GPUS" in wide.splitlines()[0] and status["gpuSet"] in wide, wide
    placement = kubectl("get", "modelplacements", "-o", "json").stdout
    assert '"gpus"' in placement

    prompts = [f"Split request {i} asks the model" for i in range(4)]
    baseline = {}
    for prompt in prompts:
        response = complete(router, f"{namespace}/big", prompt, 20)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] == 20
        baseline[prompt] = body["choices"][0]["text"]

    # preempt the split model (a higher priority model needs the node's GPUs), then resume it: the text of
    # every request, in flight across both, is what it was before
    results: dict[str, list[str]] = {p: [] for p in prompts}
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            for prompt in prompts:
                response = complete(router, f"{namespace}/big", prompt, 20)
                if response.status_code == 200:
                    results[prompt].append(response.json()["choices"][0]["text"])
                else:
                    failures.append(f"{response.status_code} {response.text}")

    thread = threading.Thread(target=client)
    thread.start()
    try:
        apply(llm("high", model_dir, priority=100, offload={"maxFraction": 0.0}), namespace)
        wait_for(lambda: phase(namespace, "big", "Preempted"), 180, what="big Preempted")
        wait_for(lambda: phase(namespace, "high", "Ready"), 180, what="high Ready")
        kubectl("delete", "llm", "high", "-n", namespace, "--timeout=120s")
        resumed = wait_for(lambda: phase(namespace, "big", "Ready"), 180, what="big resumed")
        assert resumed["gpuSet"].startswith("gpu-split-1/") and len(resumed["gpus"]) == 2
    finally:
        stop.set()
        thread.join(timeout=240)
    assert not failures, failures[:3]
    for prompt, texts in results.items():
        assert texts and all(text == baseline[prompt] for text in texts), prompt
