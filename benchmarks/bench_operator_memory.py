"""The operator's memory per model without an API server: its informers filled with the objects the API
server would send (LLMModels and their ModelPlacements with a Ready status and the managedFields of
their writers), then planning rounds from that cache, at two fleet sizes; the difference is the cost of a
model.

    .venv/bin/python benchmarks/bench_operator_memory.py --models 1000 4000
    .venv/bin/python benchmarks/bench_operator_memory.py --models 1000 4000 --no-slim  # the full objects

Each size runs in a process of its own: what Python objects hold (tracemalloc) and RSS (from /proc, after
a full collection; it keeps the high-water of building the objects, which the held figure does not). The
objects go through the real :class:`residency.informer.Informer` (a LIST in pages, answered from memory),
so what it keeps is what the operator keeps.
Writes JSON to benchmarks/results/operator-memory-<models...>.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results"
NODES = 1000


def rss_mib() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def held_mib() -> float:
    """What Python objects hold now (tracemalloc): unlike RSS, not what was freed but not given back."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


def fields(value: Any) -> Any:
    """The FieldsV1 tree the API server records for a writer of ``value`` (``k:`` keys for list items)."""
    if isinstance(value, dict):
        return {".": {}, **{f"f:{k}": fields(v) for k, v in value.items()}}
    if isinstance(value, list):
        return {
            ".": {},
            **{
                "k:" + json.dumps({"type": i.get("type")}) if isinstance(i, dict) else "v:" + json.dumps(i): (
                    fields(i)
                )
                for i in value
            },
        }
    return {}


def managed(manager: str, part: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
    entry = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": "residency.dev/v1alpha1",
        "time": "2026-12-07T17:37:12Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields(part),
    }
    return {**entry, "subresource": subresource} if subresource else entry


def served_model(body: dict[str, Any], index: int, node: str) -> dict[str, Any]:
    """An LLMModel as the API server returns it once Ready: kopf's finalizer, the operator's status."""
    model = copy.deepcopy(body)
    when = "2026-12-07T17:37:15Z"
    message = f"serving on {node} at 100% GPU residency"
    condition = {"lastTransitionTime": when, "message": message, "observedGeneration": 1}
    model["metadata"].update(
        namespace="scale",
        uid=f"00000000-0000-4000-8000-{index:012d}",
        generation=1,
        resourceVersion=str(10_000 + index),
        creationTimestamp=when,
        finalizers=["kopf.zalando.org/KopfFinalizerMarker"],
    )
    model["status"] = {
        "architecture": "llama",
        "conditions": [
            {**condition, "reason": reason, "status": status, "type": kind}
            for kind, status, reason in (
                ("Degraded", "False", "SLOMet"),
                ("Loaded", "True", "Loaded"),
                ("Preempted", "False", "Running"),
                ("Ready", "True", "Ready"),
                ("Scheduled", "True", "Placed"),
                ("Validated", "True", "ModelValid"),
            )
        ],
        "endpoint": f"http://hollow.invalid/{node}/v1",
        "executionMode": "stream",
        "message": message,
        "node": node,
        "observedGeneration": 1,
        "phase": "Ready",
        "predictedDecodeTokensPerSecond": 2427750.16,
        "predictionSource": "roofline",
        "reason": "Ready",
        "residentFraction": 1,
        "residentPercent": 100,
        "timings": {"emulated": True, "loadSeconds": 0.5, "weightBytes": 0},
        "weightBytes": 791040,
    }
    model["metadata"]["managedFields"] = [
        managed("OpenAPI-Generator", {"spec": model["spec"]}),
        managed("kopf", {"metadata": {"finalizers": {}}}),
        managed("OpenAPI-Generator", {"status": model["status"]}, "status"),
    ]
    return model


def served_placement(body: dict[str, Any], index: int) -> dict[str, Any]:
    """A ModelPlacement as the API server returns it once its worker reported it Loaded."""
    placement = copy.deepcopy(body)
    node = placement["spec"]["nodeName"]
    placement["metadata"].update(
        uid=f"00000000-0000-4000-9000-{index:012d}",
        generation=1,
        resourceVersion=str(20_000 + index),
        creationTimestamp="2026-12-07T17:37:13Z",
        finalizers=["residency.dev/unload"],
    )
    placement["status"] = {
        "demand": {"decodeTokensPerSecond": 0, "promptTokensPerSecond": 0, "windowSeconds": 60},
        "endpoint": f"http://hollow.invalid/{node}/v1",
        "executionMode": "stream",
        "gpus": [],
        "lastActiveTime": "2026-12-07T17:37:15Z",
        "observedGeneration": 1,
        "queuedRequests": 0,
        "residentBytes": 0,
        "residentFraction": 1,
        "state": "Loaded",
        "timings": {"emulated": True, "loadSeconds": 0.5, "weightBytes": 0},
    }
    placement["metadata"]["managedFields"] = [
        managed("OpenAPI-Generator", {"metadata": placement["metadata"], "spec": placement["spec"]}),
        managed("OpenAPI-Generator", {"status": placement["status"]}, "status"),
    ]
    return placement


