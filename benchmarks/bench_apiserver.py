"""The API server's own ceiling on this machine, and the fastest any operator could place a wave of models.

`make scale` (bench_scale.py) measures residency's operator at fleet size. This measures what no operator
design can beat on the same machine and control plane (etcd + kube-apiserver from hack/cluster.sh, the CRDs
of crds/), with the cheapest client there is (asyncio + httpx on keep-alive connections, no kubernetes
client, no watch, no planning):

1. **Capacity alone**: how many writes a second the API server takes of each kind residency makes (a node
   Lease renewal, an LLMModel create, a ModelPlacement create), from `--connections` connections at once for
   `--seconds`, and the CPU seconds etcd + kube-apiserver spent on each.
2. **A perfect operator**: for each fleet size in `--nodes`, that many node Leases are renewed every
   `--lease-seconds` (as the hollow workers do), while a wave of `--wave` LLMModels is created as fast as
   the API server takes them, and each model's ModelPlacement is created the moment its model's create
   returns (an operator that needs no event, no cache, no plan and writes nothing else). Its apply ->
   placement p50/p99 is a floor under any operator's on this machine; the lease renewals that fell behind
   are counted too (a node whose renewals fall behind is one the operator may take for dead). With
   `--status-writes N`, each model's status is then written N times (what its way to Ready costs beside
   the two writes: the wave's length is then a floor under "the wave is Ready").

    .venv/bin/python benchmarks/bench_apiserver.py                  # 100, 300, 1000 nodes; wave of 1000
    .venv/bin/python benchmarks/bench_apiserver.py --nodes 1000 --lease-seconds 10 --label lease10

Writes benchmarks/results/apiserver-floor[-LABEL].json. Everything here shares the machine's cores with the
API server, as the scale harness's load generator, hollow nodes and operator do: the floor is a generous one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import REPO, RESULTS, cluster, cluster_env, install_crds, model_manifest, percentile

GROUP, VERSION = "residency.dev", "v1alpha1"
NAMESPACE = "default"


@dataclass
class Capacity:
    kind: str
    writes: int
    seconds: float
    writes_per_second: float
    control_plane_cpu_seconds_per_request: float
    errors: int
    first_error: str


@dataclass
class Floor:
    nodes: int
    lease_seconds: float
    wave: int
    lease_writes_per_second_needed: float
    lease_writes_per_second_done: float
    wave_seconds: float
    apply_to_placement_p50_seconds: float
    apply_to_placement_p99_seconds: float
    status_writes: int  # merge-patches of each model's status after its placement (a model's way to Ready)
    apply_to_last_status_p99_seconds: float
    writes_per_second_during_wave: float
    late_renewals: int  # renewals sent more than one period after the one before (the lease looks stale)


class Api:
    """Raw REST calls to the API server with the kubeconfig's admin certificate."""

    def __init__(self, kubeconfig: str, connections: int) -> None:
        config = yaml.safe_load(Path(kubeconfig).read_text())
        cluster_entry = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        tls = ssl.create_default_context(cafile=cluster_entry["certificate-authority"])
        tls.load_cert_chain(user["client-certificate"], user["client-key"])
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.AsyncClient(base_url=cluster_entry["server"], verify=tls, limits=limits, timeout=60)
        self.first_error = ""

    async def write(self, method: str, path: str, body: dict[str, Any], merge: bool = False) -> bool:
        headers = {"Content-Type": "application/merge-patch+json"} if merge else None
        response = await self.http.request(method, path, json=body, headers=headers)
        if not response.is_success and not self.first_error:
            self.first_error = f"{method} {path}: {response.status_code} {response.text[:300]}"
        return response.is_success

    async def close(self) -> None:
        await self.http.aclose()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(name: str, seconds: float, version: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if version is not None:
        metadata["resourceVersion"] = version
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {"holderIdentity": name, "leaseDurationSeconds": int(4 * seconds), "renewTime": _now()},
    }


def model_body(name: str) -> dict[str, Any]:
    """As bench_scale.py applies them (a priority, an SLO, offload allowed)."""
    return model_manifest(name, "/models/m", 50)


