"""The Helm chart against the real control plane: install, upgrade, uninstall, RBAC, and a model that
reaches Ready with the operator and a worker authenticated as the chart's own ServiceAccounts."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from conftest import free_port, model_status, purge_models
from harness import REPO, SMALL_LIMITS, Process, apply, binaries_dir, get_json, kubectl, llm, wait_for

pytestmark = pytest.mark.e2e
CHART = REPO / "charts" / "residency"
CRDS = sorted(p.name.removesuffix(".yaml") for p in (REPO / "crds").glob("*.yaml"))


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(binaries_dir() / "helm"), *args], capture_output=True, text=True, timeout=180, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result


def adopt_crds(release: str, namespace: str) -> None:
    """The suite applies the CRDs itself; hand them to this release so that helm may own them."""
    for crd in CRDS:
        kubectl("label", "crd", crd, "--overwrite", "app.kubernetes.io/managed-by=Helm")
        kubectl(
            "annotate",
            "crd",
            crd,
            "--overwrite",
            f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={namespace}",
        )


def fresh_release(name_prefix: str, namespace_prefix: str) -> tuple[str, str]:
    """A new release name and its namespace, created."""
    suffix = uuid.uuid4().hex[:6]
    name, namespace = f"{name_prefix}-{suffix}", f"{namespace_prefix}-{suffix}"
    kubectl("create", "namespace", namespace)
    return name, namespace


@pytest.fixture
def release(cluster: str) -> Iterator[tuple[str, str]]:
    """A release name and its fresh namespace; uninstalled and deleted afterwards (CRDs are kept)."""
    name, namespace = fresh_release("res", "e2e-helm")
    yield name, namespace
    helm("uninstall", name, "-n", namespace, "--wait", check=False)
    kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def install(name: str, namespace: str, *sets: str) -> None:
    adopt_crds(name, namespace)
    args = ["upgrade", "--install", name, str(CHART), "-n", namespace]
    for item in sets:
        args += ["--set", item]
    helm(*args)


def can_i(namespace: str, service_account: str, verb: str, resource: str, *extra: str) -> bool:
    result = kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        f"--as=system:serviceaccount:{namespace}:{service_account}",
        *extra,
        check=False,
    )
    return result.stdout.strip() == "yes"


# (service account suffix, verb, resource, extra args, allowed)
RBAC_MATRIX: list[tuple[str, str, str, tuple[str, ...], bool]] = [
    ("operator", "watch", "llmmodels.residency.dev", ("-A",), True),
    ("operator", "patch", "llmmodels.residency.dev", ("-n", "team-a", "--subresource=status"), True),
    ("operator", "create", "modelplacements.residency.dev", (), True),
    ("operator", "delete", "modelplacements.residency.dev", (), True),
    ("operator", "list", "nodeprofiles.residency.dev", (), True),
    ("operator", "list", "sensitivityprofiles.residency.dev", ("-A",), True),
    (
        "operator",
        "patch",
        "sensitivityprofiles.residency.dev",
        ("-n", "team-a", "--subresource=status"),
        True,
    ),  # Used
    ("operator", "patch", "sensitivityprofiles.residency.dev", ("-n", "team-a"), False),  # never the curve
    ("operator", "list", "nodes", (), True),
    ("operator", "create", "events", ("-n", "team-a"), True),
    ("operator", "create", "leases.coordination.k8s.io", ("-n", "{ns}"), True),
    ("operator", "update", "leases.coordination.k8s.io/residency-operator", ("-n", "{ns}"), True),
    ("operator", "update", "leases.coordination.k8s.io/other", ("-n", "{ns}"), False),
    ("operator", "create", "leases.coordination.k8s.io", ("-n", "kube-system"), False),
    ("operator", "get", "secrets", ("-n", "{ns}"), False),
    ("operator", "delete", "llmmodels.residency.dev", ("-n", "team-a"), False),
    ("operator", "create", "pods", ("-n", "team-a"), False),
    ("operator", "patch", "nodes", (), False),
    ("worker", "list", "modelplacements.residency.dev", (), True),
    ("worker", "patch", "modelplacements.residency.dev", (), True),
    ("worker", "patch", "modelplacements.residency.dev", ("--subresource=status",), True),
    ("worker", "create", "nodeprofiles.residency.dev", (), True),
    ("worker", "patch", "nodeprofiles.residency.dev", ("--subresource=status",), True),
    ("worker", "get", "nodes", (), True),
    ("worker", "patch", "pods", ("-n", "{ns}"), True),
    ("worker", "get", "secrets", ("-n", "{ns}"), False),
    ("worker", "list", "secrets", ("-A",), False),
    ("worker", "delete", "modelplacements.residency.dev", (), False),
    ("worker", "create", "modelplacements.residency.dev", (), False),
    ("worker", "watch", "modelplacements.residency.dev", (), True),  # its node's, by label selector
    ("worker", "create", "llmmodels.residency.dev", ("-n", "team-a"), False),
    ("worker", "patch", "llmmodels.residency.dev", ("-n", "team-a"), False),
    ("worker", "list", "llmmodels.residency.dev", ("-A",), False),
    ("worker", "patch", "nodes", ("--subresource=status",), False),
    ("worker", "patch", "pods", ("-n", "team-a"), False),
    ("worker", "delete", "nodeprofiles.residency.dev", (), False),
    ("worker", "create", "sensitivityprofiles.residency.dev", ("-n", "team-a"), True),  # measured curves
    ("worker", "delete", "sensitivityprofiles.residency.dev", ("-n", "team-a"), False),
    ("router", "list", "llmmodels.residency.dev", ("-A",), True),
    ("router", "patch", "llmmodels.residency.dev", ("-n", "team-a"), False),  # it writes no model
    ("router", "create", "tokenreviews.authentication.k8s.io", (), True),
    ("router", "create", "subjectaccessreviews.authorization.k8s.io", (), True),
    ("router", "patch", "configmaps/residency-wake", ("-n", "{ns}"), True),
    ("router", "patch", "configmaps/other", ("-n", "{ns}"), False),
    ("router", "patch", "configmaps/residency-wake", ("-n", "team-a"), False),
    ("operator", "get", "configmaps/residency-wake", ("-n", "{ns}"), True),
    ("operator", "get", "configmaps/other", ("-n", "{ns}"), False),
    ("router", "delete", "llmmodels.residency.dev", ("-n", "team-a"), False),
    ("router", "list", "modelplacements.residency.dev", (), False),
    ("router", "get", "secrets", ("-n", "{ns}"), False),
]


def test_install_rbac_upgrade_uninstall_keeps_crds_and_models(release: tuple[str, str]) -> None:
    name, namespace = release
    install(name, namespace)
    manifest = helm("get", "manifest", name, "-n", namespace).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(manifest) if doc}
    assert {"CustomResourceDefinition", "Deployment", "DaemonSet", "ClusterRole", "Secret"} <= kinds
    deployment = get_json("deployment", f"{name}-residency-operator", "-n", namespace)
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["operator"]
    router = get_json("deployment", f"{name}-residency-router", "-n", namespace)["spec"]["template"]["spec"]
    assert router["serviceAccountName"] == f"{name}-residency-router"
    token = get_json("secret", f"{name}-residency-worker-token", "-n", namespace)["data"]["admin-token"]
    assert len(base64.b64decode(token)) == 48

    denied, wrong = [], []
    for account, verb, resource, extra, allowed in RBAC_MATRIX:
        args = tuple(a.replace("{ns}", namespace) for a in extra)
        if can_i(namespace, f"{name}-residency-{account}", verb, resource, *args) != allowed:
            wrong.append(f"{account} {verb} {resource} {' '.join(args)}: expected {allowed}")
        denied.append(allowed)
    assert wrong == [], "\n".join(wrong)
    assert True in denied and False in denied

    # upgrade with changed values: the generated token survives (lookup), the changes land
    install(name, namespace, "operator.replicas=2", "worker.gpuMemory=3GiB", "router.enabled=false")
    deployment = get_json("deployment", f"{name}-residency-operator", "-n", namespace)
    assert deployment["spec"]["replicas"] == 2
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["operator"]
    daemonset = get_json("daemonset", f"{name}-residency-worker", "-n", namespace)
    assert "--gpu-memory=3GiB" in daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    again = get_json("secret", f"{name}-residency-worker-token", "-n", namespace)["data"]["admin-token"]
    assert again == token
    assert kubectl("get", "clusterrole", f"{name}-residency-router", check=False).returncode != 0
    assert helm("history", name, "-n", namespace).stdout.count("\n") == 3  # header + 2 revisions

    # a user's model, then uninstall: crds.keep leaves the CRDs and the model
    users = f"{namespace}-users"
    kubectl("create", "namespace", users)
    try:
        apply(llm("kept", "/models/kept"), users)
        helm("uninstall", name, "-n", namespace, "--wait")
        for crd in CRDS:
            assert kubectl("get", "crd", crd, check=False).returncode == 0, f"{crd} was deleted"
        assert get_json("llmmodel", "kept", "-n", users)["metadata"]["name"] == "kept"
        for kind in ("clusterrole", "clusterrolebinding"):
            assert kubectl("get", kind, f"{name}-residency-operator", check=False).returncode != 0
        assert kubectl(
            "get", "deployment", f"{name}-residency-operator", "-n", namespace, check=False
        ).returncode
    finally:
        purge_models(users)
        kubectl("delete", "namespace", users, "--wait=false", check=False)


def chart_processes(
    namespace: str,
    node: str,
    models_root: Path,
    tmp_path: Path,
    operator_config: Path,
    worker_config: Path,
    worker_env: dict[str, str] | None = None,
    worker_args: tuple[str, ...] = (),
) -> tuple[Process, Process]:
    """The operator and a worker for ``node`` as local processes (not started), each authenticated with
    its kubeconfig (a chart ServiceAccount's token); the worker's admin token is ``tmp_path/admin.token``.
    The operator's Lease is in ``namespace``, as the chart deploys it."""
    operator = Process(
        "operator",
        ["operator", "--models-root", str(models_root)],
        tmp_path / "operator.log",
        env={
            "KUBECONFIG": str(operator_config),
            "RESIDENCY_NAMESPACE": namespace,
            "RESIDENCY_RESYNC_SECONDS": "5",
            "RESIDENCY_CAPACITY_REQUESTS": "false",
        },
    )
    worker = Process(
        "worker",
        [
            "worker",
            "--node",
            node,
            "--gpu-memory",
            "64MiB",
            "--models-root",
            str(models_root),
            "--port",
            str(free_port()),
            "--admin-token-file",
            str(tmp_path / "admin.token"),
            "--join",
            "--calibration-mib",
            "8",
            *worker_args,
        ],
        tmp_path / "worker.log",
        env={"KUBECONFIG": str(worker_config), **(worker_env or {})},
    )
    return operator, worker


def sa_kubeconfig(path: Path, cluster_kubeconfig: str, token: str) -> Path:
    """A kubeconfig that authenticates with a ServiceAccount token and the cluster's CA."""
    view = json.loads(
        kubectl(
            "config", "view", "--minify", "--raw", "-o", "json", "--kubeconfig", cluster_kubeconfig
        ).stdout
    )
    server = view["clusters"][0]["cluster"]["server"]
    # the cluster's CA as the admin kubeconfig names it (a file under the cluster's data dir, or inline)
    authority = {
        k: v
        for k, v in view["clusters"][0]["cluster"].items()
        if k in ("certificate-authority", "certificate-authority-data")
    }
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": server, **authority},
            }
        ],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("long_node_name", [False, True], ids=["node", "node-name-over-63"])
