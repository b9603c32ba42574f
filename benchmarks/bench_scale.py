"""Fleet scale on a real control plane: N hollow workers, M LLMModels, the real operator.

Starts etcd + kube-apiserver (hack/cluster.sh, no controller-manager or scheduler: only what residency
itself puts on the API server is measured), N hollow nodes in one process (residency_worker.hollow: the
real node agent, a hollow engine), and the operator as its own process. Then applies the models in waves,
kills and restarts the operator once between waves, waits until the last wave's work is done (at most
90 s), holds still for a steady-state window, and changes a few models one at a time. It measures:

- apply -> placement written, apply -> Ready (p50/p99) during the waves; change -> new placement;
- operator planning rounds per minute and their duration (the operator's residency_plan_seconds);
- API server requests per second by verb and resource, from its own /metrics (apiserver_request_total),
  during the waves and at steady state; the etcd database size (apiserver_storage_size_bytes);
- operator and hollow-process memory (RSS, peak); placements lost or doubled (must be 0).

    make scale                                   # 100 nodes, 1000 models
    .venv/bin/python benchmarks/bench_scale.py --nodes 300 --models 3000 --label after

Writes benchmarks/results/scale-<nodes>n-<models>m-<label>.json and a .png beside it; --summary plots every
result there as cost against fleet size (scale-summary.png).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from scale_identities import (  # noqa: E402
    create_lease_flow_schema,
    remove_bindings,
    service_account_kubeconfigs,
)

RESULTS = REPO / "benchmarks" / "results"
GROUP, VERSION = "residency.dev", "v1alpha1"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "APPLY"})
_REQUEST_LINE = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class ScaleConfig:
    nodes: int = 100
    models: int = 1000
    wave: int = 250
    changes: int = 21
    steady_seconds: float = 60.0
    load_seconds: float = 0.5
    heartbeat_seconds: float = 10.0  # the worker's default Lease renewal period
    namespace: str = "scale"
    node_prefix: str = "hollow-"
    kill_operator: bool = True
    wave_timeout_seconds: float = 600.0
    changes_seconds: float = 300.0  # no new change after this long in the changes phase
    label: str = "run"
    # the operator's RESIDENCY_INCREMENTAL_MIN_MODELS (None: its default)
    incremental_min_models: int | None = None
    # each client under a ServiceAccount of its own, as in a cluster (scale_identities), or all "admin"
    identities: str = "service-accounts"
    # the chart's FlowSchema for the Lease renewals (apiPriority); False: they queue with everything else
    lease_priority: bool = True


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return round(ordered[index], 3)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": round(max(values), 3) if values else None,
    }


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Process:
    """A child process with its log in a file (killed with its process group on stop)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
            cwd=REPO,
        )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def api_client(kubeconfig: str, pool: int = 16) -> client.ApiClient:
    api = config.new_client_from_config(config_file=kubeconfig)
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = pool
    return api


def scrape_apiserver(api: client.ApiClient) -> tuple[dict[tuple[str, str], float], int]:
    """(verb, resource) -> requests so far, and the storage size in bytes, from the API server's /metrics."""
    response = api.call_api(
        "/metrics",
        "GET",
        auth_settings=["BearerToken"],
        _preload_content=False,
        _return_http_data_only=True,
        _request_timeout=30,
    )
    counts: dict[tuple[str, str], float] = {}
    db_bytes = 0
    for line in response.data.decode().splitlines():
        if line.startswith("apiserver_request_total{"):
            match = _REQUEST_LINE.match(line)
            if match:
                labels = dict(_LABEL.findall(match.group(1)))
                key = (labels.get("verb", ""), labels.get("resource", ""))
                counts[key] = counts.get(key, 0.0) + float(match.group(2))
        elif line.startswith(("apiserver_storage_size_bytes", "apiserver_storage_db_total_size_in_bytes")):
            db_bytes = max(db_bytes, int(float(line.rsplit(" ", 1)[1])))
    return counts, db_bytes