def placement_body(name: str, node: str) -> dict[str, Any]:
    """As the operator writes them (placements.placement_manifest), for model `name` on `node`."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelPlacement",
        "metadata": {
            "name": f"{NAMESPACE}.{name}",
            "labels": {
                "residency.dev/node": node,
                "residency.dev/model-namespace": NAMESPACE,
                "residency.dev/model-name": name,
            },
        },
        "spec": {
            "model": {"namespace": NAMESPACE, "name": name},
            "nodeName": node,
            "sourcePath": "/models/m",
            "dtype": "float32",
            "residentFraction": 0.5,
            "minResidentFraction": 0.25,
            "executionMode": "stream",
            "desiredState": "Loaded",
            "maxSequenceLength": 64,
            "maxBatchSize": 1,
            "minDecodeTokensPerSecond": 5.0,
        },
    }


MODELS = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/llmmodels"
PLACEMENTS = f"/apis/{GROUP}/{VERSION}/modelplacements"  # cluster-scoped
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"


def control_plane_pids(cluster_dir: Path) -> list[int]:
    pids = []
    for name in ("etcd", "kube-apiserver"):
        path = cluster_dir / "pids" / name
        if path.exists():
            pids.append(int(path.read_text().split()[0]))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def capacity(
    api: Api,
    kind: str,
    make: Callable[[int, int], Awaitable[bool]],
    connections: int,
    seconds: float,
    pids: list[int],
) -> Capacity:
    """Writes of one kind from `connections` concurrent writers for `seconds` (`make(writer, sequence)`)."""
    counter = itertools.count()
    done = errors = 0
    until = time.monotonic() + seconds

    async def writer(index: int) -> None:
        nonlocal done, errors
        while time.monotonic() < until:
            if await make(index, next(counter)):
                done += 1
            else:
                errors += 1

    cpu_before, start = cpu_seconds(pids), time.monotonic()
    await asyncio.gather(*(writer(i) for i in range(connections)))
    elapsed = time.monotonic() - start
    cpu = cpu_seconds(pids) - cpu_before
    first_error, api.first_error = api.first_error, ""
    return Capacity(kind, done, elapsed, done / elapsed, cpu / max(1, done + errors), errors, first_error)


async def create_leases(api: Api, names: list[str], seconds: float) -> dict[str, str]:
    versions: dict[str, str] = {}
    semaphore = asyncio.Semaphore(16)

    async def one(name: str) -> None:
        async with semaphore:
            response = await api.http.post(LEASES, json=lease_body(name, seconds))
            if response.status_code == 409:
                response = await api.http.get(f"{LEASES}/{name}")
            versions[name] = response.json()["metadata"]["resourceVersion"]

    await asyncio.gather(*(one(n) for n in names))
    return versions


async def renew_leases(
    api: Api,
    names: list[str],
    seconds: float,
    versions: dict[str, str],
    stop: asyncio.Event,
    record: list[float],
) -> int:
    """Renews each Lease every `seconds`, spread evenly over the period, as N kubelets would; returns the
    renewals sent late (more than one period after the one before). `record` gets each renewal's time."""
    late = 0
    last: dict[str, float] = {}
    semaphore = asyncio.Semaphore(64)  # renewals in flight at once, as N nodes' own connections would be

    async def renew(name: str) -> None:
        nonlocal late
        async with semaphore:
            now = time.monotonic()
            if name in last and now - last[name] > 2 * seconds:
                late += 1
            last[name] = now
            response = await api.http.put(f"{LEASES}/{name}", json=lease_body(name, seconds, versions[name]))
            if response.is_success:
                versions[name] = response.json()["metadata"]["resourceVersion"]
                record.append(time.monotonic())

    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    for tick in itertools.count():
        if stop.is_set():
            break
        name = names[tick % len(names)]
        due = start + tick * seconds / len(names)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        task = asyncio.create_task(renew(name))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return late


async def floor(
    api: Api, nodes: int, lease_seconds: float, wave: int, connections: int, run: int, status_writes: int
) -> Floor:
    names = [f"floor-node-{i:04d}" for i in range(nodes)]
    versions = await create_leases(api, names, lease_seconds)
    stop = asyncio.Event()
    renewals: list[float] = []
    renewing = asyncio.create_task(renew_leases(api, names, lease_seconds, versions, stop, renewals))
    await asyncio.sleep(2 * lease_seconds)  # the leases' steady state before the wave
    latencies: list[float] = []
    finished: list[float] = []
    queue = iter(range(wave))
    start = time.monotonic()

    async def writer() -> None:
        for index in queue:
            name = f"floor-{run}-{index:05d}"
            sent = time.monotonic()
            if await api.write("POST", MODELS, model_body(name)) and await api.write(
                "POST", PLACEMENTS, placement_body(name, names[index % nodes])
            ):
                latencies.append(time.monotonic() - sent)
                for step in range(status_writes):
                    status = {"status": {"phase": "Scheduled", "message": f"step {step}"}}
                    await api.write("PATCH", f"{MODELS}/{name}/status", status, merge=True)
                finished.append(time.monotonic() - sent)

    await asyncio.gather(*(writer() for _ in range(connections)))
    wave_seconds = time.monotonic() - start
    in_wave = sum(1 for t in renewals if start <= t <= start + wave_seconds)
    stop.set()
    late = await renewing
    return Floor(
        nodes=nodes,
        lease_seconds=lease_seconds,
        wave=wave,
        lease_writes_per_second_needed=nodes / lease_seconds,
        lease_writes_per_second_done=in_wave / wave_seconds,
        wave_seconds=wave_seconds,
        apply_to_placement_p50_seconds=percentile(latencies, 50) or 0.0,
        apply_to_placement_p99_seconds=percentile(latencies, 99) or 0.0,
        status_writes=status_writes,
        apply_to_last_status_p99_seconds=percentile(finished, 99) or 0.0,
        writes_per_second_during_wave=((2 + status_writes) * len(latencies) + in_wave) / wave_seconds,
        late_renewals=late,
    )