class Pages:
    """A LIST call answered from memory in pages, as the informer asks for it (JSON bytes in .data)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __call__(self, *args: Any, limit: int = 500, _continue: str | None = None, **kwargs: Any) -> Any:
        start = int(_continue or 0)
        more = start + limit < len(self.items)
        meta = {"resourceVersion": "1", **({"continue": str(start + limit)} if more else {})}
        page = {"items": self.items[start : start + limit], "metadata": meta}
        return type("Answer", (), {"data": json.dumps(page).encode()})()


def measure(models: int, models_root: Path, slim: bool) -> dict[str, Any]:
    """One fleet size, in this process: RSS at each step."""
    from bench_operator_round import MemoryApi, MemoryCache, fleet
    from residency.informer import Informer
    from residency_operator.capacity import CapacityConfig
    from residency_operator.controller import Controller
    from residency_operator.state import ClusterState, OperatorKnobs

    def make_controller(api: MemoryApi) -> Controller:
        return Controller(
            api,  # type: ignore[arg-type]
            OperatorKnobs(allowed_model_roots=[models_root]),
            capacity=CapacityConfig(enabled=False),
            cache=MemoryCache(api),  # type: ignore[arg-type]
            write_workers=1,
        )

    tracemalloc.start()
    figures: dict[str, Any] = {"models": models, "slim": slim, "rss_mib": {"start": round(rss_mib(), 1)}}
    figures["held_mib"] = {"start": round(held_mib(), 1)}
    state = fleet(NODES, models, models_root)
    profiles, nodes_ = state.node_profiles, state.nodes
    api = MemoryApi(state)
    controller = make_controller(api)
    controller.round()  # every placement, as the planner puts them
    nodes = {p["spec"]["model"]["name"]: p["spec"]["nodeName"] for p in api.placements.values()}
    served_models = [
        json.loads(json.dumps(served_model(m, i, nodes[m["metadata"]["name"]])))
        for i, m in enumerate(state.models)
    ]
    served_placements = [served_placement(p, i) for i, p in enumerate(api.placements.values())]
    del api, controller, state
    figures["rss_mib"]["objects built"] = round(rss_mib(), 1)
    figures["held_mib"]["objects built"] = round(held_mib(), 1)

    informers = []
    for name, items in (("llmmodels", served_models), ("modelplacements", served_placements)):
        kwargs = {} if slim else {"transform": lambda body: body}
        informer = Informer(name, Pages(items), **kwargs)
        informer._relist()  # one paginated LIST, as at start (no watch: nothing changes here)
        informers.append(informer)
    del served_models, served_placements, items
    figures["rss_mib"]["cache filled"] = round(rss_mib(), 1)
    figures["held_mib"]["cache filled"] = round(held_mib(), 1)

    cached = ClusterState(informers[0].items(), profiles, nodes_, informers[1].items())
    api = MemoryApi(cached)
    for placement in cached.placements:
        api.placements[placement["metadata"]["name"]] = placement
    controller = make_controller(api)
    for _ in range(3):  # what rounds keep: verdicts, validations, (>= 2000 models) an incremental planner
        controller.round()
    figures["rss_mib"]["after 3 rounds"] = round(rss_mib(), 1)
    figures["held_mib"]["after 3 rounds"] = round(held_mib(), 1)
    figures["cached_objects"] = sum(len(i) for i in informers)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--no-slim", action="store_true", help="keep objects as served (before)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure one size
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.root, not args.no_slim)))
        return
    root = Path(tempfile.mkdtemp(prefix="residency-memory-")) / "models"
    # the model directories are written in a process of their own (it imports torch)
    make = f"import pathlib, bench_scale; bench_scale.make_models(pathlib.Path({str(root)!r}))"
    subprocess.run([sys.executable, "-c", make], check=True, cwd=REPO / "benchmarks")
    runs = []
    for models in args.models:
        child = [sys.executable, __file__, "--one", str(models), "--root", str(root)]
        out = subprocess.run(child + (["--no-slim"] if args.no_slim else []), check=True, capture_output=True)
        runs.append(json.loads(out.stdout.decode().strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    low, high = runs[0], runs[-1]
    added = high["models"] - low["models"]
    per_model = {
        f"{what} {step}": round((high[what][step] - low[what][step]) / added * 1024, 1)
        for what in ("held_mib", "rss_mib")
        for step in ("cache filled", "after 3 rounds")
    }
    print(f"KiB per model ({'full objects' if args.no_slim else 'slim'}): {per_model}")
    rest = 10_000 - high["models"]
    projected = high["rss_mib"]["after 3 rounds"] + per_model["held_mib after 3 rounds"] / 1024 * rest
    print(f"projected at 10 000 models (this process: no kopf, no HTTP): {projected:.0f} MiB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = "-".join(str(m) for m in args.models) + ("-full" if args.no_slim else "")
    out_path = RESULTS / f"operator-memory-{label}.json"
    out_path.write_text(json.dumps({"runs": runs, "kib_per_model": per_model}, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
