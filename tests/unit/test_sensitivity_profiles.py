"""Hand-applied SensitivityProfiles: refused at apply when malformed (schema and its CEL rule), kept but
unused with a reason when the cluster cannot use them (operator/residency_operator/profiles.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from residency.api import SensitivityProfile, SensitivityProfileSpec
from residency.api.crdgen import crd_manifest
from residency_operator.handlers.sensitivity import check_profile
from residency_operator.profiles import newest_profiles, profile_use


def spec(points: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "modelPath": "/models/chat",
        "gpuType": "H100",
        "weightBytes": 10**9,
        "emulated": False,
        "points": points,
        **extra,
    }


def point(fraction: float, rate: float, mode: str = "stream", sequence: int = 512) -> dict[str, Any]:
    return {
        "residentFraction": fraction,
        "executionMode": mode,
        "sequenceLength": sequence,
        "decodeTokensPerSecond": rate,
    }


def test_a_curve_that_falls_as_residency_rises_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match=r"points: decodeTokensPerSecond 90 at residentFraction 0\.25"):
        SensitivityProfileSpec.model_validate(spec([point(1.0, 20.0), point(0.25, 90.0)]))
    # measurement noise within the tolerance passes, and so does the same wobble in another mode apart
    SensitivityProfileSpec.model_validate(spec([point(1.0, 40.0), point(0.9, 33.0), point(0.75, 43.0)]))
    SensitivityProfileSpec.model_validate(spec([point(1.0, 20.0), point(0.25, 90.0, mode="cpu")]))


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (point(1.5, 10.0), "residentFraction"),
        (point(-0.1, 10.0), "residentFraction"),
        (point(0.5, -3.0), "decodeTokensPerSecond"),
    ],
)
def test_fractions_outside_0_1_and_negative_rates_are_refused(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        SensitivityProfileSpec.model_validate(spec([bad]))
    assert f"points.0.{field}" in str(error.value)


def test_the_crd_carries_the_same_rules_and_the_columns_kubectl_shows() -> None:
    crd = crd_manifest(SensitivityProfile)
    version = crd["spec"]["versions"][0]
    points = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["points"]
    assert points["maxItems"] == 128
    rules = points["x-kubernetes-validations"]
    assert "residentFraction < q.residentFraction" in rules[0]["rule"]
    assert "decodeTokensPerSecond must not fall" in rules[0]["message"]
    item = points["items"]["properties"]
    assert (item["residentFraction"]["minimum"], item["residentFraction"]["maximum"]) == (0, 1)
    assert item["decodeTokensPerSecond"]["minimum"] == 0
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.modelPath"
    assert columns["GPU"] == ".spec.gpuType"
    assert columns["Points"] == ".status.pointCount"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert version["subresources"] == {"status": {}}


def body(
    name: str,
    namespace: str = "team-a",
    gpu: str = "H100",
    measured_at: str | None = None,
    path: str = "/models/chat",
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": "2026-12-01T00:00:00Z",
        },
        "spec": spec(
            [point(1.0, 40.0), point(0.5, 20.0)],
            gpuType=gpu,
            modelPath=path,
            **({"measuredAt": measured_at} if measured_at else {}),
        ),
    }


MODELS = [
    {"metadata": {"name": "chat", "namespace": "team-a"}, "spec": {"source": {"path": "/models/chat/"}}}
]


def test_a_profile_for_a_model_nobody_serves_is_kept_but_unused() -> None:
    profile = body("p", path="/models/other")
    use = profile_use(profile, [profile], MODELS, ["H100"])
    assert (use.used, use.reason, use.point_count) == (False, "UnknownModel", 2)
    assert "/models/other" in use.message
    # the same directory in another namespace is another tenant's model: still unknown here
    elsewhere = body("p", namespace="team-b")
    assert profile_use(elsewhere, [elsewhere], MODELS, ["H100"]).reason == "UnknownModel"


def test_an_unknown_gpu_type_names_the_known_ones() -> None:
    profile = body("p", gpu="H200")
    use = profile_use(profile, [profile], MODELS, ["H100", "emulated-cpu"])
    assert (use.used, use.reason) == (False, "UnknownGPUType")
    assert "H100, emulated-cpu" in use.message and "spec.gpuType" in use.message


def test_a_hand_applied_profile_wins_over_a_measured_one_only_if_newer() -> None:
    measured = body("measured", measured_at="2026-12-05T10:00:00Z")
    older_by_hand = body("by-hand", measured_at="2026-12-04T10:00:00Z")
    assert newest_profiles([measured, older_by_hand]) == [measured]
    assert profile_use(older_by_hand, [measured, older_by_hand], MODELS, ["H100"]).reason == "Superseded"
    assert profile_use(measured, [measured, older_by_hand], MODELS, ["H100"]).used
    newer_by_hand = body("by-hand", measured_at="2026-12-06T10:00:00Z")
    assert newest_profiles([measured, newer_by_hand]) == [newer_by_hand]
    assert profile_use(measured, [measured, newer_by_hand], MODELS, ["H100"]).reason == "Superseded"
    # another GPU type is another curve: both kept
    other_gpu = body("l4", gpu="L4")
    assert len(newest_profiles([measured, other_gpu])) == 2


class FakeKube:
    def __init__(self, profiles: list[dict[str, Any]]) -> None:
        self.profiles = profiles
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        self.custom = SimpleNamespace(patch_namespaced_custom_object_status=self._patch)

    def list_custom(self, plural: str) -> list[dict[str, Any]]:
        return {
            "sensitivityprofiles": self.profiles,
            "llmmodels": MODELS,
            "nodeprofiles": [{"spec": {"gpuType": "H100"}}],
        }[plural]

    def _patch(self, group: str, version: str, namespace: str, plural: str, name: str, patch: Any) -> None:
        assert plural == "sensitivityprofiles"
        self.patches.append(patch)
        for profile in self.profiles:
            if profile["metadata"]["name"] == name:
                profile["status"] = patch["status"]

    def post_event(self, body: dict[str, Any], event_type: str, reason: str, message: str, kind: str) -> None:
        assert kind == "SensitivityProfile"
        self.events.append((event_type, reason))


def test_the_handler_writes_the_condition_once_and_warns_when_unused() -> None:
    unused = body("stray", path="/models/gone")
    used = body("good")
    kube = FakeKube([unused, used])
    controller: Any = SimpleNamespace(kube=kube, cache=None)
    for _ in range(2):  # a second check of unchanged objects writes nothing
        check_profile(controller, unused)
        check_profile(controller, used)
    assert len(kube.patches) == 2
    assert kube.events == [("Warning", "UnknownModel")]
    (condition,) = unused["status"]["conditions"]
    assert (condition["type"], condition["status"], condition["reason"]) == ("Used", "False", "UnknownModel")
    assert used["status"]["conditions"][0]["status"] == "True" and used["status"]["pointCount"] == 2
