"""`residency doctor` judges each piece from what the cluster shows and says what to do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from residency.doctor import (
    CRD_PLURALS,
    check_crds,
    check_lease,
    check_models,
    check_router,
    check_worker,
    render,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def crd(plural: str, established: bool = True, group: str = "residency.dev") -> dict[str, Any]:
    status = "True" if established else "False"
    return {
        "spec": {"group": group, "names": {"plural": plural}},
        "status": {"conditions": [{"type": "Established", "status": status}]},
    }


def healthy(url: str) -> tuple[bool, str]:
    return True, ""


def unreachable(url: str) -> tuple[bool, str]:
    return False, "unreachable (ConnectError)"


def test_crds_all_established_or_which_are_missing() -> None:
    assert check_crds([crd(p) for p in CRD_PLURALS]).ok
    missing = check_crds([crd("llmmodels"), crd("widgets", group="other.dev")])
    assert not missing.ok and "modelplacements" in missing.detail and "kubectl apply" in missing.hint
    pending = check_crds([crd(p, established=p != "nodeprofiles") for p in CRD_PLURALS])
    assert not pending.ok and pending.detail == "not Established yet: nodeprofiles"


def test_operator_lease_fresh_stale_released_or_absent() -> None:
    def lease(holder: str | None, age_seconds: float) -> dict[str, Any]:
        renewed = (NOW - timedelta(seconds=age_seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"spec": {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": 15}}

    fresh = check_lease(lease("host-1", 3), NOW, "default")
    assert fresh.ok and "host-1" in fresh.detail
    stale = check_lease(lease("host-1", 120), NOW, "default")
    assert not stale.ok and "120 s ago" in stale.detail and "residency operator" in stale.hint
    assert not check_lease(lease(None, 1), NOW, "default").ok
    absent = check_lease(None, NOW, "residency")
    assert not absent.ok and "residency/residency-operator" in absent.detail


def test_router_health_and_hint() -> None:
    assert check_router("http://r:1", healthy).ok
    down = check_router("http://r:1/", unreachable)
    assert not down.ok and "RESIDENCY_ROUTER" in down.hint and "ConnectError" in down.detail


def test_worker_heartbeat_and_endpoint() -> None:
    def profile(age_seconds: float | None, endpoint: str | None = "http://w:1") -> dict[str, Any]:
        status = {}
        if age_seconds is not None:
            status["heartbeatTime"] = (NOW - timedelta(seconds=age_seconds)).isoformat()
        spec = {"nodeName": "gpu-a", "emulated": True, "gpuMemoryBytes": 24 * 2**20}
        if endpoint:
            spec["workerEndpoint"] = endpoint
        return {"metadata": {"name": "gpu-a"}, "spec": spec, "status": status}

    seen: list[str] = []

    def recording(url: str) -> tuple[bool, str]:
        seen.append(url)
        return True, ""

    good = check_worker(profile(5), NOW, recording)
    assert good.ok and "24.0 MiB" in good.detail and seen == ["http://w:1/healthz"]
    stale = check_worker(profile(300), NOW, healthy)
    assert not stale.ok and "300 s ago" in stale.detail and "--node gpu-a" in stale.hint
    assert "never" in check_worker(profile(None), NOW, healthy).detail
    down = check_worker(profile(5), NOW, unreachable)
    assert not down.ok and "does not answer" in down.detail


def test_models_not_serving_are_warnings_with_their_reason() -> None:
    models = [
        {"metadata": {"namespace": "a", "name": "ok"}, "status": {"phase": "Ready"}},
        {
            "metadata": {"namespace": "a", "name": "big"},
            "status": {"phase": "Unschedulable", "reason": "InsufficientGPUMemory", "message": "needs 1 GiB"},
        },
    ]
    (check,) = check_models(models)
    assert check.warning and not check.ok
    assert check.detail == "Unschedulable (InsufficientGPUMemory): needs 1 GiB"
    assert check_models(models[:1])[0].ok
    text = render([check, check_router("http://r:1", unreachable)])
    assert "[warn] model a/big" in text and "[FAIL] router" in text and "-> start it" in text
