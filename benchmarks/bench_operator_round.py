"""The operator's planning round at fleet size without an API server: what a single-model change costs
with a full plan against the planner's incremental mode (the same synthetic fleet as `make scale`).

    .venv/bin/python benchmarks/bench_operator_round.py --nodes 1000 --models 10000

A round reads an in-memory cluster (as the informers hold it) and writes to an in-memory API; the figures
are the operator's own CPU time per round on this machine: the planner, the inputs, the manifests and the
statuses. Writes JSON to benchmarks/results/operator-round-<nodes>n-<models>m.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scale import make_models, model_manifest  # noqa: E402
from residency.names import placement_name  # noqa: E402
from residency_operator.cache import ChangeLog  # noqa: E402
from residency_operator.capacity import CapacityConfig  # noqa: E402
from residency_operator.controller import Controller  # noqa: E402
from residency_operator.state import ClusterState, OperatorKnobs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


class MemoryApi:
    """The writes a round makes, kept in memory (the placements feed the next round's state)."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.placements: dict[str, dict[str, Any]] = {}
        self.writes = 0
        self._models = {f"{m['metadata']['namespace']}/{m['metadata']['name']}": m for m in state.models}

    def wake_requests(self, namespace: str) -> dict[str, tuple[str, str]]:
        return {}

    def create_placement(self, body: dict[str, Any]) -> dict[str, Any]:
        self.placements[body["metadata"]["name"]] = body
        self.writes += 1
        return body

    def patch_placement(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.placements[name]["spec"] = patch["spec"]
        self.writes += 1
        return self.placements[name]

    def delete_placement(self, name: str) -> None:
        del self.placements[name]
        self.writes += 1

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        body = self._models[f"{namespace}/{name}"]
        merged = {**(body.get("status") or {}), **status}
        body["status"] = {k: v for k, v in merged.items() if v is not None}
        self.writes += 1

    def post_event(self, *args: Any, **kwargs: Any) -> None:
        self.writes += 1


class _Written:
    def written(self, body: Any) -> None:
        pass


class MemoryCache(ChangeLog):
    """The informers' view: the in-memory cluster, and the changes the benchmark makes."""

    def __init__(self, api: MemoryApi) -> None:
        self.api = api
        self.models = self.placements = _Written()
        super().__init__()
        self.other = True

    def state(self) -> ClusterState:
        return ClusterState(
            self.api.state.models,
            self.api.state.node_profiles,
            self.api.state.nodes,
            list(self.api.placements.values()),
        )

    def wake_requests(self) -> dict[str, tuple[str, str]]:
        return {}


def fleet(nodes: int, models: int, root: Path) -> ClusterState:
    paths, per_model = make_models(root)
    per_node = math.ceil(1.5 * models / nodes) + 2
    gpu_bytes = (math.ceil(per_node * per_model / 2**20) + 1) * 2**20
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    bodies = []
    for i in range(models):
        body = model_manifest(f"m{i:05d}", paths[i % len(paths)], i)
        body["metadata"].update(namespace="scale", uid=f"uid-{i}", generation=1)
        bodies.append(body)
    profiles = [
        {
            "metadata": {"name": f"n{i:04d}"},
            "spec": {
                "nodeName": f"n{i:04d}",
                "gpuType": "hollow",
                "gpuMemoryBytes": gpu_bytes,
                "hostMemoryBytes": 64 * gpu_bytes,
                "hostToDeviceGbps": 10.0,
                "hbmGbps": 100.0,
                "emulated": True,
            },
            "status": {"heartbeatTime": now},
        }
        for i in range(nodes)
    ]
    node_bodies = [
        {
            "metadata": {"name": f"n{i:04d}"},
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
        for i in range(nodes)
    ]
    return ClusterState(bodies, profiles, node_bodies, [])


def change(api: MemoryApi, cache: MemoryCache, index: int, slo: float) -> str:
    """A new SLO on one model (a new generation), as the informer would record it."""
    old = api.state.models[index]
    new = copy.deepcopy(old)
    new["metadata"]["generation"] += 1
    new["spec"]["slo"] = {"minDecodeTokensPerSecond": slo}
    api.state.models[index] = new
    api._models[f"scale/{new['metadata']['name']}"] = new
    key = f"scale/{new['metadata']['name']}"
    cache.spec_changes.add(key)
    return key


def report_loaded(api: MemoryApi, cache: MemoryCache, index: int) -> str:
    """The model's worker reports its placement loaded where the plan put it."""
    key = f"scale/{api.state.models[index]['metadata']['name']}"
    placement = api.placements[placement_name(key)]
    placement["status"] = {"state": "Loaded", "residentFraction": placement["spec"]["residentFraction"]}
    cache.reported.add(key)
    return key


def delete_model(api: MemoryApi, cache: MemoryCache, index: int) -> str:
    """The model's deletion begins (it is no longer wanted)."""
    old = api.state.models[index]
    new = copy.deepcopy(old)
    new["metadata"]["deletionTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    api.state.models[index] = new
    key = f"scale/{new['metadata']['name']}"
    api._models[key] = new
    cache.spec_changes.add(key)
    return key


def create_model(api: MemoryApi, cache: MemoryCache, number: int, like: int) -> str:
    """A model that was not there (a copy of model ``like`` under a new name)."""
    new = copy.deepcopy(api.state.models[like])
    new["metadata"].update(name=f"new{number:04d}", uid=f"uid-new-{number}", generation=1)
    new["metadata"].pop("deletionTimestamp", None)
    api.state.models.append(new)
    key = f"scale/{new['metadata']['name']}"
    api._models[key] = new
    cache.added.add(key)
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="residency-round-"))
    api = MemoryApi(fleet(args.nodes, args.models, root / "models"))
    cache = MemoryCache(api)
    knobs = OperatorKnobs(allowed_model_roots=[root / "models"])
    controller = Controller(
        api,  # type: ignore[arg-type]
        knobs,
        capacity=CapacityConfig(enabled=False),
        cache=cache,  # type: ignore[arg-type]
        write_workers=1,
        incremental_min_models=1,
    )
    figures: dict[str, Any] = {"nodes": args.nodes, "models": args.models}

    def timed(label: str, other: bool = True) -> Any:
        cache.other = other
        writes = api.writes
        started = time.perf_counter()
        report = controller.round()
        seconds = time.perf_counter() - started
        print(f"{label:<44} {seconds:7.2f} s  {report.solver:<11} writes {api.writes - writes}", flush=True)
        figures.setdefault("rounds", []).append(
            {
                "round": label,
                "seconds": round(seconds, 3),
                "solver": report.solver,
                "writes": api.writes - writes,
            }
        )
        return report

    timed("first round: every placement created")
    for attempt in range(4):  # until a round writes nothing (the incremental planner is built there)
        report = timed(f"settling round {attempt + 1} (+ incremental build)")
        if not (report.created or report.updated or report.deleted):
            break
    assert controller.incremental is not None
    figures["incremental_ready"] = controller.incremental.planner is not None
    full: list[float] = []
    incremental: list[float] = []
    for i in range(args.changes):
        change(api, cache, (i * 7919) % args.models, 6.0 + i)
        cache.other = True  # the same change, planned in full
        started = time.perf_counter()
        timed(f"SLO change {i + 1}, full plan")
        full.append(time.perf_counter() - started)
        if controller.incremental.planner is None:
            timed("settling round (+ incremental build)")
        change(api, cache, (i * 7919 + 13) % args.models, 6.0 + i)
        started = time.perf_counter()
        timed(f"SLO change {i + 1}, incremental", other=False)
        incremental.append(time.perf_counter() - started)
    figures["single_change_full_seconds"] = sorted(full)
    figures["single_change_incremental_seconds"] = sorted(incremental)
    # The rounds of a delete and re-apply and of the workers' reports, planned incrementally (their
    # changes as the cache records them) where a full round was needed before.
    kinds: dict[str, list[float]] = {"report": [], "delete": [], "create": []}
    for i in range(args.changes):
        if controller.incremental.planner is None:
            timed("settling round (+ incremental build)")
        index = (i * 7919 + 29) % args.models
        for kind in kinds:
            if kind == "report":
                report_loaded(api, cache, index)
            elif kind == "delete":
                delete_model(api, cache, index)
            else:
                create_model(api, cache, i, index)
            started = time.perf_counter()
            timed(f"{kind} {i + 1}, incremental", other=False)
            kinds[kind].append(time.perf_counter() - started)
    for kind, seconds in kinds.items():
        figures[f"{kind}_incremental_seconds"] = sorted(seconds)
    print(
        f"single-model change: full round median {sorted(full)[len(full) // 2]:.2f} s, "
        f"incremental round median {sorted(incremental)[len(incremental) // 2]:.2f} s; "
        + ", ".join(f"{kind} {sorted(v)[len(v) // 2]:.2f} s" for kind, v in kinds.items())
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"operator-round-{args.nodes}n-{args.models}m.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