async def measure(args: argparse.Namespace, kubeconfig: str, pids: list[int]) -> dict[str, Any]:
    api = Api(kubeconfig, args.connections)
    try:
        run = f"c{int(time.time())}"

        async def model(_: int, i: int) -> bool:
            return await api.write("POST", MODELS, model_body(f"cap-{run}-{i:06d}"))

        async def placement(_: int, i: int) -> bool:
            return await api.write("POST", PLACEMENTS, placement_body(f"cap-{run}-{i:06d}", "n"))

        # one Lease per writer (its index), as nodes each renew their own: no conflicts
        lease_names = [f"capacity-lease-{i}" for i in range(args.connections)]
        lease_versions = await create_leases(api, lease_names, 10.0)

        async def own_lease(writer: int, _: int) -> bool:
            name = lease_names[writer]
            response = await api.http.put(
                f"{LEASES}/{name}", json=lease_body(name, 10.0, lease_versions[name])
            )
            if response.is_success:
                lease_versions[name] = response.json()["metadata"]["resourceVersion"]
            return response.is_success

        capacities = []
        for kind, make in (
            ("lease renewal", own_lease),
            ("LLMModel create", model),
            ("ModelPlacement create", placement),
        ):
            result = await capacity(api, kind, make, args.connections, args.seconds, pids)
            capacities.append(result)
            print(
                f"  {kind:22s} {result.writes_per_second:7.1f} writes/s  "
                f"({result.writes} in {result.seconds:.1f} s, {result.errors} errors; "
                f"etcd + apiserver {1000 * result.control_plane_cpu_seconds_per_request:.2f} CPU ms each)"
                + (f"\n    first error: {result.first_error}" if result.first_error else ""),
                flush=True,
            )
        floors = []
        for i, nodes in enumerate(args.nodes):
            wave = await floor(
                api, nodes, args.lease_seconds, args.wave, args.connections, i, args.status_writes
            )
            floors.append(wave)
            print(
                f"  {nodes:5d} nodes, leases every {args.lease_seconds:g} s: wave of {args.wave} in "
                f"{wave.wave_seconds:.1f} s; apply -> placement "
                f"p50 {wave.apply_to_placement_p50_seconds:.2f} s "
                f"p99 {wave.apply_to_placement_p99_seconds:.2f} s; lease renewals "
                f"{wave.lease_writes_per_second_done:.0f}/s of {wave.lease_writes_per_second_needed:.0f}/s "
                f"needed, {wave.late_renewals} late; with {args.status_writes} status writes a model, "
                f"apply -> last p99 {wave.apply_to_last_status_p99_seconds:.2f} s",
                flush=True,
            )
        return {"capacity": [asdict(c) for c in capacities], "floor": [asdict(f) for f in floors]}
    finally:
        await api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per capacity measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--lease-seconds", type=float, default=5.0, help="as bench_scale.py's default")
    parser.add_argument("--wave", type=int, default=1000)
    parser.add_argument(
        "--status-writes",
        type=int,
        default=0,
        help="status writes per model after its placement (residency's way to Ready makes about 5 more "
        "writes than the create and the placement: a finalizer, Scheduled, the worker's Loaded, Ready, "
        "an Event)",
    )
    parser.add_argument("--label", default="", help="names the result: apiserver-floor[-LABEL].json")
    parser.add_argument("--workdir", type=Path, default=REPO / ".scale-apiserver")
    args = parser.parse_args()
    env = cluster_env(args.workdir, api_port="16653", etcd_port="24010")
    cluster("down", env)
    kubeconfig = cluster("up", env).split("=", 1)[1]
    try:
        install_crds(kubeconfig)
        pids = control_plane_pids(args.workdir / "cluster")
        print(f"API server ceiling on {os.cpu_count()} cores ({len(pids)} control-plane processes timed)")
        result = asyncio.run(measure(args, kubeconfig, pids))
    finally:
        cluster("down", env)
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"apiserver-floor{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
