"""The router's tenancy on the real control plane: ServiceAccount tokens from the TokenRequest API, checked
with real TokenReview and SubjectAccessReview calls; a wake recorded without touching the model.

The tenancy matrix: a token of team A lists and calls A's models and is refused (403, no detail) for B's,
waking included; an anonymous call gets 401; a ServiceAccount without a RoleBinding gets 403 for its own
namespace's models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import EXTRA_PROCESSES, free_port, purge_models
from harness import Process, apply, get_json, kubectl, llm, wait_for

pytestmark = pytest.mark.e2e


def set_phase(namespace: str, name: str, phase: str, reason: str = "") -> None:
    status = {"status": {"phase": phase, "reason": reason, "message": f"set by the test: {phase}"}}
    kubectl(
        "patch",
        "llmmodel",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


@pytest.fixture
def tenants(cluster: str) -> Iterator[dict[str, Any]]:
    """Namespaces A and B, each with models `chat` (Failed: answers 409 at once) and `sleepy` (Idle); a
    ServiceAccount `app` bound to `infer` in each, and `stranger` in A without a binding; their tokens."""
    suffix = uuid.uuid4().hex[:6]
    a, b = f"tenant-a-{suffix}", f"tenant-b-{suffix}"
    role = f"inference-{suffix}"
    rules = [{"apiGroups": ["residency.dev"], "resources": ["llmmodels"], "verbs": ["infer"]}]
    apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": rules,
        }
    )
    tokens: dict[str, str] = {}
    for namespace in (a, b):
        kubectl("create", "namespace", namespace)
        for name in ("app", "stranger"):
            kubectl("create", "serviceaccount", name, "-n", namespace)
        kubectl(
            "create",
            "rolebinding",
            "app-inference",
            "-n",
            namespace,
            f"--clusterrole={role}",
            f"--serviceaccount={namespace}:app",
        )
        for name in ("chat", "sleepy"):
            apply(llm(name, "/models/none"), namespace)
        set_phase(namespace, "chat", "Failed", "ConfigInvalid")
        set_phase(namespace, "sleepy", "Idle", "NoRequests")
        tokens[namespace] = kubectl(
            "create", "token", "app", "-n", namespace, "--duration=10m"
        ).stdout.strip()
    tokens["stranger"] = kubectl("create", "token", "stranger", "-n", a, "--duration=10m").stdout.strip()
    yield {"a": a, "b": b, "tokens": tokens}
    for namespace in (a, b):
        purge_models(namespace)
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    kubectl("delete", "clusterrole", role, check=False)


@pytest.fixture
def authenticating_router(
    cluster: str, tenants: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The router as a process with its default auth (Kubernetes), its wake ConfigMap in namespace A."""
    port = free_port()
    proc = Process(
        "router",
        ["router", "--port", str(port), "--hold-seconds", "1", "--wake-namespace", tenants["a"]],
        tmp_path / "router.log",
        env={"KUBECONFIG": cluster},
    ).start()
    request.node.stash.setdefault(EXTRA_PROCESSES, []).append(proc)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 60, what="router /healthz")
    # the table lists every model: wait until it has the tenants' (it refreshes every second)
    wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).json()["models"] >= 4, 30, what="router table")
    yield url
    proc.stop()


def test_tenants_see_and_use_only_their_own_models(
    authenticating_router: str, tenants: dict[str, Any]
) -> None:
    url, a, b = authenticating_router, tenants["a"], tenants["b"]
    token_a = {"authorization": f"Bearer {tenants['tokens'][a]}"}
    matrix: list[tuple[str, str, int]] = []

    def call(who: str, headers: dict[str, str], method: str, path: str, body: Any = None) -> httpx.Response:
        response = httpx.request(method, f"{url}{path}", headers=headers, json=body, timeout=30)
        matrix.append((who, f"{method} {path} {body['model'] if body else ''}".strip(), response.status_code))
        return response

    listed = call("A", token_a, "GET", "/v1/models")
    assert listed.status_code == 200 and sorted(m["id"] for m in listed.json()["data"]) == [
        f"{a}/chat",
        f"{a}/sleepy",
    ]
    assert all(m["created"] > 0 for m in listed.json()["data"])
    mine = call("A", token_a, "POST", "/v1/completions", {"model": "chat", "prompt": "x"})
    assert mine.status_code == 409 and f"{a}/chat" in mine.json()["error"]["message"]
    for model in (f"{b}/chat", f"{b}/sleepy", f"{b}/does-not-exist"):
        refused = call("A", token_a, "POST", "/v1/completions", {"model": model, "prompt": "x"})
        assert refused.status_code == 403 and refused.json()["error"]["message"] == "forbidden", refused.text
    assert call("A", token_a, "GET", f"/v1/models/{b}/chat").status_code == 403
    for who, headers in (
        ("anonymous", {}),
        ("bad token", {"authorization": "Bearer not-a-kubernetes-token"}),
    ):
        assert call(who, headers, "GET", "/v1/models").status_code == 401
        assert (
            call(who, headers, "POST", "/v1/completions", {"model": f"{a}/chat", "prompt": "x"}).status_code
            == 401
        )
    stranger = {"authorization": f"Bearer {tenants['tokens']['stranger']}"}
    assert call("A, unbound", stranger, "GET", "/v1/models").json()["data"] == []
    assert (
        call("A, unbound", stranger, "POST", "/v1/completions", {"model": "chat", "prompt": "x"}).status_code
        == 403
    )
    print("\ntenancy matrix (caller, request, status):")
    for row in matrix:
        print(f"  {row[0]:<11} {row[1]:<60} {row[2]}")


def test_a_wake_is_recorded_in_the_routers_configmap_and_never_on_the_model(
    authenticating_router: str, tenants: dict[str, Any]
) -> None:
    url, a, b = authenticating_router, tenants["a"], tenants["b"]
    token_a = {"authorization": f"Bearer {tenants['tokens'][a]}"}
    # someone else's idle model: 403, and nothing recorded for it
    refused = httpx.post(
        f"{url}/v1/completions", json={"model": f"{b}/sleepy", "prompt": "x"}, headers=token_a, timeout=30
    )
    assert refused.status_code == 403
    started = time.monotonic()
    held = httpx.post(
        f"{url}/v1/completions", json={"model": "sleepy", "prompt": "x"}, headers=token_a, timeout=30
    )
    assert held.status_code == 503 and held.headers["retry-after"] == "5", held.text
    assert time.monotonic() - started < 10
    wakes = get_json("configmap", "residency-wake", "-n", a)["data"]
    assert set(wakes) == {f"{a}.sleepy"}, wakes
    wake_time, waiting = wakes[f"{a}.sleepy"].split()
    assert wake_time.endswith("Z") and int(waiting) >= 1
    annotations = get_json("llmmodel", "sleepy", "-n", a)["metadata"].get("annotations") or {}
    assert not [k for k in annotations if k.startswith("residency.dev/wake") or "waiting" in k], annotations

    # the operator reads it as the model's wake, with its own (real) API calls
    from residency_operator.kube import Kube, load_config
    from residency_operator.state import with_wake_requests, woken_at

    load_config()
    requests = Kube().wake_requests(a)
    assert requests == {f"{a}/sleepy": (wake_time, waiting)}
    (merged,) = with_wake_requests([get_json("llmmodel", "sleepy", "-n", a)], requests)
    assert woken_at(merged) is not None
