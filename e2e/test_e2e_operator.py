"""The operator against the real API server: validation verdicts, status conditions, Events, restarts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import model_status
from harness import Process, apply, get_json, kubectl, llm, wait_for


def phase_is(namespace: str, name: str, phase: str, reason: str) -> dict[str, Any] | None:
    status = model_status(namespace, name)
    return status if status.get("phase") == phase and status.get("reason") == reason else None  # type: ignore[return-value]


def test_good_model_goes_pending_no_nodes(namespace: str, operator: Process, models_root: Path) -> None:
    apply(llm("tiny", str(models_root / "tiny-llama"), priority=10), namespace)
    status = wait_for(lambda: phase_is(namespace, "tiny", "Pending", "NoNodes"), 60, what="Pending/NoNodes")
    conditions = {c["type"]: c for c in status["conditions"]}
    generation = get_json("llm", "tiny", "-n", namespace)["metadata"]["generation"]
    assert conditions["Validated"]["status"] == "True"
    assert conditions["Scheduled"]["status"] == "False" and conditions["Scheduled"]["reason"] == "NoNodes"
    assert all(c["observedGeneration"] == generation and c["lastTransitionTime"] for c in conditions.values())
    assert status["architecture"] == "llama" and status["weightBytes"] > 0
    # (Events go out in the background, moments after the status)
    wait_for(
        lambda: "NoNodes"
        in kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=tiny").stdout,
        30,
        what="a NoNodes Event",
    )


def test_missing_directory_fails_with_model_not_found(
    namespace: str, operator: Process, models_root: Path
) -> None:
    apply(llm("ghost", str(models_root / "does-not-exist")), namespace)
    status = wait_for(
        lambda: phase_is(namespace, "ghost", "Failed", "ModelNotFound"), 60, what="ModelNotFound"
    )
    assert "does-not-exist" in status["message"]
    line = kubectl("get", "llm", "ghost", "-n", namespace).stdout.splitlines()[1].split()
    assert line[:2] == ["ghost", "Failed"]


def test_path_outside_roots_fails(namespace: str, operator: Process, tmp_path: Path) -> None:
    apply(llm("escape", "/etc"), namespace)
    wait_for(lambda: phase_is(namespace, "escape", "Failed", "PathNotAllowed"), 60, what="PathNotAllowed")


def lease_holder() -> str:
    lease = get_json("lease", "residency-operator", "-n", "default")
    return str(lease["spec"].get("holderIdentity") or "")


def test_operator_restart_changes_nothing_decided(
    namespace: str, operator: Process, models_root: Path
) -> None:
    apply(llm("keep-a", str(models_root / "tiny-llama")), namespace)
    apply(llm("keep-b", str(models_root / "nope")), namespace)
    wait_for(lambda: phase_is(namespace, "keep-a", "Pending", "NoNodes"), 60, what="keep-a decided")
    wait_for(lambda: phase_is(namespace, "keep-b", "Failed", "ModelNotFound"), 60, what="keep-b decided")
    before = {n: model_status(namespace, n) for n in ("keep-a", "keep-b")}
    operator.stop()
    operator.start()
    assert operator.popen is not None
    pid = str(operator.popen.pid)
    wait_for(lambda: pid in lease_holder(), 60, what="the restarted operator to lead")
    time.sleep(8)  # several planning rounds and one resync period (5 s in tests)
    after = {n: model_status(namespace, n) for n in ("keep-a", "keep-b")}
    assert after == before


def test_spec_edit_updates_observed_generation(namespace: str, operator: Process, models_root: Path) -> None:
    apply(llm("edit", str(models_root / "tiny-llama")), namespace)
    wait_for(lambda: phase_is(namespace, "edit", "Pending", "NoNodes"), 60, what="first verdict")
    kubectl("patch", "llm", "edit", "-n", namespace, "--type=merge", "-p", '{"spec":{"priority":7}}')
    generation = get_json("llm", "edit", "-n", namespace)["metadata"]["generation"]
    wait_for(
        lambda: model_status(namespace, "edit").get("observedGeneration") == generation,
        60,
        what="observedGeneration",
    )
