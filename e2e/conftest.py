"""e2e fixtures: the real local control plane, CRDs installed, a namespace per test, the operator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import REPO, Process, get_json, kubectl, wait_for

pytestmark = pytest.mark.e2e
ADMIN_TOKEN = "e2e-admin-token"  # test-only secret
LOG_TAIL_LINES = 40
# The operators here judge a node dead after 20 s without a Lease renewal (RESIDENCY_HEARTBEAT_GRACE_SECONDS),
# to keep node-loss tests short; every worker the tests start renews every 5 s, four times in that grace.
os.environ.setdefault("RESIDENCY_LEASE_RENEW_SECONDS", "5")
EXTRA_PROCESSES = pytest.StashKey[list[Process]]()
"""Processes a fixture started that the test does not receive as a Process (the router: it gets a URL)."""


def _processes_of(item: pytest.Item) -> list[Process]:
    """The operator, router and worker processes a test used (from its fixtures)."""
    found: list[Process] = list(item.stash.get(EXTRA_PROCESSES, []))
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Process):
            found.append(value)
        elif isinstance(value, NodePool):
            found.extend(node.process for node in value.nodes)
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the tail of each process log, so a CI failure can be read."""
    report = yield
    if report.failed and report.when == "call":
        for process in _processes_of(item):
            tail = process.log().splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"{process.name} log (last {len(tail)} lines)", "\n".join(tail)))
    return report


@pytest.fixture(scope="session")
def cluster() -> str:
    """Starts (or reuses) the control plane and installs the CRDs; returns the kubeconfig path."""
    # the demo's operator would lead and act on the tests' models: the suite needs the cluster to itself
    subprocess.run([str(REPO / "hack/demo.sh"), "down"], capture_output=True, timeout=120, check=False)
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
    """An allowed model root holding tiny models made by residency's make-model (Llama and Qwen2), and
    one with 16 layers: a partial placement holds whole layers and stages two more to stream, so on the
    4-layer ones it saves little GPU memory (a quarter resident needs 88 % of whole), on 16 it saves half."""
    from residency.modelgen import make_model

    root = tmp_path_factory.mktemp("models")
    for name, arch, seed in (
        ("tiny-llama", "llama", 0),
        ("tiny-qwen", "qwen2", 1),
        ("tiny-llama-b", "llama", 2),
    ):
        make_model(root / name, arch=arch, preset="tiny", seed=seed)
    make_model(root / "tiny-deep", arch="llama", preset="tiny", seed=3, overrides={"num_hidden_layers": 16})
    return root


@pytest.fixture
def namespace(cluster: str) -> Iterator[str]:
    """A fresh namespace per test, deleted (with its models and their placements) afterwards."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    purge_models(name)
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def purge_models(namespace: str) -> None:
    """Deletes a namespace's models and placements even when no operator or worker is left to finalize."""
    kubectl("delete", "llmmodels", "--all", "-n", namespace, "--wait=false", check=False)
    selector = f"residency.dev/model-namespace={namespace}"
    kubectl("delete", "modelplacements", "-l", selector, "--wait=false", check=False)
    for kind, args in (("llmmodels", ["-n", namespace]), ("modelplacements", ["-l", selector])):
        names = kubectl("get", kind, *args, "-o", "name", check=False).stdout.split()
        for obj in names:
            kubectl(
                "patch",
                obj,
                *args[:2] if kind == "llmmodels" else [],
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )


@pytest.fixture
def operator(cluster: str, models_root: Path, tmp_path: Path) -> Iterator[Process]:
    """The kopf operator as a local process, allowed to read models under models_root."""
    proc = Process(
        "operator",
        ["operator", "--models-root", str(models_root)],
        tmp_path / "operator.log",
        env={
            "KUBECONFIG": cluster,
            "RESIDENCY_RESYNC_SECONDS": "5",
            "RESIDENCY_HEARTBEAT_GRACE_SECONDS": "20",
        },
    ).start()
    yield proc
    proc.stop()
    if os.environ.get("RESIDENCY_E2E_SHOW_LOGS"):
        print(proc.log())


def model_status(namespace: str, name: str) -> dict[str, object]:
    return get_json("llmmodel", name, "-n", namespace).get("status") or {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GpuNode:
    """A Node object plus a real worker process (real torch inference on an emulated GPU tier)."""

    name: str
    gpu_memory: str
    port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def profile(self) -> dict[str, Any] | None:
        result = kubectl("get", "nodeprofile", self.name, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def restart(self) -> None:
        self.process.stop()
        self.process.start()


class NodePool:
    """Creates GPU nodes for one test and removes them (Node, NodeProfile, worker) afterwards."""

    def __init__(self, cluster: str, models_root: Path, workdir: Path) -> None:
        self.cluster = cluster
        self.models_root = models_root
        self.workdir = workdir
        self.nodes: list[GpuNode] = []
        (workdir / "admin.token").write_text(ADMIN_TOKEN)

    def add(self, name: str, gpu_memory: str, wait: bool = True, extra_args: tuple[str, ...] = ()) -> GpuNode:
        kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "labels": {"residency.dev/gpu": "true"}},
                }
            ),
        )
        port = free_port()
        process = Process(
            f"worker-{name}",
            [
                "worker",
                "--node",
                name,
                "--gpu-memory",
                gpu_memory,
                "--models-root",
                str(self.models_root),
                "--port",
                str(port),
                "--admin-token-file",
                str(self.workdir / "admin.token"),
                "--join",
                "--node-heartbeat",
                "--calibration-mib",
                "8",
                "--log-level",
                "info",
                *extra_args,
            ],
            self.workdir / f"worker-{name}.log",
            env={"KUBECONFIG": self.cluster},
        ).start()
        node = GpuNode(name, gpu_memory, port, process)
        self.nodes.append(node)
        if wait:
            wait_for(node.profile, 90, what=f"NodeProfile of {name}")
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.process.stop()
        for node in self.nodes:
            kubectl("delete", "node", node.name, "--wait=false", check=False)
            kubectl("delete", "nodeprofile", node.name, "--wait=false", check=False)


@pytest.fixture
def gpu_nodes(cluster: str, models_root: Path, tmp_path: Path) -> Iterator[NodePool]:
    pool = NodePool(cluster, models_root, tmp_path)
    yield pool
    pool.close()


@pytest.fixture
def router(cluster: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The OpenAI-compatible router as a local process; yields its base URL."""
    port = free_port()
    proc = Process(
        "router",
        # open: these tests are about routing; e2e/test_e2e_tenancy.py tests the router's auth
        # and without admission control: bursts here test faults and routing, not refusals (the router's
        # admission is tested in tests/unit/test_router_admission.py and by the reliability load test)
        ["router", "--port", str(port), "--hold-seconds", "60", "--auth", "none", "--no-admission"],
        tmp_path / "router.log",
        env={"KUBECONFIG": cluster},
    ).start()
    request.node.stash.setdefault(EXTRA_PROCESSES, []).append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy(url), 60, what="router /healthz")
    yield url
    proc.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
