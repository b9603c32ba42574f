"""The Helm chart: lint, render with default and non-default values, and a strict values schema."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "residency"
KUBE_VERSION = "1.34.4"


def _helm() -> Path:
    out = subprocess.run(
        [str(REPO / "hack" / "build-binaries.sh"), "path"], capture_output=True, text=True, check=False
    )
    path = Path(out.stdout.strip()) / "helm"
    if out.returncode != 0 or not path.exists():
        pytest.skip("helm binary not built (hack/build-binaries.sh)")
    return path


HELM = _helm()


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False)


def render(*sets: str, namespace: str = "residency") -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for item in sets:
        args += ["--set", item]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} rendered {len(matches)} times"
    return matches[0]


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_owner["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def rules(objects: list[dict[str, Any]], kind: str, name: str) -> set[tuple[str, str, str]]:
    role = find(objects, kind, name)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [""])
        for resource in rule.get("resources", rule.get("nonResourceURLs", []))
        for verb in rule["verbs"]
    }


def test_lint_strict() -> None:
    result = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_is_built_with_its_version_stamps() -> None:
    """The project's helm renders the chart offline as a released helm does: it knows its own version and
    the Kubernetes version it was built against (unstamped, it assumes v1.20 and refuses the chart's
    kubeVersion)."""
    version = helm("version", "--template", "{{.Version}}")
    assert version.stdout.strip().startswith("v3."), version.stdout + version.stderr
    result = helm("template", "rel", str(CHART), "-n", "residency")
    assert result.returncode == 0, result.stderr
    assert "kind: Deployment" in result.stdout


def test_chart_crds_are_the_generated_ones() -> None:
    source = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    copied = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert copied == source
    for name in source:
        assert (CHART / "files" / "crds" / name).read_text() == (REPO / "crds" / name).read_text(), (
            f"charts/residency/files/crds/{name} drifted from crds/; run: cp crds/*.yaml {CHART}/files/crds/"
        )


def test_defaults_render_every_component() -> None:
    objects = render()
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Deployment", "rel-residency-operator"),
        ("DaemonSet", "rel-residency-worker"),
        ("ServiceAccount", "rel-residency-operator"),
        ("ServiceAccount", "rel-residency-worker"),
        ("ServiceAccount", "rel-residency-router"),
        ("ClusterRole", "rel-residency-operator"),
        ("ClusterRole", "rel-residency-worker"),
        ("ClusterRole", "rel-residency-router"),
        ("Role", "rel-residency-operator-lease"),
        ("Role", "rel-residency-worker-lease"),
        ("RoleBinding", "rel-residency-worker-lease"),
        ("Service", "rel-residency-router"),
        ("Service", "rel-residency-operator-metrics"),
        ("PodDisruptionBudget", "rel-residency-operator"),
        ("ConfigMap", "rel-residency-dashboard"),
        ("Secret", "rel-residency-worker-token"),
        ("ValidatingAdmissionPolicy", "rel-residency-worker-own-node"),
        ("ValidatingAdmissionPolicy", "rel-residency-worker-own-pod"),
        ("Deployment", "rel-residency-router"),
    ]:
        assert expected in kinds
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {
        "llmmodels.residency.dev",
        "modelplacements.residency.dev",
        "nodeprofiles.residency.dev",
        "sensitivityprofiles.residency.dev",
    }
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    assert not any(o["kind"] == "ServiceMonitor" for o in objects)
    assert not any(o["kind"] == "PriorityClass" for o in objects)
    dashboard = find(objects, "ConfigMap", "rel-residency-dashboard")
    assert json.loads(dashboard["data"]["residency.json"])["panels"]


def test_crds_toggles() -> None:
    assert not any(o["kind"] == "CustomResourceDefinition" for o in render("crds.enabled=false"))
    crds = [o for o in render("crds.keep=false") if o["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 4
    assert all("helm.sh/resource-policy" not in (c["metadata"].get("annotations") or {}) for c in crds)


def _assert_hardened(pod_spec: dict[str, Any]) -> None:
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    for c in pod_spec["containers"]:
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert "privileged" not in ctx


def test_operator_and_router_run_apart_each_under_its_own_service_account() -> None:
    """The router faces clients over HTTP: it must not hold the operator's rights (placements, pods)."""
    objects = render()
    deployment = find(objects, "Deployment", "rel-residency-operator")
    spec = deployment["spec"]["template"]["spec"]
    _assert_hardened(spec)
    assert spec["serviceAccountName"] == "rel-residency-operator"
    assert [c["name"] for c in spec["containers"]] == ["operator"]
    operator = container(deployment, "operator")
    assert operator["args"][0] == "operator" and "--models-root=/models" in operator["args"]
    env = {e["name"]: e for e in operator["env"]}
    assert env["RESIDENCY_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["RESIDENCY_MODEL_ROOTS"]["value"] == "/models"
    assert env["RESIDENCY_CAPACITY_REQUESTS"]["value"] == "false"
    # capacity-request pods target the workers' GPU pool, as the autoscaler must scale it
    assert json.loads(env["RESIDENCY_CAPACITY_NODE_SELECTOR"]["value"]) == {"nvidia.com/gpu.present": "true"}
    tolerations = json.loads(env["RESIDENCY_CAPACITY_TOLERATIONS"]["value"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    router_deployment = find(objects, "Deployment", "rel-residency-router")
    router_spec = router_deployment["spec"]["template"]["spec"]
    _assert_hardened(router_spec)
    assert router_spec["serviceAccountName"] == "rel-residency-router"
    router = container(router_deployment, "router")
    assert router["args"][0] == "router"
    assert "--worker-token-file=/var/run/residency/worker/inference-token" in router["args"]
    service = find(objects, "Service", "rel-residency-router")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    labels = router_deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_worker_daemonset_defaults() -> None:
    objects = render()
    daemonset = find(objects, "DaemonSet", "rel-residency-worker")
    spec = daemonset["spec"]["template"]["spec"]
    _assert_hardened(spec)
    worker = container(daemonset, "worker")
    assert worker["args"][:3] == ["worker", "--node=$(NODE_NAME)", "--join"]
    assert "--admin-token-file=/var/run/residency/token/admin-token" in worker["args"]
    assert not any(a.startswith("--node-heartbeat") for a in worker["args"])
    assert "--background-profile" in worker["args"]  # curves of unprofiled models, measured in idle time
    assert "--lease-renew-seconds=10" in worker["args"]  # the kubelet's period: 1000 nodes, 100 writes/s
    off = container(
        find(render("worker.backgroundProfile=false"), "DaemonSet", "rel-residency-worker"), "worker"
    )
    assert "--no-background-profile" in off["args"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["limits"]["memory"] == worker["resources"]["requests"]["memory"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "runtimeClassName" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["hostPath"]["path"] == "/var/lib/residency/models"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["token"]["secret"]["secretName"] == "rel-residency-worker-token"


def test_worker_drives_the_gpus_it_requests_or_emulated_ones() -> None:
    def worker(*sets: str) -> dict[str, Any]:
        return container(find(render(*sets), "DaemonSet", "rel-residency-worker"), "worker")

    eight = worker("worker.gpu.count=8", "worker.gpuMemory=70GiB")
    assert "--gpus=all" in eight["args"] and "--gpu-memory=70GiB" in eight["args"]
    assert (
        eight["resources"]["requests"]["nvidia.com/gpu"]
        == 8
        == eight["resources"]["limits"]["nvidia.com/gpu"]
    )
    emulated = worker("worker.gpu.emulated=2", "worker.gpuMemory=64MiB\\,32MiB")
    assert "--emulated-gpus=2" in emulated["args"] and "--gpus=all" not in emulated["args"]
    assert "--gpu-memory=64MiB,32MiB" in emulated["args"]
    assert "nvidia.com/gpu" not in emulated["resources"]["requests"], "an emulated worker asks for no GPU"
    assert "/worker/gpu/emulated" in render_failure(["worker.gpu.emulated=-1"]).stderr


def test_worker_token_checksum_annotation_stays_a_string() -> None:
    """The pod template's checksum annotation is a hash prefix; one that happens to be all digits (this
    secret name's is 4229923921769153) or digits-e-digits must stay a string, or the API server refuses the
    DaemonSet (annotations are strings). An e2e release name once hit it: the install failed."""
    objects = render("worker.tokenSecret=worker-token-477")
    daemonset = find(objects, "DaemonSet", "rel-residency-worker")
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/token"] == "4229923921769153"


MATRIX = [
    pytest.param(
        ["worker.gpu.mode=runtimeClass", "worker.gpu.runtimeClassName=nvidia-cdi"], id="runtime-class"
    ),
    pytest.param(["worker.models.source=pvc", "worker.models.claimName=models"], id="pvc"),
    pytest.param(["operator.capacityRequests.enabled=true"], id="capacity-requests"),
    pytest.param(["metrics.serviceMonitor.enabled=true", "metrics.dashboard.enabled=false"], id="monitoring"),
    pytest.param(["worker.enabled=false", "router.enabled=false"], id="operator-only"),
    pytest.param(
        ["worker.tokenSecret=my-tokens", "router.auth=token", "router.clientTokenSecret=clients"],
        id="own-secrets",
    ),
    pytest.param(["admissionPolicy.enabled=false", "worker.protectFromScaleDown=false"], id="no-policy"),
    pytest.param(["fullnameOverride=res", "image.tag=dev", "operator.replicas=2"], id="names"),
]


@pytest.mark.parametrize("sets", MATRIX)
def test_matrix_renders_parseable_objects(sets: list[str]) -> None:
    objects = render(*sets)
    assert objects
    for o in objects:
        assert o["apiVersion"] and o["kind"] and o["metadata"]["name"]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert len(names) == len(objects), "duplicate objects"
    joined = ",".join(sets)
    daemonsets = [o for o in objects if o["kind"] == "DaemonSet"]
    if "runtimeClass" in joined:
        spec = daemonsets[0]["spec"]["template"]["spec"]
        assert spec["runtimeClassName"] == "nvidia-cdi"
        assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    if "source=pvc" in joined:
        volumes = {v["name"]: v for v in daemonsets[0]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    if "capacityRequests" in joined:
        assert ("PriorityClass", "residency-capacity-request") in names
        granted = rules(objects, "ClusterRole", "rel-residency-operator")
        assert ("", "pods", "create") in granted and ("", "pods", "delete") in granted
    if "serviceMonitor" in joined:
        assert {n for k, n in names if k == "ServiceMonitor"} == {
            "rel-residency-operator",
            "rel-residency-router",
            "rel-residency-worker",
        }
        assert ("ConfigMap", "rel-residency-dashboard") not in names
    if "worker.enabled=false" in joined:
        assert not daemonsets
        assert ("ClusterRole", "rel-residency-worker") not in names
        assert ("Secret", "rel-residency-worker-token") not in names
        deployment = find(objects, "Deployment", "rel-residency-operator")
        assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["operator"]
    if "tokenSecret=my-tokens" in joined:
        assert ("Secret", "rel-residency-worker-token") not in names
        spec = daemonsets[0]["spec"]["template"]["spec"]
        assert {v["name"]: v for v in spec["volumes"]}["token"]["secret"]["secretName"] == "my-tokens"
        router = container(find(objects, "Deployment", "rel-residency-router"), "router")
        assert "--token-file=/var/run/residency/client/token" in router["args"]
    if "admissionPolicy.enabled=false" in joined:
        assert ("ValidatingAdmissionPolicy", "rel-residency-worker-own-node") not in names
        assert ("Role", "rel-residency-worker-pods") not in names
        assert "--no-protect" in daemonsets[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    if "fullnameOverride" in joined:
        deployment = find(objects, "Deployment", "res-operator")
        assert deployment["spec"]["replicas"] == 2
        assert container(deployment, "operator")["image"].endswith(":dev")


def test_default_image_tag_is_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == "0.1.0"
    deployment = find(render(), "Deployment", "rel-residency-operator")
    assert container(deployment, "operator")["image"] == "ghcr.io/residency-dev/residency:0.1.0"


def test_rbac_is_least_privilege() -> None:
    objects = render()
    worker = rules(objects, "ClusterRole", "rel-residency-worker")
    assert worker == {
        ("residency.dev", "modelplacements", "list"),
        ("residency.dev", "modelplacements", "watch"),
        ("residency.dev", "modelplacements", "patch"),
        ("residency.dev", "modelplacements/status", "patch"),
        ("residency.dev", "nodeprofiles", "create"),
        ("residency.dev", "nodeprofiles", "patch"),
        ("residency.dev", "nodeprofiles/status", "patch"),
        ("residency.dev", "sensitivityprofiles", "list"),
        ("residency.dev", "sensitivityprofiles", "create"),
        ("residency.dev", "sensitivityprofiles", "patch"),
        ("", "nodes", "get"),
    }
    router = rules(objects, "ClusterRole", "rel-residency-router")
    assert router == {
        ("residency.dev", "llmmodels", "list"),
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
    }
    assert rules(objects, "ClusterRole", "rel-residency-inference") == {
        ("residency.dev", "llmmodels", "infer")
    }
    operator = rules(objects, "ClusterRole", "rel-residency-operator")
    assert ("", "secrets", "get") not in operator
    assert not [rule for rule in operator if rule[1] == "pods"], "capacity requests are off: no Pods at all"
    for kind in ("ClusterRole", "Role"):
        for role in (o for o in objects if o["kind"] == kind):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule.get("resources", []), role["metadata"][
                    "name"
                ]
    lease = find(objects, "Role", "rel-residency-operator-lease")
    assert lease["metadata"]["namespace"] == "residency"
    node_lease = rules(objects, "Role", "rel-residency-worker-lease")
    assert node_lease == {
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "update"),
    }
    assert find(objects, "Role", "rel-residency-worker-lease")["metadata"]["namespace"] == "residency"


# --- the values schema --------------------------------------------------------------------------


def _paths(values: Any, schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys present in one and not the other (free-form maps excepted)."""
    problems: list[str] = []
    if not isinstance(values, dict) or "properties" not in schema:
        return problems
    assert schema.get("additionalProperties") is False, f"{prefix or '<root>'} is not strict"
    for key in values:
        if key not in schema["properties"]:
            problems.append(f"{prefix}{key}: in values.yaml, missing from values.schema.json")
        else:
            problems += _paths(values[key], schema["properties"][key], f"{prefix}{key}.")
    for key in schema["properties"]:
        if key not in values:
            problems.append(f"{prefix}{key}: in values.schema.json, missing from values.yaml")
    return problems


def test_schema_and_values_do_not_drift() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _paths(values, schema) == []


def test_every_value_is_commented() -> None:
    """Each leaf value has a comment above it, or sits inside a commented block (e.g. resources)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented_blocks: list[tuple[int, bool]] = []  # (indent, documented) of enclosing keys
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        indent = len(line) - len(line.lstrip())
        while documented_blocks and documented_blocks[-1][0] >= indent:
            documented_blocks.pop()
        commented = lines[index - 1].strip().startswith("#")
        inherited = any(documented for _, documented in documented_blocks)
        if stripped.endswith(":"):
            documented_blocks.append((indent, commented or inherited))
            continue
        assert commented or inherited, f"values.yaml line {index + 1} has no comment: {line}"


def render_failure(sets: list[str]) -> subprocess.CompletedProcess[str]:
    """``helm template`` with these values, which must fail."""
    args = ["template", "rel", str(CHART), "--kube-version", KUBE_VERSION]
    for item in sets:
        args += ["--set", item]
    result = helm(*args)
    assert result.returncode != 0
    return result


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["bogus=1"], "additional properties 'bogus' not allowed"),
        (["operator.bogus=1"], "additional properties 'bogus' not allowed"),
        (["operator.replicas=two"], "/operator/replicas"),
        (["operator.replicas=-1"], "/operator/replicas"),
        (["operator.resources.limits.memory=-1Gi"], "/operator/resources/limits/memory"),
        (["worker.resources.requests.cpu=-2"], "/worker/resources/requests/cpu"),
        (["worker.gpu.mode=magic"], "/worker/gpu/mode"),
        (["worker.gpu.count=0"], "/worker/gpu/count"),
        (["worker.models.source=nfs"], "/worker/models/source"),
        (["modelRoots[0]=relative/path"], "/modelRoots/0"),
        (["crds.keep=maybe"], "/crds/keep"),
        (["router.port=70000"], "/router/port"),
        (["worker.gpuMemory=lots"], "/worker/gpuMemory"),
        (["worker.leaseRenewSeconds=0"], "/worker/leaseRenewSeconds"),
    ],
)
def test_schema_rejects_bad_values(sets: list[str], message: str) -> None:
    result = render_failure(sets)
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["worker.models.mountPath=/data"],
            'modelRoots entry "/models" is not under worker.models.mountPath',
        ),
        (["operator.healthPort=9090", "operator.metricsPort=9090"], "both 9090: give them different ports"),
        (
            ["worker.leaseRenewSeconds=30"],
            "operator.heartbeatGraceSeconds (60) is under three of worker.leaseRenewSeconds (30)",
        ),
    ],
)
def test_settings_the_schema_cannot_relate_fail_the_render(sets: list[str], message: str) -> None:
    """Models mounted where no model root looks, or two listeners on one port: refused at install."""
    assert message in render_failure(sets).stderr


def test_pvc_without_claim_name_is_a_clear_error() -> None:
    result = helm(
        "template", "rel", str(CHART), "--kube-version", KUBE_VERSION, "--set", "worker.models.source=pvc"
    )
    assert result.returncode != 0
    assert "worker.models.claimName is required" in result.stderr


def test_the_router_is_authenticated_by_default_and_only_router_and_operator_reach_workers() -> None:
    objects = render()
    router = container(find(objects, "Deployment", "rel-residency-router"), "router")
    assert "--auth=kubernetes" in router["args"] and "--verb=infer" in router["args"]
    assert not [a for a in router["args"] if a.startswith("--token-file")], "a shared client token by default"
    assert find(objects, "ConfigMap", "residency-wake")["metadata"]["namespace"] == "residency"
    policy = find(objects, "NetworkPolicy", "rel-residency-worker")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    (ingress,) = policy["spec"]["ingress"]
    assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in ingress["from"]} == {
        "router",
        "operator",
    }
    assert not any(o["kind"] == "NetworkPolicy" for o in render("networkPolicy.enabled=false"))
    assert (
        "clientTokenSecret" in render_failure(["router.auth=token"]).stderr
    )  # a shared token needs its Secret
    assert "/router/auth" in render_failure(["router.auth=none"]).stderr  # open is for tests only


