"""Fault injection and measurement for the reliability e2e tests (faults and load).

A pausable TCP proxy (a network partition without root), an in-process Kubernetes client for fast
sampling, samplers of the workers' reported bytes and of process RSS, and small HTTP client helpers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import httpx
import yaml
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException

from conftest import ADMIN_TOKEN, GpuNode, NodePool
from harness import SMALL_LIMITS, Process, Sampler, llm, wait_for

GROUP, VERSION = "residency.dev", "v1alpha1"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


class Recorder(Protocol):
    """The root conftest's `reliability` fixture: one row of the reliability table."""

    def record(self, injected: str | None = None, measured: str | None = None) -> None: ...


def small_llm(name: str, path: Path | str, **spec: Any) -> dict[str, Any]:
    """An LLMModel manifest with the small KV limits the e2e suite sizes its node budgets around."""
    return llm(name, path, **{**SMALL_LIMITS, **spec})


# -- the API server, in process (kubectl costs a process per call; samplers call often) ----------------------
class Api:
    """A kubernetes client on the test's kubeconfig: cheap enough to poll several times a second."""

    def __init__(self, kubeconfig: str) -> None:
        self.api_client = kconfig.new_client_from_config(config_file=kubeconfig)
        self.custom = kclient.CustomObjectsApi(self.api_client)
        self.core = kclient.CoreV1Api(self.api_client)

    def placements(self, namespace: str | None = None) -> list[dict[str, Any]]:
        selector = f"residency.dev/model-namespace={namespace}" if namespace else None
        result = self.custom.list_cluster_custom_object(
            GROUP, VERSION, "modelplacements", label_selector=selector, _request_timeout=10
        )
        return list(result.get("items", []))

    def models(self, namespace: str) -> list[dict[str, Any]]:
        result = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "llmmodels", _request_timeout=10
        )
        return list(result.get("items", []))

    def model(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "llmmodels", name, _request_timeout=10
        )
        return result

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.model(namespace, name).get("status") or {})

    def profiles(self) -> list[dict[str, Any]]:
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, "nodeprofiles", _request_timeout=10)
        return list(result.get("items", []))

    def profile(self, node: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_cluster_custom_object(
                GROUP, VERSION, "nodeprofiles", node, _request_timeout=10
            )
            return result
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def phases(self, namespace: str) -> dict[str, str]:
        return {
            m["metadata"]["name"]: (m.get("status") or {}).get("phase", "") for m in self.models(namespace)
        }

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}", _request_timeout=10
        ).items
        return [self.api_client.sanitize_for_serialization(e) for e in items]

    def close(self) -> None:
        self.api_client.close()


def all_ready(api: Api, namespace: str, names: list[str] | None = None) -> bool:
    phases = api.phases(namespace)
    wanted = names if names is not None else list(phases)
    return bool(wanted) and all(phases.get(n) == "Ready" for n in wanted)


def apply_many(manifests: list[dict[str, Any]], namespace: str) -> None:
    """One `kubectl apply` for many objects (a v1 List)."""
    from harness import kubectl

    kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": manifests}),
        timeout=120,
    )