def scrape_operator(port: int) -> dict[str, float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("residency_plan_seconds_count", "residency_plan_seconds_sum")):
            name, value = line.split(" ", 1)
            values[name] = float(value)
        elif line.startswith("residency_plan_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            values[f"bucket:{le}"] = float(line.rsplit(" ", 1)[1])
    return values


@dataclass
class Sample:
    t: float
    requests: dict[tuple[str, str], float]
    db_bytes: int
    operator: dict[str, float]
    operator_rss: int
    hollow_rss: int


def rates(before: Sample, after: Sample) -> dict[str, float]:
    """Requests per second by 'VERB resource' between two samples (nonzero ones)."""
    seconds = max(after.t - before.t, 1e-9)
    out = {}
    for key, value in after.requests.items():
        delta = value - before.requests.get(key, 0.0)
        if delta > 0:
            out[f"{key[0]} {key[1]}"] = round(delta / seconds, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def writes_per_second(window: dict[str, float]) -> float:
    return round(sum(v for k, v in window.items() if k.split(" ", 1)[0] in WRITE_VERBS), 3)


MODEL_WRITES = ("llmmodels", "modelplacements", "events", "nodeprofiles")
"""What a model costs the API server: its create, its placement, status patches (operator and worker),
Events and the profile changes its loads cause (not the Leases, which renew whatever happens)."""


def writes_per_model(window: dict[str, float]) -> float | None:
    """API writes per model applied in a wave: those writes' rate over the rate of model creates."""
    creates = window.get("POST llmmodels", 0.0)
    if not creates:
        return None
    writes = sum(
        v
        for k, v in window.items()
        if k.split(" ", 1)[0] in WRITE_VERBS and k.split(" ", 1)[1] in MODEL_WRITES
    )
    return round(writes / creates, 2)


def round_stats(before: Sample, after: Sample) -> dict[str, Any]:
    count = after.operator.get("residency_plan_seconds_count", 0) - before.operator.get(
        "residency_plan_seconds_count", 0
    )
    total = after.operator.get("residency_plan_seconds_sum", 0) - before.operator.get(
        "residency_plan_seconds_sum", 0
    )
    minutes = max(after.t - before.t, 1e-9) / 60
    p99 = None
    buckets = sorted(
        (float(k.split(":", 1)[1]), v - before.operator.get(k, 0))
        for k, v in after.operator.items()
        if k.startswith("bucket:") and k != "bucket:+Inf"
    )
    for le, cumulative in buckets:
        if count and cumulative >= 0.99 * count:
            p99 = le
            break
    return {
        "rounds": int(count),
        "rounds_per_minute": round(count / minutes, 2),
        "mean_seconds": round(total / count, 3) if count else None,
        "p99_bucket_seconds": p99,
    }


@dataclass
class Tracker:
    """Watches the harness's models and their placements and records when each step was first seen."""

    api: client.ApiClient
    namespace: str
    placed: dict[str, float] = field(default_factory=dict)  # model uid -> first placement seen
    ready: dict[str, float] = field(default_factory=dict)  # model uid -> first Ready seen
    observed: dict[tuple[str, int], float] = field(default_factory=dict)  # (uid, generation) -> seen
    slo_seen: dict[tuple[str, float], float] = field(default_factory=dict)  # (uid, slo) -> on placement
    placement_deleted: list[tuple[float, str]] = field(default_factory=list)
    phase: dict[str, str] = field(default_factory=dict)  # model name -> phase
    uid: dict[str, str] = field(default_factory=dict)  # model name -> uid
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Tracker:
        custom = client.CustomObjectsApi(self.api)
        models = (custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, "llmmodels"), {})
        placements = (
            custom.list_cluster_custom_object,
            (GROUP, VERSION, "modelplacements"),
            {"label_selector": f"residency.dev/model-namespace={self.namespace}"},
        )
        for target, handler in ((models, self._on_model), (placements, self._on_placement)):
            threading.Thread(target=self._watch, args=(*target, handler), daemon=True).start()
        return self

    def _watch(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        handler: Callable[[str, dict[str, Any]], None],
    ) -> None:
        version: str | None = None
        while not self.stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    func, *args, resource_version=version, timeout_seconds=60, **kwargs
                ):
                    handler(event["type"], event["object"])
                    version = stream.resource_version
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                time.sleep(0.5)
            except Exception:  # the API server restarting, a dropped connection: watch again
                time.sleep(0.5)

    def _on_model(self, kind: str, body: dict[str, Any]) -> None:
        now = time.time()
        meta, status = body["metadata"], body.get("status") or {}
        uid, name = meta["uid"], meta["name"]
        if kind == "DELETED":
            self.phase.pop(name, None)
            return
        self.uid[name] = uid
        self.phase[name] = status.get("phase", "")
        if status.get("phase") == "Ready":
            self.ready.setdefault(uid, now)
        if status.get("observedGeneration") is not None:
            self.observed.setdefault((uid, int(status["observedGeneration"])), now)

    def _on_placement(self, kind: str, body: dict[str, Any]) -> None:
        now = time.time()
        spec = body["spec"]
        uid = spec["model"].get("uid") or ""
        if kind == "DELETED":
            self.placement_deleted.append((now, spec["model"]["name"]))
            return
        self.placed.setdefault(uid, now)
        if spec.get("minDecodeTokensPerSecond") is not None:
            self.slo_seen.setdefault((uid, float(spec["minDecodeTokensPerSecond"])), now)


