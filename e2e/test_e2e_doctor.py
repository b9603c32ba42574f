"""`residency doctor` against the real control plane: it sees the operator, the router and a worker, and
says what is wrong when the router is not there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import NodePool, free_port
from harness import Process, wait_for

RESIDENCY = str(Path(sys.executable).parent / "residency")


def doctor(cluster: str, router: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": cluster, "RESIDENCY_ROUTER": router}
    return subprocess.run([RESIDENCY, "doctor"], capture_output=True, text=True, env=env, timeout=60)


def test_doctor_reports_each_piece_and_what_to_do(
    cluster: str, operator: Process, gpu_nodes: NodePool, router: str
) -> None:
    gpu_nodes.add("gpu-doctor-1", "64MiB")

    def healthy() -> str | None:
        out = doctor(cluster, router).stdout
        wanted = (
            "[ok  ] API server",
            "[ok  ] CRDs",
            "[ok  ] operator",
            "[ok  ] router",
            "[ok  ] worker gpu-doctor-1",
        )
        return out if all(line in out for line in wanted) else None

    report = wait_for(healthy, 60, what="doctor to see the operator, router and worker healthy")
    assert "Kubernetes v1.34" in report and "emulated GPU tier, 64.0 MiB" in report

    gone = f"http://127.0.0.1:{free_port()}"
    result = doctor(cluster, gone)
    assert result.returncode == 1
    assert re.search(rf"\[FAIL\] router +{re.escape(gone)}: unreachable", result.stdout), result.stdout
    assert "-> start it (residency router" in result.stdout
