"""Hollow workers (like kubemark's hollow nodes): many node agents in one process, with no torch engine.

Each hollow node is a real :class:`~residency_worker.agent.NodeAgent` on the real API server: it registers
a NodeProfile with stated GPU sizes, renews its node Lease, watches its placements and reports them as
real workers do. Only the engine is hollow: a load is acknowledged after a synthetic load time and holds
no memory. The scale harness (benchmarks/bench_scale.py) runs hundreds of them to load the control plane
as a fleet would.

    python -m residency_worker.hollow --nodes 100 --prefix hollow- --gpu-memory-mib 512
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubernetes import client

from residency.kubeapi import TimeoutApiClient
from residency_worker.agent import NodeAgent
from residency_worker.engine import Engine, EngineError
from residency_worker.engine.observed import StepWindow
from residency_worker.engine.types import (
    ModelStatus,
    ModelTimings,
    NodeReport,
    ObservedDemand,
    ResidencyReport,
)
from residency_worker.presence import AgentConfig

log = logging.getLogger("residency.hollow")
MIB = 2**20


@dataclass
class HollowTier:
    """The engine's GPU tier, as far as the agent reads it: a stated budget, nothing allocated."""

    budget_bytes: int
    held: dict[str, int] = field(default_factory=dict)
    index: int = 0
    lost: str | None = None
    emulated: bool = True

    def reserved_bytes(self, owner: str | None = None) -> int:
        return self.held.get(owner, 0) if owner is not None else sum(self.held.values())


@dataclass
class HollowRunner:
    owner: str
    loaded_at: float
    last_request_time: float
    observed_steps: StepWindow = field(default_factory=StepWindow)  # a hollow model decodes nothing

    def demand(self) -> ObservedDemand:
        return ObservedDemand(0.0, 0.0, None, 60.0, time.time() - self.loaded_at)


@dataclass
class _Held:
    path: str
    fraction: float
    mode: str
    state: str
    runner: HollowRunner
    load_seconds: float


class HollowEngine:
    """The public methods of :class:`~residency_worker.engine.Engine` that the agent calls, without torch:
    a load sleeps ``load_seconds`` and succeeds; nothing is allocated."""

    def __init__(self, node: str, budget_bytes: int, load_seconds: float) -> None:
        self.node = node
        self.tier = HollowTier(budget_bytes)
        self.tiers = [self.tier]
        self.load_seconds = load_seconds
        self._models: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: str, options: Any = None) -> None:
        if name in self._models:
            raise EngineError("AlreadyLoaded", f"{name} is already loaded")
        time.sleep(self.load_seconds)
        now = time.time()
        with self._lock:
            self._models[name] = _Held(
                path,
                float(getattr(options, "resident_fraction", 1.0)),
                str(getattr(options, "decode_mode", "stream")),
                "ready",
                HollowRunner(name, now, now),
                self.load_seconds,
            )

    def unload(self, name: str) -> None:
        with self._lock:
            if self._models.pop(name, None) is None:
                raise EngineError("NotLoaded", f"{name} is not loaded")

    def preempt(self, name: str) -> None:
        self._held(name).state = "preempted"

    def resume(self, name: str) -> None:
        time.sleep(self.load_seconds / 4)
        self._held(name).state = "ready"

    def set_residency(self, name: str, fraction: float, decode_mode: str = "stream", **_: Any) -> None:
        held = self._held(name)
        held.fraction, held.mode = fraction, decode_mode

    def set_decode_slo(self, name: str, min_decode_tokens_per_second: float | None) -> None:
        self._held(name)

    def check_gpus(self) -> bool:
        return False  # a hollow GPU is never lost

    def gpu_budget_bytes(self) -> int:
        return self.tier.budget_bytes

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def runner(self, name: str) -> HollowRunner:
        return self._held(name).runner

    def residency(self, name: str) -> ResidencyReport:
        held = self._held(name)
        return ResidencyReport(
            model=name,
            requested_fraction=held.fraction,
            resident_fraction=held.fraction,
            resident_weight_bytes=0,
            weight_bytes=0,
            resident_units=[],
            offloaded_units=[],
            decode_mode=held.mode,  # type: ignore[arg-type]
            prefill_mode="stream",
            gpu_reserved_bytes=0,
            kv_reserved_bytes=0,
            emulated=True,
        )

    def status(self, name: str) -> ModelStatus:
        held = self._held(name)
        return ModelStatus(
            name=name,
            path=held.path,
            state=held.state,  # type: ignore[arg-type]
            queue_depth=0,
            active_sequences=0,
            residency=self.residency(name),
            timings=ModelTimings(load_seconds=held.load_seconds, emulated=True),
        )

    def node_report(self) -> NodeReport:
        return NodeReport(
            node=self.node,
            device="hollow",
            gpu_name="hollow",
            emulated=True,
            budget_bytes=self.tier.budget_bytes,
            reserved_bytes=0,
            allocated_bytes=0,
            host_to_device_peak=None,
        )

    def _held(self, name: str) -> _Held:
        held = self._models.get(name)
        if held is None:
            raise EngineError("NotLoaded", f"{name} is not loaded")
        return held


