"""What a worker publishes of a curve it measured: the SensitivityProfile object, and create-or-patch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from residency.api import SensitivityProfile
from residency_worker.engine.types import ProfilePoint
from residency_worker.profiler import MeasuredProfile
from residency_worker.publish import ProfilePublisher, profile_body, profile_name

MEASURED = MeasuredProfile(
    model="team-a/chat",
    path="/models/chat",
    dtype="bfloat16",
    gpu_type="NVIDIA H100 80GB HBM3",
    emulated=False,
    weight_bytes=10**9,
    points=tuple(ProfilePoint(f, f, "stream", 512, 1, 10.0 + 30 * f, 900.0, 3) for f in (1.0, 0.5, 0.0)),
    spread=0.07,
    trials=3,
    measured_at=datetime(2026, 12, 7, 3, 0, tzinfo=UTC),
    yields=2,
)


def test_the_body_is_a_valid_profile_owned_by_its_model() -> None:
    body = profile_body(MEASURED, "gpu-a-1", "uid-1")
    profile = SensitivityProfile.model_validate(body)
    assert profile.metadata.name == "chat-nvidia-h100-80gb-hbm3-bfloat16"
    assert profile.metadata.namespace == "team-a"
    assert profile.spec.measured_by == "gpu-a-1" and profile.spec.gpu_type == MEASURED.gpu_type
    assert profile.spec.measured_at == MEASURED.measured_at
    assert [p.trials for p in profile.spec.points] == [3, 3, 3]
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "residency.dev/v1alpha1", "kind": "LLMModel", "name": "chat", "uid": "uid-1"}
    ]
    assert body["metadata"]["annotations"]["residency.dev/spread"] == "0.070"
    assert "ownerReferences" not in profile_body(MEASURED, "gpu-a-1", None)["metadata"]


def test_a_long_name_is_hashed_to_fit() -> None:
    name = profile_name("ns/" + "m" * 250, "GPU", "bfloat16")
    assert len(name) <= 200 and name != profile_name("ns/" + "m" * 249 + "n", "GPU", "bfloat16")


class FakeCustom:
    def __init__(self, items: list[dict[str, Any]], conflict: bool = False, forbidden: bool = False) -> None:
        self.items, self.conflict, self.forbidden = items, conflict, forbidden
        self.calls: list[str] = []

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str) -> Any:
        if self.forbidden:
            raise ApiException(status=403, reason="Forbidden")
        return {"items": self.items}

    def create_namespaced_custom_object(self, *args: Any) -> None:
        self.calls.append("create")
        if self.conflict:
            raise ApiException(status=409, reason="AlreadyExists")

    def patch_namespaced_custom_object(self, *args: Any) -> None:
        self.calls.append("patch")


@pytest.mark.parametrize(("conflict", "calls"), [(False, ["create"]), (True, ["create", "patch"])])
def test_publish_creates_or_patches(conflict: bool, calls: list[str]) -> None:
    custom = FakeCustom([], conflict=conflict)
    ProfilePublisher(custom, "gpu-a-1").publish(MEASURED)  # type: ignore[arg-type]
    assert custom.calls == calls


def test_exists_matches_directory_gpu_and_dtype() -> None:
    item = {"spec": {"modelPath": "/models/chat/", "gpuType": "H100", "dtype": "bfloat16"}}
    publisher = ProfilePublisher(FakeCustom([item]), "n")  # type: ignore[arg-type]
    assert publisher.exists("team-a", "/models/chat", "H100", "bfloat16")
    assert not publisher.exists("team-a", "/models/chat", "L4", "bfloat16")
    assert not publisher.exists("team-a", "/models/chat", "H100", "float16")
    # a worker that may not read profiles does not measure: it could not publish either
    assert ProfilePublisher(FakeCustom([], forbidden=True), "n").exists("team-a", "/m", "H100", "bf16")  # type: ignore[arg-type]