def model_manifest(name: str, path: str, index: int, slo: float = 5.0) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMModel",
        "metadata": {"name": name},
        "spec": {
            "source": {"path": path},
            "dtype": "float32",
            "priority": index % 100,
            "preemptible": True,
            "slo": {"minDecodeTokensPerSecond": slo},
            "offload": {"maxFraction": 0.75},
            "maxSequenceLength": 64,
            "maxBatchSize": 1,
        },
    }


def make_models(root: Path) -> tuple[list[str], int]:
    """Three tiny model directories; returns their paths and the largest GPU bytes one needs whole."""
    from residency.modeldir import inspect_model_dir
    from residency.modelgen import make_model
    from residency_operator.capacity import full_residency_gpu_bytes

    paths, largest = [], 0
    for index, arch in enumerate(("llama", "qwen2", "llama")):
        path = root / f"tiny-{index}"
        if not (path / "config.json").exists():
            make_model(path, arch=arch, preset="tiny", seed=index)
        info = inspect_model_dir(str(path), [root], "float32")
        largest = max(largest, full_residency_gpu_bytes(info, 64, 1) + 64 * 1024)
        paths.append(str(path))
    return paths, largest


class ScaleRun:
    """One run of the harness against a control plane (its own, or the e2e suite's)."""

    def __init__(
        self, cfg: ScaleConfig, kubeconfig: str, workdir: Path, python: str = sys.executable
    ) -> None:
        self.cfg, self.kubeconfig, self.workdir, self.python = cfg, kubeconfig, workdir, python
        workdir.mkdir(parents=True, exist_ok=True)
        self.api = api_client(kubeconfig)
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.env = {"KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
        self.kubeconfigs = {"operator": kubeconfig, "nodes": kubeconfig}  # replaced in setup()
        self.metrics_port = _free_port()
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str]] = []
        self.operator: Process | None = None
        self.hollow: Process | None = None
        self.tracker = Tracker(self.api, cfg.namespace)
        self.applied: dict[str, float] = {}  # model name -> when its (latest) create was sent
        self._sampling = threading.Event()
        self.peak = {"operator_rss": 0, "hollow_rss": 0}

    # -- processes ------------------------------------------------------------------------------
    def start_operator(self) -> None:
        self.operator = Process(
            "operator",
            [
                str(Path(self.python).parent / "residency"),
                "operator",
                "--models-root",
                str(self.workdir / "models"),
            ],
            self.workdir / "operator.log",
            {
                **self.env,
                "KUBECONFIG": self.kubeconfigs["operator"],
                "RESIDENCY_METRICS_PORT": str(self.metrics_port),
                "RESIDENCY_CAPACITY_REQUESTS": "false",
                "RESIDENCY_HEARTBEAT_GRACE_SECONDS": str(max(40.0, 4 * self.cfg.heartbeat_seconds)),
                **(
                    {"RESIDENCY_INCREMENTAL_MIN_MODELS": str(self.cfg.incremental_min_models)}
                    if self.cfg.incremental_min_models is not None
                    else {}
                ),
            },
        ).start()

    def setup(self) -> None:
        cfg = self.cfg
        self.paths, per_model = make_models(self.workdir / "models")
        per_node = math.ceil(1.5 * cfg.models / cfg.nodes) + 2
        gpu_mib = math.ceil(per_node * per_model / 2**20) + 1
        self.gpu_mib = gpu_mib
        try:
            self.core.create_namespace({"metadata": {"name": cfg.namespace}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        if cfg.identities == "service-accounts":
            self.kubeconfigs = service_account_kubeconfigs(
                self.api, self.kubeconfig, cfg.namespace, self.workdir / "identities"
            )
            if cfg.lease_priority:
                # the Leases in a priority level of their own, as the chart installs it (apiPriority)
                create_lease_flow_schema(self.api, cfg.namespace, "default")
        names = [f"{cfg.node_prefix}{i:04d}" for i in range(cfg.nodes)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(self._create_node, names))
        self.hollow = Process(
            "hollow",
            [
                self.python,
                "-m",
                "residency_worker.hollow",
                "--nodes",
                str(cfg.nodes),
                "--prefix",
                cfg.node_prefix,
                "--gpu-memory-mib",
                str(gpu_mib),
                "--load-seconds",
                str(cfg.load_seconds),
                "--heartbeat-seconds",
                str(cfg.heartbeat_seconds),
                "--state-file",
                str(self.workdir / "hollow-state.json"),
            ],
            self.workdir / "hollow.log",
            {**self.env, "KUBECONFIG": self.kubeconfigs["nodes"]},
        ).start()
        self.start_operator()
        self.tracker.start()
        threading.Thread(target=self._sample_loop, daemon=True).start()
        self._wait(lambda: self._profiles() >= cfg.nodes, 300, "every hollow node's NodeProfile")
        self.mark("nodes registered")

    def _create_node(self, name: str) -> None:
        body = {"metadata": {"name": name, "labels": {"residency.dev/gpu": "true", "scale": "hollow"}}}
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _profiles(self) -> int:
        items = self.custom.list_cluster_custom_object(GROUP, VERSION, "nodeprofiles")["items"]
        return sum(1 for p in items if p["metadata"]["name"].startswith(self.cfg.node_prefix))

    def teardown(self) -> None:
        self.tracker.stop.set()
        self._sampling.set()
        for proc in (self.operator, self.hollow):
            if proc is not None:
                proc.stop()

    def cleanup(self) -> None:
        """Removes what the run created (for a shared control plane)."""
        remove_bindings(self.api, self.cfg.namespace)
        self.custom.delete_collection_namespaced_custom_object(
            GROUP, VERSION, self.cfg.namespace, "llmmodels"
        )
        selector = f"residency.dev/model-namespace={self.cfg.namespace}"
        for item in self.custom.list_cluster_custom_object(
            GROUP, VERSION, "modelplacements", label_selector=selector
        )["items"]:
            self._drop(
                lambda n=item["metadata"]["name"]: self.custom.patch_cluster_custom_object(
                    GROUP, VERSION, "modelplacements", n, {"metadata": {"finalizers": None}}
                )
            )
            self._drop(
                lambda n=item["metadata"]["name"]: self.custom.delete_cluster_custom_object(
                    GROUP, VERSION, "modelplacements", n
                )
            )
        for item in self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.cfg.namespace, "llmmodels"
        )["items"]:
            self._drop(
                lambda n=item["metadata"]["name"]: self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, self.cfg.namespace, "llmmodels", n, {"metadata": {"finalizers": None}}
                )
            )
        self.core.delete_collection_node(label_selector="scale=hollow")
        for i in range(self.cfg.nodes):
            self._drop(
                lambda n=f"{self.cfg.node_prefix}{i:04d}": self.custom.delete_cluster_custom_object(
                    GROUP, VERSION, "nodeprofiles", n
                )
            )
        coordination = client.CoordinationV1Api(self.api)
        leases = coordination.list_namespaced_lease("default", label_selector="residency.dev/node-lease")
        for lease in leases.items:
            if (lease.spec.holder_identity or "").startswith(self.cfg.node_prefix):
                self._drop(lambda n=lease.metadata.name: coordination.delete_namespaced_lease(n, "default"))
        self._drop(lambda: self.core.delete_namespace(self.cfg.namespace))

    @staticmethod
    def _drop(call: Callable[[], Any]) -> None:
        try:
            call()
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- sampling -------------------------------------------------------------------------------
    def sample(self) -> Sample:
        requests, db_bytes = scrape_apiserver(self.api)
        operator_rss = rss_bytes(self.operator.pid) if self.operator else 0
        hollow_rss = rss_bytes(self.hollow.pid) if self.hollow else 0
        self.peak["operator_rss"] = max(self.peak["operator_rss"], operator_rss)
        self.peak["hollow_rss"] = max(self.peak["hollow_rss"], hollow_rss)
        sample = Sample(
            time.time(), requests, db_bytes, scrape_operator(self.metrics_port), operator_rss, hollow_rss
        )
        self.samples.append(sample)
        return sample

    def _sample_loop(self) -> None:
        while not self._sampling.wait(5.0):
            try:
                self.sample()
            except Exception as exc:  # a restart of the API server: the next sample will do
                print(f"sample failed: {exc!r}", file=sys.stderr)

    def mark(self, what: str) -> None:
        self.marks.append((time.time(), what))
        print(f"[scale] {time.strftime('%H:%M:%S')} {what}", flush=True)

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
        started = time.time()
        while not condition():
            if time.time() - started > timeout:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(0.5)
        return time.time() - started

    # -- load -----------------------------------------------------------------------------------
    def apply(self, index: int, slo: float = 5.0) -> None:
        name = f"m-{index:05d}"
        body = model_manifest(name, self.paths[index % len(self.paths)], index, slo)
        self.applied[name] = time.time()
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.cfg.namespace, "llmmodels", body)

    def all_ready(self, names: list[str]) -> bool:
        return all(self.tracker.uid.get(n) in self.tracker.ready for n in names)

    def run_waves(self, result: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        waves = [list(range(i, min(i + cfg.wave, cfg.models))) for i in range(0, cfg.models, cfg.wave)]
        kill_after = (len(waves) - 1) // 2 if cfg.kill_operator else -1
        out: dict[str, Any] = {"waves": [], "restart": None}
        result["waves"] = out["waves"]  # (filled as they complete)
        applied: list[str] = []
        for number, wave in enumerate(waves):
            start = self.sample()
            self.mark(f"wave {number + 1}/{len(waves)}: applying {len(wave)} models")
            restarted_at = None
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(self.apply, wave))
            names = [f"m-{i:05d}" for i in wave]
            applied += names
            if number == kill_after + 1 and out["restart"] is not None:
                restarted_at = out["restart"]["restarted_at"]
            seconds = self._wait(
                lambda a=applied: self.all_ready(a), cfg.wave_timeout_seconds, f"wave {number + 1} Ready"
            )
            end = self.sample()
            placed = [self.tracker.placed[self.tracker.uid[n]] - self.applied[n] for n in names]
            ready = [self.tracker.ready[self.tracker.uid[n]] - self.applied[n] for n in names]
            window = rates(start, end)
            out["waves"].append(
                {
                    "models": len(wave),
                    "after_operator_restart": restarted_at is not None,
                    "seconds_to_all_ready": round(seconds, 2),
                    "apply_to_placement": summary(placed),
                    "apply_to_ready": summary(ready),
                    "requests_per_second": window,
                    "writes_per_second": writes_per_second(window),
                    "operator_rounds": round_stats(start, end),
                }
            )
            if restarted_at is not None:
                out["restart"]["converged_seconds_after_restart"] = round(time.time() - restarted_at, 2)
            self.mark(f"wave {number + 1} Ready in {seconds:.1f} s")
            if number == kill_after and number + 1 < len(waves):
                out["restart"] = self.kill_operator()
        if out["restart"] is not None and "converged_seconds_after_restart" not in out["restart"]:
            out["restart"]["converged_seconds_after_restart"] = 0.0
        return out

    def kill_operator(self) -> dict[str, Any]:
        """SIGKILL the operator (its Lease stays held until it expires) and start a new one."""
        assert self.operator is not None
        deleted_before = len(self.tracker.placement_deleted)
        self.operator.kill()
        self.mark("operator killed")
        time.sleep(2.0)
        self.start_operator()
        self.mark("operator restarted")
        return {"restarted_at": time.time(), "placements_deleted_before": deleted_before}

    def settle(self, limit_seconds: float = 90.0, window_seconds: float = 5.0) -> float:
        """Waits until the last wave's work is done (its Events, statuses and workers' reports): a window
        with no operator round and API writes at most 1.2 x the Lease renewals; at most ``limit_seconds``
        (a system that never quiets down is measured as it is). Returns the seconds waited."""
        began = time.time()
        renewals = self.cfg.nodes / self.cfg.heartbeat_seconds
        previous = self.sample()
        while time.time() - began < limit_seconds:
            time.sleep(window_seconds)
            current = self.sample()
            quiet = round_stats(previous, current)["rounds"] == 0
            if quiet and writes_per_second(rates(previous, current)) <= 1.2 * renewals:
                break
            previous = current
        return round(time.time() - began, 1)

    def steady(self) -> dict[str, Any]:
        settled = self.settle()
        self.mark(f"settled after {settled:.0f} s")
        start = self.sample()
        self.mark(f"steady state for {self.cfg.steady_seconds:.0f} s")
        time.sleep(self.cfg.steady_seconds)
        end = self.sample()
        window = rates(start, end)
        lease_renewals = self.cfg.nodes / self.cfg.heartbeat_seconds
        return {
            "settle_seconds": settled,
            "seconds": round(end.t - start.t, 1),
            "requests_per_second": window,
            "writes_per_second": writes_per_second(window),
            "node_heartbeats_per_second": round(lease_renewals, 3),
            "writes_over_heartbeats": round(writes_per_second(window) / lease_renewals, 3),
            "operator_rounds": round_stats(start, end),
            "operator_rss_bytes": end.operator_rss,
            "hollow_rss_bytes": end.hollow_rss,
            "etcd_db_bytes": end.db_bytes,
        }

    def changes(self) -> dict[str, Any]:
        """One model at a time: an SLO change, a priority change, a delete and re-apply."""
        kinds = ("slo", "priority", "recreate")
        latencies: dict[str, list[float]] = {k: [] for k in kinds}
        start = self.sample()
        self.mark(f"{self.cfg.changes} single-model changes")
        began = time.time()
        for number in range(self.cfg.changes):
            if time.time() - began > self.cfg.changes_seconds:
                self.mark(f"changes stopped after {number} ({self.cfg.changes_seconds:.0f} s budget)")
                break
            kind = kinds[number % len(kinds)]
            index = (number * 7919) % self.cfg.models
            name = f"m-{index:05d}"
            uid = self.tracker.uid[name]
            sent = time.time()
            if kind == "slo":
                slo = 5.0 + (number + 1) * 0.25
                body = self.custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.cfg.namespace,
                    "llmmodels",
                    name,
                    {"spec": {"slo": {"minDecodeTokensPerSecond": slo}}},
                )
                self._wait(lambda u=uid, s=slo: (u, s) in self.tracker.slo_seen, 120, f"SLO of {name}")
                latencies[kind].append(self.tracker.slo_seen[(uid, slo)] - sent)
            elif kind == "priority":
                body = self.custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.cfg.namespace,
                    "llmmodels",
                    name,
                    {"spec": {"priority": 100 + number}},
                )
                key = (uid, int(body["metadata"]["generation"]))
                self._wait(lambda k=key: k in self.tracker.observed, 120, f"priority of {name}")
                latencies[kind].append(self.tracker.observed[key] - sent)
            else:
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.cfg.namespace, "llmmodels", name
                )
                self._wait(lambda n=name: n not in self.tracker.phase, 120, f"deletion of {name}")
                self.apply(index)
                self._wait(
                    lambda n=name, u=uid: self.tracker.uid.get(n, u) != u
                    and self.tracker.uid[n] in self.tracker.placed,
                    120,
                    f"re-apply of {name}",
                )
                latencies[kind].append(self.tracker.placed[self.tracker.uid[name]] - self.applied[name])
            time.sleep(0.5)
        end = self.sample()
        return {
            "change_to_effect": {k: summary(v) for k, v in latencies.items()},
            "all": summary([x for v in latencies.values() for x in v]),
            "operator_rounds": round_stats(start, end),
            "writes_per_second": writes_per_second(rates(start, end)),
        }

    def check(self) -> dict[str, Any]:
        """Every model placed once, and held by exactly the hollow node its placement names."""
        state_file = self.workdir / "hollow-state.json"

        def verdict() -> dict[str, Any]:
            models = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.cfg.namespace, "llmmodels"
            )["items"]
            selector = f"residency.dev/model-namespace={self.cfg.namespace}"
            placements = self.custom.list_cluster_custom_object(
                GROUP, VERSION, "modelplacements", label_selector=selector
            )["items"]
            where = {
                p["spec"]["model"]["name"]: p["spec"]["nodeName"]
                for p in placements
                if p["spec"].get("desiredState") == "Loaded"
            }
            held: dict[str, list[str]] = {}
            for node, names in json.loads(state_file.read_text()).items():
                for key in names:
                    held.setdefault(key.split("/", 1)[1], []).append(node)
            names = {m["metadata"]["name"] for m in models}
            lost = sorted(n for n in names if n not in where or held.get(n) != [where[n]])
            doubled = sorted(n for n, nodes in held.items() if len(nodes) > 1)
            return {"models": len(names), "placements": len(placements), "lost": lost, "doubled": doubled}

        result = verdict()
        deadline = time.time() + 60
        while (result["lost"] or result["doubled"]) and time.time() < deadline:
            time.sleep(3)  # the hollow state file is rewritten every 2 s
            result = verdict()
        return {
            **{k: v for k, v in result.items() if k not in ("lost", "doubled")},
            "lost": len(result["lost"]),
            "doubled": len(result["doubled"]),
            "lost_examples": result["lost"][:10],
            "doubled_examples": result["doubled"][:10],
        }

    def run(self) -> dict[str, Any]:
        """Every phase in turn; interrupted (SIGTERM, a wave that never converges), it returns what it
        measured so far, marked ``incomplete``."""
        started = time.time()
        result: dict[str, Any] = {"config": asdict(self.cfg)}
        phase = "setup"
        try:
            self.setup()
            result["gpu_memory_mib_per_node"] = self.gpu_mib
            phase = "waves"
            waves = self.run_waves(result)
            restart = waves.pop("restart")
            if restart is not None:
                restart["placements_deleted_while_restarting"] = len(
                    self.tracker.placement_deleted
                ) - restart.pop("placements_deleted_before")
                restart.pop("restarted_at")
            result["operator_restart"] = restart
            phase = "steady state"
            result["steady_state"] = self.steady()
            phase = "changes"
            result["changes"] = self.changes()
            phase = "placement check"
            result["placements"] = self.check()
            self.mark("done")
        except (Interrupted, TimeoutError) as exc:
            result["incomplete"] = f"stopped during {phase}: {exc!r}"
            self.mark(result["incomplete"])
        result.update(
            {
                "peak_rss_bytes": dict(self.peak),
                "etcd_db_bytes": self.samples[-1].db_bytes if self.samples else None,
                "seconds": round(time.time() - started, 1),
                "timeline": [
                    {
                        "t": round(s.t - started, 1),
                        "writes": _total(s, WRITE_VERBS),
                        "reads": _total(s, frozenset({"GET", "LIST"})),
                        "rounds": s.operator.get("residency_plan_seconds_count", 0),
                        "operator_rss": s.operator_rss,
                    }
                    for s in self.samples
                ],
                "marks": [{"t": round(t - started, 1), "what": w} for t, w in self.marks],
            }
        )
        return result