def test_model_ready_with_exactly_the_charts_permissions(
    release: tuple[str, str], cluster: str, models_root: Path, tmp_path: Path, long_node_name: bool
) -> None:
    name, namespace = release
    install(name, namespace, "crds.enabled=true", "admissionPolicy.enabled=true")
    node = f"helm-gpu-{uuid.uuid4().hex[:6]}"
    if long_node_name:
        # a valid node name longer than a label value: placements carry a cut, digested node label, and
        # the admission policy must check such a worker's writes by spec.nodeName instead
        node += "." + "x" * 60 + ".nodes.example.internal"
    operator_sa, worker_sa = f"{name}-residency-operator", f"{name}-residency-worker"
    kubectl(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    )
    # No kubelet: a Pod object bound to the node stands in for the DaemonSet's pod, so that the
    # worker's token is pod-bound and carries the node name the admission policy checks.
    pod = f"{name}-worker-{node}"
    bystander = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod},
        "spec": {
            "serviceAccountName": worker_sa,
            "nodeName": node,
            "automountServiceAccountToken": False,
            "containers": [{"name": "worker", "image": "residency:test"}],
        },
    }
    apply(bystander, namespace)
    operator_token = kubectl("create", "token", operator_sa, "-n", namespace, "--duration=1h").stdout.strip()
    worker_token = kubectl(
        "create",
        "token",
        worker_sa,
        "-n",
        namespace,
        "--duration=1h",
        "--bound-object-kind=Pod",
        f"--bound-object-name={pod}",
    ).stdout.strip()
    secret = get_json("secret", f"{name}-residency-worker-token", "-n", namespace)["data"]
    (tmp_path / "admin.token").write_text(base64.b64decode(secret["admin-token"]).decode())
    operator_config = sa_kubeconfig(tmp_path / "operator.kubeconfig", cluster, operator_token)
    worker_config = sa_kubeconfig(tmp_path / "worker.kubeconfig", cluster, worker_token)
    users = f"{namespace}-users"
    kubectl("create", "namespace", users)
    operator, worker = chart_processes(
        namespace,
        node,
        models_root,
        tmp_path,
        operator_config,
        worker_config,
        worker_env={"POD_NAME": pod, "POD_NAMESPACE": namespace},
    )
    try:
        operator.start()
        worker.start()
        wait_for(
            lambda: kubectl("get", "nodeprofile", node, check=False).returncode == 0, 90, what="NodeProfile"
        )
        apply(llm("chat", models_root / "tiny-llama", **SMALL_LIMITS), users)

        def ready() -> dict[str, object] | None:
            status = model_status(users, "chat")
            return status if status.get("phase") == "Ready" else None

        status = wait_for(ready, 120, what="Ready as the chart's ServiceAccounts")
        assert status["node"] == node
        lease = get_json("lease", "residency-operator", "-n", namespace)
        assert lease["spec"]["holderIdentity"]
        for log in (operator.log(), worker.log()):
            assert "Forbidden" not in log and " 403" not in log, log[-3000:]
        # the admission policy: this worker may not write another node's profile
        profile = get_json("nodeprofile", node)
        other = {
            "apiVersion": profile["apiVersion"],
            "kind": "NodeProfile",
            "metadata": {"name": "elsewhere"},
        }
        other["spec"] = profile["spec"]
        denied = kubectl(
            "--kubeconfig", str(worker_config), "create", "-f", "-", stdin=json.dumps(other), check=False
        )
        assert denied.returncode != 0 and "its own node" in denied.stderr, denied.stderr
        # and it may annotate only its own pod (it marks it for the autoscaler), not another one
        apply({**bystander, "metadata": {"name": f"{pod}-other"}}, namespace)
        # (a PATCH as the worker sends it: kubectl would GET first, which the worker may not)
        pods = client.CoreV1Api(new_client_from_config(str(worker_config)))
        annotation = {"metadata": {"annotations": {"example.com/poked": "y"}}}
        with pytest.raises(ApiException) as refused:
            pods.patch_namespaced_pod(f"{pod}-other", namespace, annotation)
        assert refused.value.status == 403 and "its own pod" in str(refused.value.body), refused.value.body
        pods.patch_namespaced_pod(pod, namespace, annotation)
    finally:
        worker.stop()
        operator.stop()
        purge_models(users)
        kubectl("delete", "namespace", users, "--wait=false", check=False)
        kubectl("delete", "node", node, "--wait=false", check=False)
        kubectl("delete", "nodeprofile", node, "--wait=false", check=False)
