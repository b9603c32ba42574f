"""CRDs on the real API server: Established, apply-time validation with field-naming messages, columns."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from harness import GOOD, apply, get_json, kubectl


def with_spec(**changes: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        node = manifest["spec"]
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return manifest


DELETE = object()

# (id, manifest, text the error must contain: the field it names)
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("fraction-above-1", with_spec(offload__maxFraction=1.5), "spec.offload.maxFraction"),
    ("fraction-negative", with_spec(offload__maxFraction=-0.1), "spec.offload.maxFraction"),
    ("priority-negative", with_spec(priority=-1), "spec.priority"),
    ("priority-absurd", with_spec(priority=10**12), "spec.priority"),
    ("priority-not-int", with_spec(priority="high"), "spec.priority"),
    ("dtype-unknown", with_spec(dtype="int3"), "spec.dtype"),
    ("path-relative", with_spec(source__path="models/chat"), "spec.source.path"),
    ("path-dotdot", with_spec(source__path="/models/../etc/passwd"), "spec.source.path"),
    ("path-trailing-dotdot", with_spec(source__path="/models/.."), "spec.source.path"),
    ("path-dot-segment", with_spec(source__path="/models/./chat"), "spec.source.path"),
    ("path-double-slash", with_spec(source__path="/models//chat"), "spec.source.path"),
    ("path-trailing-slash", with_spec(source__path="/models/chat/"), "spec.source.path"),
    ("path-empty", with_spec(source__path=""), "spec.source.path"),
    ("path-control-char", with_spec(source__path="/models/a\nb"), "spec.source.path"),
    ("path-huge", with_spec(source__path="/" + "a" * 5000), "spec.source.path"),
    ("source-missing", with_spec(source=DELETE), "spec.source"),
    ("source-path-missing", with_spec(source__path=DELETE), "spec.source.path"),
    ("seq-zero", with_spec(maxSequenceLength=0), "spec.maxSequenceLength"),
    ("seq-negative", with_spec(maxSequenceLength=-4096), "spec.maxSequenceLength"),
    ("slo-zero", with_spec(slo__minDecodeTokensPerSecond=0), "spec.slo.minDecodeTokensPerSecond"),
    ("slo-negative", with_spec(slo__minDecodeTokensPerSecond=-5), "spec.slo.minDecodeTokensPerSecond"),
    ("slo-missing-rate", with_spec(slo={}), "spec.slo.minDecodeTokensPerSecond"),
    ("unknown-spec-field", with_spec(replicas=3), "spec.replicas"),
    ("unknown-nested-field", with_spec(source__url="https://hub/x"), "spec.source.url"),
    ("preemptible-not-bool", with_spec(preemptible="yes"), "spec.preemptible"),
    ("batch-zero", with_spec(maxBatchSize=0), "spec.maxBatchSize"),
    ("idle-zero", with_spec(idle={"afterSeconds": 0}), "spec.idle.afterSeconds"),
    ("spec-missing", {k: v for k, v in GOOD.items() if k != "spec"}, "spec"),
]


def test_crds_are_established(cluster: str) -> None:
    for plural in ("llmmodels", "modelplacements", "nodeprofiles", "sensitivityprofiles"):
        crd = get_json("crd", f"{plural}.residency.dev")
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", plural
    resources = kubectl("api-resources", "--api-group=residency.dev").stdout
    assert "llm" in resources and "LLMModel" in resources


def test_bad_manifest_table_is_large_enough() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize(("manifest", "field"), [(m, f) for _, m, f in BAD], ids=[i for i, _, _ in BAD])
def test_bad_manifest_is_rejected_naming_the_field(
    namespace: str, manifest: dict[str, Any], field: str
) -> None:
    result = apply(manifest, namespace, check=False)
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert field in result.stderr, result.stderr
    assert kubectl("get", "llm", "probe", "-n", namespace, check=False).returncode != 0


def test_good_manifest_is_accepted_with_defaults(namespace: str) -> None:
    minimal = {
        "apiVersion": GOOD["apiVersion"],
        "kind": "LLMModel",
        "metadata": {"name": "minimal"},
        "spec": {"source": {"path": "/models/x"}},
    }
    apply(minimal, namespace)
    spec = get_json("llm", "minimal", "-n", namespace)["spec"]
    assert spec["dtype"] == "bfloat16" and spec["priority"] == 0 and spec["maxSequenceLength"] == 4096


def test_status_is_a_subresource(namespace: str) -> None:
    manifest = copy.deepcopy(GOOD)
    manifest["status"] = {"phase": "Ready"}
    apply(manifest, namespace)
    assert get_json("llm", "probe", "-n", namespace).get("status", {}).get("phase") != "Ready"


def test_get_llm_columns(namespace: str) -> None:
    apply(GOOD, namespace)
    header = kubectl("get", "llm", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "NODE", "RESIDENT%", "TOK/S", "AGE"]
    wide = kubectl("get", "llm", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert {"PRIORITY", "SLO"} <= set(wide)
    assert "probe" in kubectl("get", "residency", "-n", namespace).stdout
