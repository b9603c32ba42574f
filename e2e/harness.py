"""Helpers for the e2e tier: kubectl, waiting, and local processes (operator, workers) with logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def binaries_dir() -> Path:
    out = subprocess.run(
        [str(REPO / "hack/build-binaries.sh"), "path"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def kubectl(
    *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs the real kubectl against the local control plane."""
    result = subprocess.run(
        [str(binaries_dir() / "kubectl"), *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def apply(
    manifest: dict[str, Any] | str, namespace: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    return kubectl(*args, stdin=text, check=check)


def get_json(*args: str) -> dict[str, Any]:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)  # type: ignore[no-any-return]


GOOD: dict[str, Any] = {  # a valid LLMModel every field of which bad-input tests break in turn
    "apiVersion": "residency.dev/v1alpha1",
    "kind": "LLMModel",
    "metadata": {"name": "probe"},
    "spec": {
        "source": {"path": "/models/chat-small"},
        "dtype": "bfloat16",
        "priority": 100,
        "preemptible": True,
        "slo": {"minDecodeTokensPerSecond": 20},
        "offload": {"maxFraction": 0.75},
        "maxSequenceLength": 4096,
        "maxBatchSize": 8,
        "idle": {"afterSeconds": 600},
    },
}


SMALL_LIMITS: dict[str, Any] = {"maxSequenceLength": 64, "maxBatchSize": 1}
"""Limits that keep a tiny model's GPU reservation small, so tests can size node budgets around it."""


def llm(name: str, path: Path | str, **spec: Any) -> dict[str, Any]:
    """An LLMModel manifest for `kubectl apply` (namespace given at apply time)."""
    return {
        "apiVersion": "residency.dev/v1alpha1",
        "kind": "LLMModel",
        "metadata": {"name": name},
        "spec": {"source": {"path": str(path)}, **spec},
    }


def wait_for(
    condition: Callable[[], T | None], timeout: float = 60, interval: float = 0.5, what: str = ""
) -> T:
    """Polls until condition returns something truthy."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}; last value {last!r}")


def wait_for_node_event(node: str, reason: str, timeout: float = 120) -> str:
    """The `kubectl get events` listing of a Node once it shows an Event with this reason."""

    def listing() -> str | None:
        out = kubectl(
            "get", "events", "-n", "default", "--field-selector", f"involvedObject.name={node}"
        ).stdout
        return out if reason in out else None

    return wait_for(listing, timeout, what=f"{reason} Event on node {node}")


@dataclass
class Process:
    """A residency process (operator, worker, router) started by a test, with its log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.popen = subprocess.Popen(
            [str(Path(sys.executable).parent / "residency"), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Sampler:
    """Calls ``sample()`` on a daemon thread while a ``with`` block runs: once at its start, then every
    ``interval_seconds`` until it ends. A subclass says what one sample records."""

    def __init__(self, interval_seconds: float, name: str) -> None:
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_seconds):
                return
