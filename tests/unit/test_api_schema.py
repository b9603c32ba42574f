"""The typed API and the generated CRDs: one source, structural, no drift, bad fields rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from residency.api import LLMModel, LLMModelSpec, ModelPlacement, NodeProfile, SensitivityProfile
from residency.api.crdgen import KINDS, crd_manifest, openapi_schema, render_crds

REPO = Path(__file__).resolve().parents[2]

GOOD_SPEC: dict[str, Any] = {
    "source": {"path": "/models/chat-small"},
    "dtype": "bfloat16",
    "priority": 100,
    "preemptible": True,
    "slo": {"minDecodeTokensPerSecond": 20},
    "offload": {"maxFraction": 0.75},
    "maxSequenceLength": 4096,
}


def test_crds_directory_matches_the_models() -> None:
    rendered = render_crds()
    on_disk = {p.name: p.read_text() for p in (REPO / "crds").glob("*.yaml")}
    assert on_disk == rendered, "crds/ drifted from the pydantic models: run `make crds`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found.extend(_walk(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_walk(value, f"{path}[{index}]"))
    return found


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind_name)
def test_schema_is_structural(kind: type) -> None:
    schema = openapi_schema(kind)
    for path, node in _walk(schema):
        if path.endswith("x-kubernetes-validations") or "/x-kubernetes-validations[" in path:
            continue
        assert "$ref" not in node, path
        assert "anyOf" not in node and "oneOf" not in node, path
        assert "title" not in node, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not isinstance(node.get("exclusiveMinimum"), int | float) or isinstance(
            node.get("exclusiveMinimum"), bool
        ), path
        if "properties" in node:
            assert node.get("type") == "object", path
    spec = schema["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec


def test_llmmodel_crd_names_columns_and_subresource() -> None:
    crd = crd_manifest(LLMModel)
    names = crd["spec"]["names"]
    assert (names["plural"], names["singular"], names["kind"]) == ("llmmodels", "llmmodel", "LLMModel")
    assert names["shortNames"] == ["llm"] and names["categories"] == ["residency"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    default_columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    wide_columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority") == 1]
    assert default_columns == ["Phase", "Node", "Resident%", "Tok/s", "Age"]
    assert {"Priority", "SLO"} <= set(wide_columns)


def test_round_trip_of_the_design_example() -> None:
    manifest = {
        "apiVersion": "residency.dev/v1alpha1",
        "kind": "LLMModel",
        "metadata": {"name": "chat-small", "namespace": "team-a"},
        "spec": GOOD_SPEC,
        "status": {
            "phase": "Ready",
            "node": "gpu-a-1",
            "residentFraction": 0.62,
            "predictedDecodeTokensPerSecond": 41.0,
            "observed": {"decodeTokensPerSecond": 39.5},
            "timings": {
                "loadSeconds": 2.1,
                "reloadSeconds": 0.31,
                "kvTransferSeconds": 0.012,
                "weightBytes": 1300000000,
                "kvBytes": 21000000,
                "hostToDeviceGBps": 48.7,
            },
            "conditions": [],
        },
    }
    model = LLMModel.model_validate(manifest)
    assert model.spec.slo is not None and model.spec.slo.min_decode_tokens_per_second == 20
    wire = model.to_wire()
    assert wire["spec"]["source"] == {"path": "/models/chat-small"}
    assert wire["status"]["timings"]["hostToDeviceGBps"] == 48.7
    assert LLMModel.model_validate(wire) == model


def test_every_spec_field_is_in_the_schema() -> None:
    spec_schema = openapi_schema(LLMModel)["properties"]["spec"]["properties"]
    wire = LLMModelSpec.model_validate(GOOD_SPEC).to_wire()
    assert set(wire) <= set(spec_schema)
    assert set(spec_schema) == {f.alias for f in LLMModelSpec.model_fields.values()}


@pytest.mark.parametrize(
    "change",
    [
        {"offload": {"maxFraction": 1.5}},
        {"offload": {"maxFraction": -0.1}},
        {"priority": -1},
        {"priority": 10**9},
        {"dtype": "int8"},
        {"maxSequenceLength": 0},
        {"maxSequenceLength": -4},
        {"slo": {"minDecodeTokensPerSecond": 0}},
        {"slo": {"minDecodeTokensPerSecond": -3}},
        {"unknownField": 1},
        {"source": {"path": "/m", "url": "http://x"}},
        {"source": {"path": ""}},
        {"maxBatchSize": 0},
        {"idle": {"afterSeconds": 0}},
        {"source": {"path": "/models/a\nb"}},
    ],
)
def test_bad_spec_fields_are_rejected_by_the_models(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LLMModelSpec.model_validate({**GOOD_SPEC, **change})


def test_missing_source_is_rejected() -> None:
    spec = {k: v for k, v in GOOD_SPEC.items() if k != "source"}
    with pytest.raises(ValidationError, match="source"):
        LLMModelSpec.model_validate(spec)


def test_path_rules_are_cel_in_the_crd() -> None:
    path_schema = openapi_schema(LLMModel)["properties"]["spec"]["properties"]["source"]["properties"]["path"]
    rules = [r["rule"] for r in path_schema["x-kubernetes-validations"]]
    assert any("startsWith('/')" in r for r in rules)
    assert any(".." in r or "[.][.]" in r for r in rules)


@pytest.mark.parametrize("kind", [ModelPlacement, NodeProfile, SensitivityProfile], ids=lambda k: k.kind_name)
def test_internal_kinds_are_cluster_or_namespaced_as_designed(kind: type) -> None:
    crd = crd_manifest(kind)
    assert crd["spec"]["group"] == "residency.dev"
    assert crd["metadata"]["name"] == f"{kind.plural}.residency.dev"  # type: ignore[attr-defined]
    yaml.safe_load(yaml.safe_dump(crd))