class Interrupted(Exception):
    """SIGTERM (a time bound ran out): stop and report what was measured."""


def _interrupt(*_: Any) -> None:
    raise Interrupted("SIGTERM")


def _total(sample: Sample, verbs: frozenset[str]) -> float:
    return sum(v for (verb, _), v in sample.requests.items() if verb in verbs)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_plot(result: dict[str, Any], path: Path) -> None:
    """API requests/s over the run (writes, reads) with the phases marked, and operator rounds/min."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for key, color in (("writes", "tab:red"), ("reads", "tab:blue")):
        xs = [b["t"] for b in timeline[1:]]
        ys = [(b[key] - a[key]) / max(b["t"] - a["t"], 1e-9) for a, b in itertools.pairwise(timeline)]
        top.plot(xs, ys, label=f"API {key}/s", color=color)
    rounds = [
        (b["rounds"] - a["rounds"]) / max(b["t"] - a["t"], 1e-9) * 60 for a, b in itertools.pairwise(timeline)
    ]
    bottom.plot([b["t"] for b in timeline[1:]], rounds, label="operator rounds/min", color="tab:green")
    for axis in (top, bottom):
        for mark in result["marks"]:
            axis.axvline(mark["t"], color="grey", linewidth=0.5)
        axis.legend(loc="upper right")
    top.set_title(
        f"{result['config']['nodes']} hollow nodes, {result['config']['models']} models "
        f"({result['config']['label']})"
    )
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(runs: list[dict[str, Any]]) -> str:
    """One markdown row per run: the figures docs/scale.md quotes."""
    head = (
        "| run | nodes | models | wave apply→placement p50 / p99 (s) | apply→Ready p99 (s) | "
        "change→effect p50 / p99 (s) | restart: converged (s), placements deleted | steady writes/s "
        "(÷ lease renewals) | steady reads/s | rounds/min steady | round mean (s) | operator RSS peak | "
        "etcd db | lost / doubled | writes per model (waves) |\n|" + " --- |" * 15
    )
    rows = [head]
    for r in sorted(runs, key=lambda r: (r["config"]["nodes"], r["config"]["label"])):
        if "steady_state" not in r:
            continue  # stopped before the end (its JSON says where: "incomplete")
        waves = [w for w in r["waves"] if not w["after_operator_restart"]]
        steady, changes, restart = r["steady_state"], r["changes"]["all"], r["operator_restart"] or {}
        reads = sum(v for k, v in steady["requests_per_second"].items() if k.split(" ")[0] in ("GET", "LIST"))
        rounds = [w["operator_rounds"]["mean_seconds"] or 0 for w in r["waves"]]
        per_model = [writes_per_model(w["requests_per_second"]) for w in r["waves"]]
        rows.append(
            f"| {r['config']['label']} | {r['config']['nodes']} | {r['config']['models']} | "
            f"{max(w['apply_to_placement']['p50'] or 0 for w in waves):.1f} / "
            f"{max(w['apply_to_placement']['p99'] or 0 for w in waves):.1f} | "
            f"{max(w['apply_to_ready']['p99'] or 0 for w in waves):.1f} | "
            f"{changes['p50']} / {changes['p99']} | "
            f"{restart.get('converged_seconds_after_restart', '-')}, "
            f"{restart.get('placements_deleted_while_restarting', '-')} | "
            f"{steady['writes_per_second']:.1f} ({steady['writes_over_heartbeats']:.2f}) | {reads:.1f} | "
            f"{steady['operator_rounds']['rounds_per_minute']:.1f} | "
            f"{(max(rounds) if rounds else 0):.2f} | {r['peak_rss_bytes']['operator_rss'] / 2**20:.0f} MiB | "
            f"{(r['etcd_db_bytes'] or 0) / 2**20:.0f} MiB | "
            f"{r['placements']['lost']} / {r['placements']['doubled']} | "
            f"{' / '.join(f'{x:.1f}' for x in per_model if x is not None)} |"
        )
    return "\n".join(rows)


def write_summary(paths: list[Path], out: Path) -> None:
    """Steady-state writes/s and wave apply->placement p99 against fleet size, per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in sorted({r["config"]["label"] for r in runs}):
        mine = sorted(
            (r for r in runs if r["config"]["label"] == label and "steady_state" in r),
            key=lambda r: r["config"]["nodes"],
        )
        nodes = [r["config"]["nodes"] for r in mine]
        left.plot(nodes, [r["steady_state"]["writes_per_second"] for r in mine], "o-", label=label)
        right.plot(
            nodes,
            [max(w["apply_to_placement"]["p99"] or 0 for w in r["waves"]) for r in mine],
            "o-",
            label=label,
        )
    left.set(xlabel="hollow nodes", ylabel="API writes/s at steady state")
    right.set(xlabel="hollow nodes", ylabel="apply -> placement p99 (s), worst wave")
    left.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def install_crds(kubeconfig: str) -> None:
    """The CRDs from crds/, created and Established (the Python client: no kubectl needed)."""
    import yaml

    extensions = client.ApiextensionsV1Api(api_client(kubeconfig))
    names = []
    for path in sorted((REPO / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        names.append(body["metadata"]["name"])
        try:
            extensions.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    deadline = time.time() + 60
    for name in names:
        while True:
            conditions = extensions.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.time() > deadline:
                raise TimeoutError(f"CRD {name} not Established")
            time.sleep(0.5)
    time.sleep(2.0)  # discovery of the new kinds lags Established by a moment


def cluster_env(workdir: Path, api_port: str, etcd_port: str) -> dict[str, str]:
    """hack/cluster.sh's settings for a benchmark's own etcd + kube-apiserver in `workdir`, without the
    controllers (only what residency puts on the API server is measured), on its own ports by default,
    beside a `make cluster` on the usual ones (RESIDENCY_API_PORT / RESIDENCY_ETCD_PORT override them)."""
    return {
        "RESIDENCY_CLUSTER_DIR": str(workdir / "cluster"),
        "RESIDENCY_CLUSTER_CONTROLLERS": "false",
        "RESIDENCY_API_PORT": os.environ.get("RESIDENCY_API_PORT", api_port),
        "RESIDENCY_ETCD_PORT": os.environ.get("RESIDENCY_ETCD_PORT", etcd_port),
    }


def cluster(action: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(REPO / "hack/cluster.sh"), action],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"hack/cluster.sh {action}: {out.stderr}")
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument(
        "--wave", type=int, default=0, help="models per wave (default: a quarter, at most 1000)"
    )
    parser.add_argument("--changes", type=int, default=21)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=10.0,
        help="node Lease renewal period (the worker default)",
    )
    parser.add_argument("--label", default="run")
    parser.add_argument(
        "--identities",
        choices=("service-accounts", "admin"),
        default="service-accounts",
        help="the operator and the nodes each under a ServiceAccount, as in a cluster (the API server's "
        "fairness applies), or everyone as the admin certificate (exempt from it: arrival order)",
    )
    parser.add_argument(
        "--no-lease-priority",
        action="store_true",
        help="without the chart's FlowSchema (apiPriority): the Lease renewals queue with every other "
        "request of their ServiceAccount (every run before 2026-12-08)",
    )
    parser.add_argument(
        "--incremental-min-models",
        type=int,
        default=None,
        help="fleet size from which the operator plans single-model changes incrementally (default 2000)",
    )
    parser.add_argument("--workdir", type=Path, default=REPO / ".scale")
    parser.add_argument("--keep-cluster", action="store_true")
    parser.add_argument("--summary", action="store_true", help="only plot benchmarks/results/scale-*.json")
    args = parser.parse_args()
    if args.summary:
        paths = sorted(RESULTS.glob("scale-*n-*m-*.json"))
        write_summary(paths, RESULTS / "scale-summary.png")
        print(table([json.loads(p.read_text()) for p in paths]))
        print(RESULTS / "scale-summary.png")
        return
    cfg = ScaleConfig(
        nodes=args.nodes,
        models=args.models,
        wave=args.wave or min(1000, max(1, args.models // 4)),
        changes=args.changes,
        steady_seconds=args.steady_seconds,
        heartbeat_seconds=args.heartbeat_seconds,
        label=args.label,
        incremental_min_models=args.incremental_min_models,
        identities=args.identities,
        lease_priority=not args.no_lease_priority,
    )
    env = cluster_env(args.workdir, api_port="16643", etcd_port="23990")
    cluster("down", env)
    kubeconfig = cluster("up", env).split("=", 1)[1]
    install_crds(kubeconfig)
    run = ScaleRun(cfg, kubeconfig, args.workdir)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run.run()
    finally:
        run.teardown()
        if not args.keep_cluster:
            cluster("down", env)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"scale-{cfg.nodes}n-{cfg.models}m-{cfg.label}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, stem.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("timeline", "marks")}, indent=2))
    print(table([result]) if "placements" in result else f"incomplete: {result.get('incomplete')}")
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