def test_node_leases_are_served_in_their_own_priority_level_as_the_scale_harness_measures_them() -> None:
    """The workers' Lease renewals and the operator's leader Lease match a FlowSchema of their own (before
    the built-in service-accounts one), and only they: no other verb or resource of those accounts. The
    scale harness creates the same FlowSchema for its own ServiceAccounts."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from scale_identities import lease_flow_schema

    objects = render(namespace="residency-system")
    schema = find(objects, "FlowSchema", "rel-residency-leases")
    spec = schema["spec"]
    assert spec["priorityLevelConfiguration"]["name"] == "node-high"
    assert spec["matchingPrecedence"] < 9000  # the built-in service-accounts FlowSchema
    (rule,) = spec["rules"]
    assert {(s["serviceAccount"]["name"], s["serviceAccount"]["namespace"]) for s in rule["subjects"]} == {
        ("rel-residency-worker", "residency-system"),
        ("rel-residency-operator", "residency-system"),
    }
    assert rule["resourceRules"] == [
        {
            "verbs": ["get", "create", "update", "patch"],
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "namespaces": ["residency-system"],
        }
    ]
    harness = lease_flow_schema("scale", "scale")["spec"]
    assert {k: v for k, v in harness.items() if k != "rules"} == {
        k: v for k, v in spec.items() if k != "rules"
    }
    assert harness["rules"][0]["resourceRules"] == [{**rule["resourceRules"][0], "namespaces": ["scale"]}]
    off = render("apiPriority.enabled=false")
    assert not [o for o in off if o["kind"] == "FlowSchema"]
