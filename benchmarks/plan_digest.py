"""A digest of every decision the planner makes on the scale benchmark's fleets and on small random ones: a
change meant only to make planning faster must leave every digest as it was.

Run: ``python benchmarks/plan_digest.py > before.json``, change the planner, run it again and diff. The
digest covers each plan's placements, actions (with their reasons), unschedulable models and their reasons,
host caches, objective, bound and notes: full plans, steady re-plans, the swap-in worst case and two runs of
50 incremental changes per size (as ``bench_plan_scale.py`` makes them), then a first and a second plan
on seeded random fleets of one to three nodes and one to six models, with both solvers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random

from bench_plan_scale import applied, changed_model, make_fleet
from residency_operator.planner import GIB, ModelDemand, NodeCapacity, Plan, PlannerConfig, plan
from residency_operator.planner.incremental import IncrementalPlanner


def digest(planned: Plan) -> str:
    """Everything a plan decides and says, hashed (not its timing)."""
    parts = [
        sorted(dataclasses.astuple(p) for p in planned.placements.values()),
        [dataclasses.astuple(a) for a in planned.actions],
        [dataclasses.astuple(u) for u in planned.unschedulable],
        [dataclasses.astuple(c) for c in planned.cached],
        repr(planned.objective),
        repr(planned.upper_bound),
        repr(planned.optimality_gap),
        planned.solver,
        list(planned.notes),
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def joined(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def scale_digests(model_count: int) -> dict[str, str]:
    """The benchmark's plans at one size."""
    models, nodes = make_fleet(model_count, max(1, model_count // 10))
    config = PlannerConfig(solver="greedy")
    full = plan(models, nodes, [], config=config)
    steady = plan(models, nodes, applied(full), config=config)
    idle = [dataclasses.replace(c, state="idle") for c in applied(steady)]
    left_out = [m.name for m in models if m.name not in steady.placements and m.wanted]
    wanted = max(1, len(models) // 100)
    waiting = set(left_out[:: max(1, len(left_out) // wanted)][:wanted])
    asked = [dataclasses.replace(m, waiting_requests=1) if m.name in waiting else m for m in models]
    found = {
        "full": digest(full),
        "steady": digest(steady),
        "turns": digest(plan(asked, nodes, idle, config=config)),
    }
    for kinds in (["demand"], ["demand", "slo", "priority", "wanted"]):
        incremental = IncrementalPlanner(models, nodes, [], config=config)
        rng = random.Random(1)
        current = list(models)
        steps = []
        for step in range(50):
            index = rng.randrange(len(current))
            current[index] = changed_model(current[index], kinds[step % len(kinds)], rng)
            steps.append(digest(incremental.update_model(current[index])))
        found["incremental " + "+".join(kinds)] = joined(steps)
    return {f"{model_count} {name}": value for name, value in found.items()}


def random_fleet(rng: random.Random) -> tuple[list[ModelDemand], list[NodeCapacity]]:
    """A small fleet drawn like the property tests' strategies (tests/unit/test_planner_properties.py)."""
    nodes = [
        NodeCapacity(
            name=f"node-{i}",
            gpu_type=rng.choice(["H100", "L4"]),
            gpu_memory_bytes=rng.choice([16, 24, 48, 80]) * GIB,
            host_memory_bytes=rng.choice([16, 64, 256]) * GIB,
            host_to_device_gbps=rng.choice([6.0, 25.0, 50.0]),
            hbm_gbps=rng.choice([300.0, 2000.0]),
            host_memory_gbps=rng.choice([25.0, 100.0]),
            cordoned=rng.random() < 0.5 if i > 0 else False,
            disrupting=rng.random() < 0.25 if i > 0 else False,
        )
        for i in range(rng.randint(1, 3))
    ]
    models = [
        ModelDemand(
            name=f"ns/model-{i}",
            weight_bytes=int(rng.choice([1, 3, 8, 16, 30]) * 1e9),
            kv_bytes_per_token=rng.choice([0, 32768, 131072]),
            max_sequence_length=2048,
            max_batch=rng.choice([1, 4]),
            priority=rng.choice([0, 10, 100]),
            preemptible=rng.random() < 0.5,
            min_decode_tokens_per_second=rng.choice([None, 5.0, 20.0]),
            max_offload_fraction=rng.choice([0.0, 0.5, 0.9]),
            demand_decode_tokens_per_second=rng.choice([None, 0.0, 10.0, 100.0]),
            allowed_modes=rng.choice([("stream", "cpu"), ("stream",)]),
        )
        for i in range(rng.randint(1, 6))
    ]
    return models, nodes


def small_digests(count: int) -> dict[str, str]:
    """First and second plans of ``count`` seeded random fleets, each with both solvers."""
    rng = random.Random(0)
    steps = []
    for _ in range(count):
        models, nodes = random_fleet(rng)
        for solver in ("milp", "greedy"):
            config = PlannerConfig(solver=solver)
            first = plan(models, nodes, [], config=config)
            steps.append(digest(first) + digest(plan(models, nodes, applied(first), config=config)))
    return {f"{count} small fleets x 2 solvers": joined(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000,10000", help="model counts (nodes = models / 10)")
    parser.add_argument("--small", type=int, default=200, help="random small fleets")
    args = parser.parse_args()
    found: dict[str, str] = {}
    for model_count in [int(s) for s in args.sizes.split(",") if s]:
        found.update(scale_digests(model_count))
    found.update(small_digests(args.small))
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
