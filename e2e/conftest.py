"""e2e fixtures: the real local control plane, CRDs installed, a namespace per test, the operator."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import REPO, Process, get_json, kubectl, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def cluster() -> str:
    """Starts (or reuses) the control plane and installs the CRDs; returns the kubeconfig path."""
    out = subprocess.run([str(REPO / "hack/cluster.sh"), "up"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kubeconfig = out.stdout.strip().split("=", 1)[1]
    os.environ["KUBECONFIG"] = kubeconfig
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    for crd in sorted(p.name.removesuffix(".yaml") for p in (REPO / "crds").glob("*.yaml")):
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    # discovery of the new kinds can lag Established by a moment
    wait_for(lambda: kubectl("get", "llm", "-A", check=False).returncode == 0, 30, what="llm discovery")
    return kubeconfig


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed model root holding one tiny model made by `residency make-model`."""
    root = tmp_path_factory.mktemp("models")
    residency = Path(os.sys.executable).parent / "residency"  # type: ignore[attr-defined]
    subprocess.run(
        [str(residency), "make-model", str(root / "tiny-llama"), "--arch", "llama", "--preset", "tiny"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return root


@pytest.fixture
def namespace(cluster: str) -> Iterator[str]:
    """A fresh namespace per test, deleted (with its models) afterwards."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "llmmodels", "--all", "-n", name, "--wait=false", check=False)
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator(cluster: str, models_root: Path, tmp_path: Path) -> Iterator[Process]:
    """The kopf operator as a local process, allowed to read models under models_root."""
    proc = Process(
        "operator",
        ["operator", "--models-root", str(models_root)],
        tmp_path / "operator.log",
        env={"KUBECONFIG": cluster, "RESIDENCY_RESYNC_SECONDS": "5"},
    ).start()
    yield proc
    proc.stop()
    if os.environ.get("RESIDENCY_E2E_SHOW_LOGS"):
        print(proc.log())


def model_status(namespace: str, name: str) -> dict[str, object]:
    return get_json("llmmodel", name, "-n", namespace).get("status") or {}