# -- a pausable TCP proxy: a network partition without iptables ----------------------------------------------
class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of one target, that can be paused.

    While paused no byte moves in either direction and new connections are accepted but not forwarded:
    what a partition looks like to both ends (nothing is reset; TCP would retransmit). On resume the held
    bytes flow on. TLS passes through untouched, so clients still verify the API server's certificate.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self.paused_seconds = 0.0
        self._paused_at: float | None = None
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._ready = threading.Event()

    def start(self) -> TcpProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._open = asyncio.Event()
        self._open.set()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, reuse_address=True)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self.connections += 1
        self._writers.add(writer)
        await self._open.wait()  # a new connection during the partition hangs, like an unanswered SYN
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(upstream_writer)
        await asyncio.gather(
            self._pump(reader, upstream_writer), self._pump(upstream_reader, writer), return_exceptions=True
        )
        self._writers.discard(writer)
        self._writers.discard(upstream_writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        try:
            while data := await reader.read(65536):
                await self._open.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def pause(self) -> None:
        assert self._open is not None
        self._paused_at = time.monotonic()
        self._loop.call_soon_threadsafe(self._open.clear)

    def resume(self) -> None:
        assert self._open is not None
        if self._paused_at is not None:
            self.paused_seconds += time.monotonic() - self._paused_at
            self._paused_at = None
        self._loop.call_soon_threadsafe(self._open.set)

    def stop(self) -> None:
        """Closes the listener and every proxied connection."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _shutdown(self) -> None:
        assert self._open is not None
        if self._server is not None:
            self._server.close()
        self._open.set()
        for writer in list(self._writers):
            writer.transport.abort()  # both pumps of each connection end on the reset
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        if pending:
            await asyncio.wait(pending, timeout=5)


def proxied_kubeconfig(kubeconfig: str, proxy_port: int, out: Path) -> Path:
    """The kubeconfig with the proxy as server (the certificate names 127.0.0.1: TLS still checks)."""
    doc = yaml.safe_load(Path(kubeconfig).read_text())
    for entry in doc["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{proxy_port}"
    out.write_text(yaml.safe_dump(doc))
    return out


def api_server_port(kubeconfig: str) -> int:
    doc = yaml.safe_load(Path(kubeconfig).read_text())
    return int(doc["clusters"][0]["cluster"]["server"].rsplit(":", 1)[1].rstrip("/"))


def add_node_via(pool: NodePool, name: str, gpu_memory: str, kubeconfig: Path) -> GpuNode:
    """A GPU node whose worker reaches the API server through `kubeconfig` (e.g. a proxy's)."""
    saved = pool.cluster
    pool.cluster = str(kubeconfig)  # NodePool.add gives the worker this kubeconfig
    try:
        return pool.add(name, gpu_memory)
    finally:
        pool.cluster = saved


def start_operator(
    cluster: str, models_root: Path, log: Path, grace_seconds: float = 20, resync_seconds: float = 5
) -> Process:
    """The operator with a chosen heartbeat grace (the `operator` fixture fixes 20 s)."""
    return Process(
        "operator",
        ["operator", "--models-root", str(models_root)],
        log,
        env={
            "KUBECONFIG": cluster,
            "RESIDENCY_RESYNC_SECONDS": str(resync_seconds),
            "RESIDENCY_HEARTBEAT_GRACE_SECONDS": str(grace_seconds),
        },
    ).start()


def start_router(
    cluster: str, log: Path, hold_seconds: float = 60, extra_args: tuple[str, ...] = ()
) -> tuple[Process, str]:
    """The router as a local process (the `router` fixture's, with its Process for RSS); its base URL."""
    from conftest import free_port

    port = free_port()
    process = Process(
        "router",
        ["router", "--port", str(port), "--hold-seconds", str(hold_seconds), "--auth", "none", *extra_args],
        log,
        env={"KUBECONFIG": cluster},
    ).start()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 60, what="router /healthz")
    return process, url


# -- the workers' own reports --------------------------------------------------------------------------------
def worker_node(node: GpuNode) -> dict[str, Any]:
    """The worker's /admin/node: budget, reserved (committed) and allocated GPU bytes, measured by itself."""
    response = httpx.get(f"{node.url}/admin/node", headers=ADMIN, timeout=5)
    response.raise_for_status()
    return dict(response.json())


def worker_models(node: GpuNode) -> dict[str, str]:
    """Model → engine state on one worker ({} when it does not answer)."""
    try:
        data = httpx.get(f"{node.url}/v1/models", timeout=5).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    return {m["id"]: m["state"] for m in data}


@dataclass
class BytesWatch:
    """Samples every worker's reported budget, reserved and allocated bytes (one thread per worker, so a
    busy one does not slow the others) and the NodeProfiles and placements while a test runs; records
    every sample over a budget and every model seen on two workers at once."""

    nodes: list[GpuNode]
    api: Api | None = None
    interval: float = 0.2
    samples: int = 0
    profile_samples: int = 0
    listings: int = 0
    violations: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    placement_duplicates: list[str] = field(default_factory=list)
    peak_fraction: float = 0.0
    overlaps: dict[str, list[float]] = field(default_factory=dict)  # model → [first, last] seen twice
    _latest: dict[str, tuple[float, set[str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> BytesWatch:
        self._threads = [
            threading.Thread(target=self._watch_worker, args=(n,), name=f"watch-{n.name}", daemon=True)
            for n in self.nodes
        ]
        if self.api is not None:
            self._threads.append(threading.Thread(target=self._watch_api, name="watch-api", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    @property
    def max_overlap_seconds(self) -> float:
        """Longest a model was seen on two workers (first to last sample; 0 for a single sample)."""
        return max((last - first for first, last in self.overlaps.values()), default=0.0)

    def _watch_worker(self, node: GpuNode) -> None:
        while not self._stop.wait(self.interval):
            try:
                report = worker_node(node)
            except httpx.HTTPError:
                continue  # restarting: nothing to sample
            budget = int(report["budget_bytes"])
            used = max(int(report["reserved_bytes"]), int(report["allocated_bytes"]))
            models = {m for m, state in worker_models(node).items() if state in ("ready", "loading")}
            now = time.monotonic()
            with self._lock:
                self.samples += 1
                self.peak_fraction = max(self.peak_fraction, used / budget)
                if used > budget:
                    self.violations.append(f"worker {node.name}: {used} > {budget}")
                self._latest[node.name] = (now, models)
                for other, (when, held) in self._latest.items():
                    if other == node.name or now - when > 1.0:
                        continue
                    for model in models & held:
                        self.duplicates.append(f"{model} on {other} and {node.name}")
                        self.overlaps.setdefault(model, [now, now])[1] = now

    def _watch_api(self) -> None:
        assert self.api is not None
        while not self._stop.wait(self.interval * 4):
            with contextlib.suppress(Exception):
                names = collections.Counter(
                    (p["spec"]["model"]["namespace"], p["spec"]["model"]["name"])
                    for p in self.api.placements()
                )
                profiles = self.api.profiles()
                with self._lock:
                    self.listings += 1
                    self.placement_duplicates += [f"{k[0]}/{k[1]}" for k, n in names.items() if n > 1]
                    for profile in profiles:
                        used = int((profile.get("status") or {}).get("residentBytes") or 0)
                        budget = int(profile["spec"]["gpuMemoryBytes"])
                        self.profile_samples += 1
                        if used > budget:
                            self.violations.append(
                                f"NodeProfile {profile['metadata']['name']}: {used} > {budget}"
                            )


# -- processes -----------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssWatch(Sampler):
    """Samples the RSS of named processes; keeps each one's first and largest value."""

    def __init__(self, pids: dict[str, int], interval_seconds: float = 0.5) -> None:
        super().__init__(interval_seconds, "rss-watch")
        self.pids = pids
        self.first: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak.get(name, 0), rss_bytes(pid))

    def __enter__(self) -> Self:
        self.sample()
        self.first = dict(self.peak)
        return super().__enter__()

    def __exit__(self, *_: object) -> None:
        super().__exit__()
        self.sample()


def pid_of(process: Process) -> int:
    assert process.popen is not None
    return process.popen.pid


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# -- HTTP clients --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How one request through the router ended."""

    status: int  # HTTP status; 0 when the connection failed
    streamed: bool
    ok: bool  # a complete answer
    retryable: bool  # a 503/429 with Retry-After (or an SSE error event carrying one)
    detail: str = ""
    seconds: float = 0.0


async def completion(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, stream: bool
) -> Outcome:
    """One completion through the router, classified: complete, retryable error, or lost."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    started = time.monotonic()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                retryable = response.status_code in (429, 503) and retry_after is not None
                return Outcome(
                    response.status_code, stream, False, retryable, text, time.monotonic() - started
                )
            if not stream:
                data = json.loads(await response.aread())
                tokens = int(data["usage"]["completion_tokens"])
                return Outcome(200, False, tokens > 0, False, f"{tokens} tokens", time.monotonic() - started)
            done = False
            error: dict[str, Any] | None = None
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
            if error is not None:
                retryable = (
                    error.get("type") in ("rate_limit_error", "service_unavailable_error")
                    and error.get("retry_after") is not None
                )
                return Outcome(200, True, False, retryable, json.dumps(error), time.monotonic() - started)
            return Outcome(
                200,
                True,
                done,
                False,
                "" if done else "stream ended without [DONE]",
                time.monotonic() - started,
            )
    except httpx.HTTPError as exc:
        return Outcome(
            0, stream, False, False, f"{exc.__class__.__name__}: {exc}", time.monotonic() - started
        )


def queue_depth(metrics: httpx.Response) -> float:
    """Requests waiting on a worker, summed over its models, from its /metrics."""
    total = 0.0
    for line in metrics.text.splitlines():
        if line.startswith("residency_queue_depth{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@contextlib.contextmanager
def requests_in_background(call: Callable[[], int], pause: float = 0.05) -> Iterator[list[int]]:
    """Calls `call` in a loop on a thread while the block runs; yields the status codes it returned."""
    codes: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                codes.append(call())
            except httpx.HTTPError:
                codes.append(0)
            stop.wait(pause)

    thread = threading.Thread(target=loop, name="client", daemon=True)
    thread.start()
    try:
        yield codes
    finally:
        stop.set()
        thread.join(timeout=180)


def post_completion(url: str, model: str, prompt: str = "Reliability probe", max_tokens: int = 4) -> int:
    response = httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=120,
    )
    return response.status_code


def wait_heartbeat_after(api: Api, node: str, after_epoch: float, timeout: float) -> float:
    """Seconds until the node's worker renews its node Lease (or, without one, heartbeats in its
    NodeProfile) after `after_epoch`."""
    from datetime import datetime

    from residency_worker.presence import node_lease_name

    started = time.monotonic()
    coordination = kclient.CoordinationV1Api(api.api_client)

    def fresh() -> bool:
        try:
            lease = coordination.read_namespaced_lease(node_lease_name(node), "default", _request_timeout=10)
            renewed = lease.spec.renew_time
            return renewed is not None and renewed.timestamp() >= after_epoch
        except ApiException as exc:
            if exc.status != 404:
                return False
        profile = api.profile(node) or {}
        stamp = (profile.get("status") or {}).get("heartbeatTime")
        if not stamp:
            return False
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() >= after_epoch

    wait_for(fresh, timeout, what=f"a new heartbeat from {node}")
    return time.monotonic() - started


def environment_flag(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
