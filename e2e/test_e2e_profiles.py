"""SensitivityProfiles against the real API server: a worker publishes one without any manual step and the
next placement uses it; malformed hand-applied ones are refused at apply; unusable ones are kept, unused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import NodePool, model_status
from harness import SMALL_LIMITS, Process, apply, get_json, kubectl, llm, wait_for


def profile(name: str, path: str, gpu: str, points: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "apiVersion": "residency.dev/v1alpha1",
        "kind": "SensitivityProfile",
        "metadata": {"name": name},
        "spec": {
            "modelPath": path,
            "gpuType": gpu,
            "weightBytes": 1000,
            "emulated": True,
            "points": [
                {
                    "residentFraction": f,
                    "executionMode": "stream",
                    "sequenceLength": 64,
                    "decodeTokensPerSecond": r,
                }
                for f, r in points
            ],
        },
    }


def test_a_worker_publishes_a_profile_and_the_next_placement_uses_it(
    namespace: str, operator: Process, gpu_nodes: NodePool, models_root: Path
) -> None:
    node = gpu_nodes.add("prof-a", "64Mi", extra_args=("--background-profile",))
    path = str(models_root / "tiny-llama")
    apply(llm("chat", path, slo={"minDecodeTokensPerSecond": 1}, **SMALL_LIMITS), namespace)
    wait_for(lambda: model_status(namespace, "chat").get("phase") == "Ready", 120, what="chat Ready")
    # before any profile exists (status read first, then the listing) the prediction is the roofline's
    source = model_status(namespace, "chat").get("predictionSource")
    if not (get_json("sensitivityprofiles", "-n", namespace).get("items") or []):
        assert source == "roofline"

    def published() -> dict[str, Any] | None:
        items = get_json("sensitivityprofiles", "-n", namespace).get("items") or []
        return items[0] if items else None

    measured = wait_for(published, 300, interval=2, what="a published SensitivityProfile")
    spec = measured["spec"]
    assert spec["measuredBy"] == node.name and spec["measuredAt"]
    assert spec["gpuType"] == node.profile()["spec"]["gpuType"]  # type: ignore[index]
    assert {p["executionMode"] for p in spec["points"]} == {"stream", "cpu"}
    assert all(p["trials"] >= 3 for p in spec["points"])
    assert measured["metadata"]["ownerReferences"][0]["kind"] == "LLMModel"
    # the planner re-plans with the curve: status says where its prediction came from
    wait_for(
        lambda: model_status(namespace, "chat").get("predictionSource") == "profile",
        120,
        what="source profile",
    )
    wide = kubectl("get", "llm", "chat", "-n", namespace, "-o", "wide").stdout
    assert "PREDICTED" in wide.splitlines()[0] and "profile" in wide.splitlines()[1]
    listing = wait_for(
        lambda: (out := kubectl("get", "sensitivityprofiles", "-n", namespace).stdout)
        and "True" in out
        and out,
        60,
        what="profile Used=True",
    )
    print(f"\n$ kubectl get llm -o wide\n{wide}\n$ kubectl get sensitivityprofiles\n{listing}")
    header, row = listing.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "MODEL", "GPU", "POINTS", "USED"]
    assert path in row and str(len(spec["points"])) in row.split()


def test_malformed_profiles_are_refused_and_unusable_ones_kept_unused(
    namespace: str, operator: Process, models_root: Path
) -> None:
    path = str(models_root / "tiny-llama")
    falling = apply(
        profile("falling", path, "emulated-cpu", [(1.0, 10.0), (0.25, 80.0)]), namespace, check=False
    )
    assert falling.returncode != 0
    assert "spec.points" in falling.stderr and "must not fall as residentFraction rises" in falling.stderr
    outside = apply(profile("outside", path, "emulated-cpu", [(1.5, 10.0)]), namespace, check=False)
    assert outside.returncode != 0 and "residentFraction" in outside.stderr
    negative = apply(profile("negative", path, "emulated-cpu", [(0.5, -1.0)]), namespace, check=False)
    assert negative.returncode != 0 and "decodeTokensPerSecond" in negative.stderr

    apply(profile("stray", "/models/nobody-serves-this", "emulated-cpu", [(1.0, 10.0)]), namespace)

    def used_condition() -> dict[str, Any] | None:
        status = get_json("sensitivityprofile", "stray", "-n", namespace).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == "Used"), None)

    condition = wait_for(used_condition, 60, what="Used condition")
    assert condition["status"] == "False" and condition["reason"] == "UnknownModel"
    assert "/models/nobody-serves-this" in condition["message"]
    wait_for(
        lambda: "UnknownModel"
        in kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=stray").stdout,
        30,
        what="an UnknownModel Event",
    )
    assert kubectl("get", "sensitivityprofile", "stray", "-n", namespace, check=False).returncode == 0  # kept
