"""The pre-delete hook of `helm uninstall` with crds.keep=false (residency_operator.handlers.uninstall):
the operator finalizes the models while it runs; otherwise the hook removes residency's finalizers itself,
and never another controller's. Plus the chart's hook objects and their RBAC."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from residency_operator.handlers import uninstall
from residency_operator.handlers.uninstall import (
    KOPF_FINALIZER,
    MODELS,
    PLACEMENTS,
    UNLOAD_FINALIZER,
    finalize_all,
)
from residency_operator.kube import lease_held

FOREIGN = "example.com/backup"


class FakeCluster:
    """Models and placements in memory, with the API server's finalizer semantics; `operator` plays the
    operator: called on every poll, it may finalize what it likes."""

    def __init__(self, alive: bool = True) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.alive = alive
        self.calls: list[tuple[str, str, str]] = []
        self.conflicts = 0
        self.rv = 0

    def add(
        self, plural: str, name: str, namespace: str | None = None, finalizers: list[str] | None = None
    ) -> None:
        self.rv += 1
        meta: dict[str, Any] = {"name": name, "resourceVersion": str(self.rv), "finalizers": finalizers or []}
        if namespace:
            meta["namespace"] = namespace
        self.objects[(plural, namespace, name)] = {"metadata": meta}

    def _get(self, plural: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        return self.objects.get((plural, meta.get("namespace"), meta["name"]))

    def _maybe_gone(self, plural: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and not meta["finalizers"]:
            del self.objects[(plural, meta.get("namespace"), meta["name"])]

    def items(self, plural: str) -> list[dict[str, Any]]:
        import copy

        return [copy.deepcopy(o) for (p, _, _), o in sorted(self.objects.items(), key=str) if p == plural]

    def delete(self, plural: str, meta: dict[str, Any]) -> None:
        self.calls.append(("delete", plural, meta["name"]))
        obj = self._get(plural, meta)
        if obj is None:
            return
        obj["metadata"].setdefault("deletionTimestamp", "now")
        self._maybe_gone(plural, obj)

    def set_finalizers(self, plural: str, meta: dict[str, Any], finalizers: list[str]) -> None:
        self.calls.append(("finalizers", plural, meta["name"]))
        obj = self._get(plural, meta)
        if obj is None:
            raise ApiException(status=404)
        if self.conflicts:
            self.conflicts -= 1
            raise ApiException(status=409)
        if obj["metadata"]["resourceVersion"] != meta["resourceVersion"]:
            raise ApiException(status=409)
        obj["metadata"]["finalizers"] = list(finalizers)
        self._maybe_gone(plural, obj)

    def operator_alive(self) -> bool:
        return self.alive

    def finalize(self, plural: str, name: str, namespace: str | None = None) -> None:
        """What the operator (a model) or a worker (a placement) does."""
        obj = self.objects[(plural, namespace, name)]
        obj["metadata"]["finalizers"] = [
            f for f in obj["metadata"]["finalizers"] if f not in (KOPF_FINALIZER, UNLOAD_FINALIZER)
        ]
        self._maybe_gone(plural, obj)


class Clock:
    def __init__(self, on_sleep: Any = None) -> None:
        self.now = 0.0
        self.on_sleep = on_sleep
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(self.sleeps)


def populated(alive: bool = True) -> FakeCluster:
    cluster = FakeCluster(alive)
    cluster.add(MODELS, "chat", "team-a", [KOPF_FINALIZER])
    cluster.add(MODELS, "code", "team-b", [KOPF_FINALIZER])
    cluster.add(PLACEMENTS, "team-a.chat", None, [UNLOAD_FINALIZER])
    return cluster


def test_a_running_operator_finalizes_every_model_and_nothing_is_forced() -> None:
    cluster = populated()

    def operator(step: int) -> None:  # unloads, then drops its finalizers, a poll at a time
        if step == 1:
            cluster.objects[(PLACEMENTS, None, "team-a.chat")]["metadata"]["deletionTimestamp"] = "now"
        if step == 2:
            cluster.finalize(PLACEMENTS, "team-a.chat")
        if step == 3:
            cluster.finalize(MODELS, "chat", "team-a")
            cluster.finalize(MODELS, "code", "team-b")

    clock = Clock(operator)
    outcome = finalize_all(cluster, timeout=60, clock=clock, sleep=clock.sleep)
    assert outcome.ok and not cluster.objects
    assert outcome.forced == []
    assert sorted(outcome.deleted) == ["llmmodel/team-a/chat", "llmmodel/team-b/code"]
    # the placement is the operator's to delete; the hook never touched a finalizer
    assert sorted(cluster.calls) == [("delete", MODELS, "chat"), ("delete", MODELS, "code")]
    assert outcome.waited_seconds == 3


def test_no_operator_holding_the_lease_means_no_wait() -> None:
    cluster = populated(alive=False)
    clock = Clock()
    outcome = finalize_all(cluster, timeout=120, clock=clock, sleep=clock.sleep)
    assert outcome.ok and not cluster.objects
    assert clock.now == 0, "waited for an operator that is not there"
    assert sorted(outcome.forced) == [
        "llmmodel/team-a/chat",
        "llmmodel/team-b/code",
        "modelplacement/team-a.chat",
    ]


def test_an_operator_that_does_not_finish_is_waited_for_at_most_the_timeout() -> None:
    cluster = populated()
    clock = Clock()
    outcome = finalize_all(cluster, timeout=10, poll=1, clock=clock, sleep=clock.sleep)
    assert outcome.ok and not cluster.objects
    assert outcome.waited_seconds == 10
    assert len(outcome.forced) == 3


def test_a_model_applied_during_the_wait_is_deleted_too() -> None:
    cluster = populated()

    def meanwhile(step: int) -> None:
        if step == 1:
            cluster.add(MODELS, "late", "team-c", [KOPF_FINALIZER])
        if step == 3:
            for key in list(cluster.objects):
                cluster.finalize(key[0], key[2], key[1])

    clock = Clock(meanwhile)
    cluster.add(PLACEMENTS, "stale", None, [])  # no finalizer: the operator deletes it
    cluster.objects[(PLACEMENTS, None, "stale")]["metadata"]["deletionTimestamp"] = "now"
    outcome = finalize_all(cluster, timeout=60, clock=clock, sleep=clock.sleep)
    assert "llmmodel/team-c/late" in outcome.deleted
    assert outcome.ok and not cluster.objects


def test_another_controllers_finalizer_is_kept_and_reported() -> None:
    cluster = FakeCluster(alive=False)
    cluster.add(MODELS, "chat", "team-a", [KOPF_FINALIZER, FOREIGN])
    cluster.add(MODELS, "mine", "team-a", [KOPF_FINALIZER])
    clock = Clock()
    outcome = finalize_all(cluster, timeout=5, settle=3, clock=clock, sleep=clock.sleep)
    assert not outcome.ok
    assert outcome.left == [f"llmmodel/team-a/chat (finalizers: {FOREIGN})"]
    assert list(cluster.objects) == [(MODELS, "team-a", "chat")]
    assert cluster.objects[(MODELS, "team-a", "chat")]["metadata"]["finalizers"] == [FOREIGN]


def test_a_conflicting_finalizer_write_is_retried() -> None:
    cluster = populated(alive=False)
    cluster.conflicts = 2
    clock = Clock()
    outcome = finalize_all(cluster, timeout=5, clock=clock, sleep=clock.sleep)
    assert outcome.ok and not cluster.objects


def test_nothing_to_do_returns_at_once() -> None:
    cluster = FakeCluster()
    clock = Clock()
    outcome = finalize_all(cluster, timeout=60, clock=clock, sleep=clock.sleep)
    assert outcome.ok and outcome.deleted == [] and clock.sleeps == 0


def test_lease_held_as_the_operator_decides() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)

    def spec(holder: str | None, ago: float, duration: int = 15) -> SimpleNamespace:
        return SimpleNamespace(
            holder_identity=holder,
            renew_time=now - timedelta(seconds=ago),
            acquire_time=None,
            lease_duration_seconds=duration,
        )

    assert lease_held(spec("op-1", 5), now)
    assert not lease_held(spec("op-1", 16), now)
    assert not lease_held(spec(None, 1), now)  # released on a clean stop
    assert not lease_held(SimpleNamespace(holder_identity="x", renew_time=None, acquire_time=None), now)


def test_constants_match_the_operator_and_kopf() -> None:
    import kopf

    from residency_operator.controller import LEASE_NAME
    from residency_operator.state import UNLOAD_FINALIZER as STATE_UNLOAD

    assert uninstall.UNLOAD_FINALIZER == STATE_UNLOAD
    assert uninstall.LEASE_NAME == LEASE_NAME
    assert kopf.OperatorSettings().persistence.finalizer == KOPF_FINALIZER


def test_main_exit_code_names_what_is_left(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = FakeCluster(alive=False)
    cluster.add(MODELS, "chat", "team-a", [FOREIGN])
    monkeypatch.setattr(uninstall, "load_config", lambda: None)
    monkeypatch.setattr(uninstall, "ApiCluster", lambda namespace: cluster)
    args = ["--lease-namespace", "ns", "--timeout", "0", "--poll", "0", "--settle", "0"]
    assert uninstall.main(args) == 1
    assert "llmmodel/team-a/chat (finalizers: example.com/backup)" in caplog.text
    cluster.objects.clear()
    assert uninstall.main(args) == 0


# --- the chart's hook ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "residency"


def render(*sets: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(REPO / "hack" / "build-binaries.sh"), "path"], capture_output=True, text=True, check=False
    )
    helm = Path(out.stdout.strip()) / "helm"
    if out.returncode != 0 or not helm.exists():
        pytest.skip("helm binary not built (hack/build-binaries.sh)")
    args = [str(helm), "template", "rel", str(CHART), "-n", "residency", "--kube-version", "1.34.4"]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def hook_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if "helm.sh/hook" in (o["metadata"].get("annotations") or {})]


def test_chart_without_keep_runs_the_hook_with_least_privilege() -> None:
    objects = render(
        "crds.keep=false", "crds.uninstallTimeoutSeconds=45", "operator.nodeSelector.pool=system"
    )
    hooks = {(o["kind"], o["metadata"]["name"]): o for o in hook_objects(objects)}
    assert set(hooks) == {
        (kind, "rel-residency-uninstall")
        for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Job")
    }
    for obj in hooks.values():
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    # RBAC exists before the Job runs
    job = hooks[("Job", "rel-residency-uninstall")]
    weights = {k: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for k, o in hooks.items()}
    assert all(w < weights[("Job", "rel-residency-uninstall")] for k, w in weights.items() if k[0] != "Job")
    cluster_rules = {
        (g, r, v)
        for rule in hooks[("ClusterRole", "rel-residency-uninstall")]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert cluster_rules == {
        ("residency.dev", plural, verb)
        for plural in ("llmmodels", "modelplacements")
        for verb in ("list", "delete", "patch")
    }
    lease_rules = hooks[("Role", "rel-residency-uninstall")]["rules"]
    assert lease_rules == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["residency-operator"],
            "verbs": ["get"],
        }
    ]
    assert hooks[("Role", "rel-residency-uninstall")]["metadata"]["namespace"] == "residency"
    binding = hooks[("ClusterRoleBinding", "rel-residency-uninstall")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-residency-uninstall", "namespace": "residency"}
    ]
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "rel-residency-uninstall"
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"pool": "system"}
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "residency_operator.handlers.uninstall"]
    assert container["args"] == ["--lease-namespace=residency", "--timeout=45"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert job["spec"]["activeDeadlineSeconds"] == 45 + 90
    # the chart's other objects are not hooks: helm deletes them only after the hook succeeded
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 4 and not hook_objects(crds)


@pytest.mark.parametrize("sets", [[], ["crds.keep=true"], ["crds.enabled=false", "crds.keep=false"]])
def test_no_hook_when_the_crds_stay(sets: list[str]) -> None:
    """crds.keep=true keeps every model for a reinstall; without the chart's CRDs there is nothing to do."""
    assert hook_objects(render(*sets)) == []


def test_the_hook_module_runs_as_the_job_runs_it() -> None:
    """`python -m residency_operator.handlers.uninstall --help`: the entry point the Job's command names."""
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "residency_operator.handlers.uninstall", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--lease-namespace" in result.stdout