class HollowAgent(NodeAgent):
    """A node agent whose profile is stated, not measured (there is no device to measure)."""

    def profile_spec(self) -> dict[str, Any]:
        if self._profile_spec is None:
            self._profile_spec = {
                "nodeName": self.config.node,
                "gpuType": "hollow",
                "gpuCount": 1,
                "gpuMemoryBytes": self.engine.tier.budget_bytes,
                "hostMemoryBytes": self.config.host_memory_bytes,
                "hostToDeviceGbps": 25.0,
                "hbmGbps": 2000.0,
                "hostMemoryGbps": 20.0,
                "emulated": True,
                "workerEndpoint": self.config.endpoint,
            }
        return self._profile_spec


def shared_api_client(pool_size: int) -> TimeoutApiClient:
    """One API client for every hollow agent, with a connection pool large enough that no call waits
    for a new TLS handshake."""
    api = TimeoutApiClient()
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = pool_size
    return api


def hollow_agents(
    names: list[str],
    gpu_memory_bytes: int,
    load_seconds: float,
    heartbeat_seconds: float,
    poll_seconds: float | None = None,
    lease_namespace: str = "default",
) -> list[HollowAgent]:
    """``poll_seconds`` (default: ``heartbeat_seconds``): between sync passes without a placement change. A
    hollow engine has no news of its own, and a pass is where a hollow agent renews its Lease, so one pass
    a renewal period: a thousand agents waking twice as often cost the harness CPU the API server needs."""
    # A connection for each agent's placement watch, which holds one for as long as it runs, and one for
    # its other calls, as each real worker has: with fewer, a call finds the pool empty, opens a new
    # connection (a TLS handshake on both sides) and drops it after, and at 1000 nodes those handshakes
    # took most of the harness's CPU.
    api = shared_api_client(2 * len(names) + 8)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    coordination = client.CoordinationV1Api(api)
    agents = []
    for name in names:
        config = AgentConfig(
            node=name,
            endpoint=f"http://hollow.invalid/{name}",
            host_memory_bytes=64 * 2**30,
            heartbeat_seconds=heartbeat_seconds,
            # Between sync passes, not on a thread per agent: with one (3000 threads in this one process on
            # the harness's 2 cores) the Leases went unrenewed for minutes in each of three runs at 1000
            # nodes (renew-s38, final-s38), and a hollow load (0.5 s) is far under the grace.
            lease_thread=False,
            # no traffic in a hollow engine: placement changes wake it
            poll_seconds=heartbeat_seconds if poll_seconds is None else poll_seconds,
            lease_namespace=lease_namespace,
        )
        engine = cast(Engine, HollowEngine(name, gpu_memory_bytes, load_seconds))
        agents.append(HollowAgent(engine, config, custom=custom, core=core, coordination=coordination))
    return agents


def holdings(agents: list[HollowAgent]) -> dict[str, list[str]]:
    """Node -> models its hollow engine holds now (what the harness checks for lost or doubled loads)."""
    return {a.config.node: a.engine.names() for a in agents}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--prefix", default="hollow-")
    parser.add_argument("--gpu-memory-mib", type=int, default=512)
    parser.add_argument("--load-seconds", type=float, default=0.5)
    parser.add_argument("--heartbeat-seconds", type=float, default=AgentConfig.heartbeat_seconds)
    parser.add_argument("--state-file", type=Path, help="write node -> held models here every few seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from residency_worker.node import load_kube_config

    load_kube_config()
    names = [f"{args.prefix}{i:04d}" for i in range(args.nodes)]
    agents = hollow_agents(names, args.gpu_memory_mib * MIB, args.load_seconds, args.heartbeat_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = [
        threading.Thread(target=a.run, args=(stop,), name=f"hollow-{a.config.node}", daemon=True)
        for a in agents
    ]
    for thread in threads:
        thread.start()
    log.warning("%d hollow nodes running (pid %d)", len(agents), os.getpid())
    while not stop.wait(2.0):
        if args.state_file is not None:
            tmp = args.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(holdings(agents)))
            tmp.replace(args.state_file)
    for thread in threads:
        thread.join(timeout=5)


if __name__ == "__main__":
    main()
