"""`helm uninstall` with crds.keep=false against the real control plane: the CRDs and every model go, and
nothing is left Terminating, whether the operator is still running (it unloads and finalizes each model)
or gone (the hook removes residency's finalizers itself).

helm deletes the operator, the workers, their RBAC and the CRDs in one go; without the chart's pre-delete
hook the models' finalizers would stay (the operator's token dies with its ServiceAccount) and the CRDs
would hang in Terminating. There is no kubelet here: the test runs the hook Job's pod itself, from the
Job's own command and args, authenticated as the hook's ServiceAccount with a token bound to that pod, and
reports the pod's exit as its phase (what a kubelet does), so that the Job completes and helm goes on.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import purge_models
from harness import REPO, SMALL_LIMITS, Process, apply, binaries_dir, get_json, kubectl, llm, wait_for
from test_e2e_helm import CRDS, chart_processes, fresh_release, helm, install, sa_kubeconfig

pytestmark = pytest.mark.e2e
HOOK_TIMEOUT = 60  # crds.uninstallTimeoutSeconds for these tests
UNINSTALL_BOUND = 150.0  # seconds: the hook's wait, its settle, and helm deleting the rest


def restore_crds() -> None:
    """The session's other tests need the CRDs back once an uninstall deleted them."""

    def terminating(crd: str) -> bool:
        found = kubectl("get", "crd", crd, "-o", "json", check=False)
        return found.returncode == 0 and bool(json.loads(found.stdout)["metadata"].get("deletionTimestamp"))

    wait_for(lambda: not any(terminating(crd) for crd in CRDS), 120, what="no CRD left Terminating")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    for crd in CRDS:
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    wait_for(lambda: kubectl("get", "llm", "-A", check=False).returncode == 0, 30, what="llm discovery")


@pytest.fixture
def doomed_release(cluster: str) -> Iterator[tuple[str, str]]:
    """A release installed with crds.keep=false; whatever a failed test left is unstuck afterwards."""
    name, namespace = fresh_release("unin", "e2e-unin")
    yield name, namespace
    # a test that failed half way: no hook to run (no kubelet), so unstick by hand, then uninstall
    for ns in kubectl(
        "get", "llm", "-A", "-o", "jsonpath={.items[*].metadata.namespace}", check=False
    ).stdout.split():
        purge_models(ns)
    for placement in kubectl("get", "modelplacements", "-o", "name", check=False).stdout.split():
        kubectl("patch", placement, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
    subprocess.run(
        [str(binaries_dir() / "helm"), "uninstall", name, "-n", namespace, "--no-hooks", "--wait"],
        capture_output=True,
        timeout=180,
        check=False,
    )
    for kind in ("job", "serviceaccount", "role", "rolebinding"):
        kubectl(
            "delete", kind, f"{name}-residency-uninstall", "-n", namespace, "--ignore-not-found", check=False
        )
    for kind in ("clusterrole", "clusterrolebinding"):
        kubectl("delete", kind, f"{name}-residency-uninstall", "--ignore-not-found", check=False)
    kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    restore_crds()


class HookKubelet:
    """Runs the pre-delete hook Job's pod as a kubelet would, while `helm uninstall` waits for the Job."""

    def __init__(self, release: str, namespace: str, cluster: str, workdir: Path) -> None:
        self.job = f"{release}-residency-uninstall"
        self.namespace = namespace
        self.cluster = cluster
        self.workdir = workdir
        self.returncode: int | None = None
        self.output = ""
        self.pod_spec: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HookKubelet:
        self.thread.start()
        return self

    def _pod(self) -> dict[str, Any] | None:
        pods = get_json("pods", "-n", self.namespace, "-l", f"job-name={self.job}")["items"]
        return pods[0] if pods else None

    def _run(self) -> None:
        try:
            pod = wait_for(self._pod, 60, what=f"the pod of Job {self.job}")
            self.pod_spec = pod["spec"]
            (container,) = pod["spec"]["containers"]
            token = kubectl(
                "create",
                "token",
                pod["spec"]["serviceAccountName"],
                "-n",
                self.namespace,
                "--duration=1h",
                "--bound-object-kind=Pod",
                f"--bound-object-name={pod['metadata']['name']}",
            ).stdout.strip()
            config = sa_kubeconfig(self.workdir / "hook.kubeconfig", self.cluster, token)
            command = list(container["command"]) + list(container.get("args") or [])
            assert command[0] == "python", command  # the image's interpreter: here, this venv's
            result = subprocess.run(
                [sys.executable, *command[1:]],
                capture_output=True,
                text=True,
                timeout=HOOK_TIMEOUT + 60,
                env={"KUBECONFIG": str(config), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
                check=False,
            )
            self.returncode, self.output = result.returncode, result.stdout + result.stderr
            phase = "Succeeded" if result.returncode == 0 else "Failed"
            kubectl(
                "patch",
                "pod",
                pod["metadata"]["name"],
                "-n",
                self.namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                json.dumps({"status": {"phase": phase}}),
            )
        except BaseException as exc:  # reported by the test
            self.error = exc

    def join(self) -> None:
        self.thread.join(timeout=HOOK_TIMEOUT + 120)
        if self.error is not None:
            raise self.error


def start_operator_and_worker(
    name: str, namespace: str, cluster: str, models_root: Path, tmp_path: Path, node: str
) -> tuple[Process, Process]:
    """The operator and a worker as local processes, each authenticated as the chart's ServiceAccount."""
    operator_token = kubectl(
        "create", "token", f"{name}-residency-operator", "-n", namespace, "--duration=1h"
    ).stdout.strip()
    worker_token = kubectl(
        "create", "token", f"{name}-residency-worker", "-n", namespace, "--duration=1h"
    ).stdout.strip()
    secret = get_json("secret", f"{name}-residency-worker-token", "-n", namespace)["data"]
    (tmp_path / "admin.token").write_text(base64.b64decode(secret["admin-token"]).decode())
    operator, worker = chart_processes(
        namespace,
        node,
        models_root,
        tmp_path,
        sa_kubeconfig(tmp_path / "operator.kubeconfig", cluster, operator_token),
        sa_kubeconfig(tmp_path / "worker.kubeconfig", cluster, worker_token),
        worker_args=("--no-protect",),
    )
    return operator.start(), worker.start()


def kept_by_release(name: str, namespace: str) -> set[str]:
    """CRDs that `helm uninstall` will keep: helm reads helm.sh/resource-policy from the release's
    manifest, not from the live objects (which may still carry an earlier release's annotation)."""
    manifest = yaml.safe_load_all(helm("get", "manifest", name, "-n", namespace).stdout)
    return {
        doc["metadata"]["name"]
        for doc in manifest
        if doc
        and doc["kind"] == "CustomResourceDefinition"
        and (doc["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep"
    }


def gone(kind: str, *args: str) -> bool:
    return kubectl("get", kind, *args, check=False).returncode != 0


@pytest.mark.parametrize(
    ("operator_running", "kept_first"),
    [(True, False), (False, False), (True, True)],
    ids=["operator-finalizes", "operator-gone", "keep-switched-off-before-uninstall"],
)
def test_uninstall_without_keep_deletes_crds_and_models_cleanly(
    doomed_release: tuple[str, str],
    cluster: str,
    models_root: Path,
    tmp_path: Path,
    operator_running: bool,
    kept_first: bool,
) -> None:
    name, namespace = doomed_release
    sets = [
        f"crds.uninstallTimeoutSeconds={HOOK_TIMEOUT}",
        "admissionPolicy.enabled=false",  # the worker runs with a plain SA token (no pod to bind it to)
        "worker.protectFromScaleDown=false",
    ]
    if kept_first:
        # installed with the default crds.keep=true, then switched as values.yaml and NOTES.txt advise
        install(name, namespace, *sets)
        assert kept_by_release(name, namespace) == set(CRDS)
    install(name, namespace, *sets, "crds.keep=false")
    assert kept_by_release(name, namespace) == set()
    node = f"unin-gpu-{uuid.uuid4().hex[:6]}"
    kubectl(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    )
    users = f"{namespace}-users"
    kubectl("create", "namespace", users)
    operator, worker = start_operator_and_worker(name, namespace, cluster, models_root, tmp_path, node)
    helm_run: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: not gone("nodeprofile", node), 90, what="NodeProfile")
        apply(llm("chat", models_root / "tiny-llama", **SMALL_LIMITS), users)
        wait_for(
            lambda: (get_json("llmmodel", "chat", "-n", users).get("status") or {}).get("phase") == "Ready",
            120,
            what="Ready",
        )
        model = get_json("llmmodel", "chat", "-n", users)
        assert "kopf.zalando.org/KopfFinalizerMarker" in model["metadata"]["finalizers"]
        placements = get_json("modelplacements")["items"]
        assert [p["metadata"]["finalizers"] for p in placements] == [["residency.dev/unload"]]
        if not operator_running:
            # crashed (no clean Lease hand-back) and its node gone: nobody will finalize anything
            operator.stop(signal.SIGKILL)
            worker.stop(signal.SIGKILL)

        started = time.monotonic()
        kubelet = HookKubelet(name, namespace, cluster, tmp_path).start()
        helm_run = subprocess.Popen(
            [str(binaries_dir() / "helm"), "uninstall", name, "-n", namespace, "--wait", "--timeout", "4m"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        kubelet.join()
        out, _ = helm_run.communicate(timeout=UNINSTALL_BOUND)
        seconds = time.monotonic() - started
        assert helm_run.returncode == 0, f"helm uninstall: {out}\nhook:\n{kubelet.output}"
        assert kubelet.returncode == 0, kubelet.output
        assert seconds < UNINSTALL_BOUND, seconds

        # everything is gone, nothing Terminating: the CRDs, the models, the placements, the hook's objects
        for crd in CRDS:
            assert gone("crd", crd), f"{crd} is still there: {get_json('crd', crd)['metadata']}"
        assert gone("deployment", f"{name}-residency-operator", "-n", namespace)
        for kind in ("clusterrole", "clusterrolebinding"):
            assert gone(kind, f"{name}-residency-uninstall"), kind
            assert gone(kind, f"{name}-residency-operator"), kind
        for kind in ("job", "serviceaccount", "role", "rolebinding"):
            assert gone(kind, f"{name}-residency-uninstall", "-n", namespace), kind

        # the hook ran as its Job says, with only its own rights
        assert kubelet.pod_spec["serviceAccountName"] == f"{name}-residency-uninstall"
        assert "Forbidden" not in kubelet.output and " 403" not in kubelet.output, kubelet.output
        if operator_running:
            # the orderly path: the worker unloaded, the operator removed its own finalizer
            assert "finalizers were removed" not in kubelet.output, kubelet.output
            assert "the operator finalized every model" in kubelet.output, kubelet.output
            assert any(f"unloaded {users}/chat from {node}" in line for line in worker.log().splitlines()), (
                worker.log()[-2000:]
            )
        else:
            assert "no operator holds the residency-operator Lease" in kubelet.output, kubelet.output
            assert "llmmodel/" + users + "/chat" in kubelet.output, kubelet.output
            assert seconds < HOOK_TIMEOUT, "waited the full timeout for an operator that had crashed"
    finally:
        if helm_run is not None and helm_run.poll() is None:
            helm_run.kill()
            helm_run.communicate(timeout=30)
        worker.stop()
        operator.stop()
        purge_models(users)
        kubectl("delete", "namespace", users, "--wait=false", check=False)
        kubectl("delete", "node", node, "--wait=false", check=False)
        kubectl("delete", "nodeprofile", node, "--wait=false", check=False)
