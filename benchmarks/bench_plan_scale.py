"""How long planning takes as the fleet grows: full plans from 100 to 10 000 models, and incremental
re-plans after one model changes.

Run: ``taskset -c 1 python benchmarks/bench_plan_scale.py`` (one core; prints a table, writes
benchmarks/results/plan_scale.json). Goals from the design: 10 000 models x 1 000 nodes in under 1 s; one
changed model in under 50 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from residency_operator.planner import (
    GIB,
    CurrentPlacement,
    ModelDemand,
    NodeCapacity,
    Plan,
    PlannerConfig,
    plan,
)
from residency_operator.planner.incremental import IncrementalPlanner

RESULTS = Path(__file__).parent / "results"
NODE_TYPES = [
    # gpu type, GPU GiB, host GiB, host-to-device GB/s, HBM GB/s, host memory GB/s
    ("H100-PCIe", 80, 512, 50.0, 2000.0, 120.0),
    ("A100-40GB", 40, 256, 25.0, 1555.0, 100.0),
    ("A6000", 48, 256, 25.0, 768.0, 80.0),
    ("L4", 24, 128, 25.0, 300.0, 60.0),
]
PARAMETERS_BILLION = [0.5, 1.2, 1.5, 3.2, 7.2, 8.0]


def make_fleet(
    model_count: int, node_count: int, seed: int = 0
) -> tuple[list[ModelDemand], list[NodeCapacity]]:
    """A synthetic fleet: many small models with heavy-tailed demand on four GPU types."""
    rng = random.Random(seed)
    nodes = []
    for i in range(node_count):
        gpu_type, gpu_gib, host_gib, h2d, hbm, host_bw = NODE_TYPES[i % len(NODE_TYPES)]
        nodes.append(
            NodeCapacity(f"node-{i:05d}", gpu_type, gpu_gib * GIB, host_gib * GIB, h2d, hbm, host_bw)
        )
    models = []
    for i in range(model_count):
        billions = rng.choice(PARAMETERS_BILLION)
        models.append(
            ModelDemand(
                name=f"team-{i % 97:02d}/model-{i:05d}",
                weight_bytes=int(billions * 2e9),
                kv_bytes_per_token=int(billions * 16384),
                max_sequence_length=4096,
                max_batch=8,
                priority=rng.choice([0, 0, 50, 100]),
                preemptible=rng.random() > 0.1,
                min_decode_tokens_per_second=rng.choice([5.0, 10.0, 20.0]),
                max_offload_fraction=rng.choice([0.0, 0.5, 0.8]),
                demand_decode_tokens_per_second=round(rng.paretovariate(1.3) * 1.0, 2),
            )
        )
    return models, nodes


def applied(planned: Plan) -> list[CurrentPlacement]:
    """The cluster state once a plan has been carried out."""
    return [
        CurrentPlacement(p.model, p.node, p.resident_fraction, p.mode, "loaded")
        for p in planned.placements.values()
    ]


def time_turns(
    models: list[ModelDemand], nodes: list[NodeCapacity], steady: Plan, config: PlannerConfig
) -> tuple[float, int, int]:
    """A re-plan where every placed model is idle and requests wait for 1 % of the models (ones left
    out): the swap-in pass's worst case. CPU seconds, models waiting, and how many of them got room."""
    current = [dataclasses.replace(c, state="idle") for c in applied(steady)]
    left_out = [m.name for m in models if m.name not in steady.placements and m.wanted]
    wanted = max(1, len(models) // 100)
    waiting = set(left_out[:: max(1, len(left_out) // wanted)][:wanted])
    asked = [dataclasses.replace(m, waiting_requests=1) if m.name in waiting else m for m in models]
    started = time.process_time()
    turned = plan(asked, nodes, current, config=config)
    return (
        time.process_time() - started,
        len(waiting),
        sum(1 for name in waiting if name in turned.placements),
    )


def changed_model(model: ModelDemand, kind: str, rng: random.Random) -> ModelDemand:
    """One model after one kind of change an operator reconcile sees."""
    if kind == "demand":
        return dataclasses.replace(
            model, demand_decode_tokens_per_second=(model.demand_decode_tokens_per_second or 1.0) * 10
        )
    if kind == "slo":
        return dataclasses.replace(model, min_decode_tokens_per_second=rng.choice([5.0, 10.0, 20.0, 40.0]))
    if kind == "priority":
        return dataclasses.replace(model, priority=rng.choice([0, 50, 100, 200]))
    return dataclasses.replace(model, wanted=not model.wanted)


def time_changes(
    models: list[ModelDemand],
    nodes: list[NodeCapacity],
    config: PlannerConfig,
    changes: int,
    kinds: list[str],
) -> list[float]:
    """Seconds of each incremental re-plan after one model changed (changes applied one after another)."""
    incremental = IncrementalPlanner(models, nodes, [], config=config)
    rng = random.Random(1)
    current = list(models)
    seconds = []
    for step in range(changes):
        index = rng.randrange(len(current))
        current[index] = changed_model(current[index], kinds[step % len(kinds)], rng)
        started = time.process_time()
        incremental.update_model(current[index])
        seconds.append(time.process_time() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000,10000", help="model counts (nodes = models / 10)")
    parser.add_argument("--changes", type=int, default=50, help="single-model changes timed per size")
    parser.add_argument("--repeat", type=int, default=5, help="full plans timed per size (median reported)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for model_count in [int(s) for s in args.sizes.split(",")]:
        node_count = max(1, model_count // 10)
        models, nodes = make_fleet(model_count, node_count)
        config = PlannerConfig(solver="greedy")
        full_times, full_wall, steady_times = [], [], []
        for _ in range(args.repeat):
            started, started_wall = time.process_time(), time.perf_counter()
            full = plan(models, nodes, [], config=config)
            full_times.append(time.process_time() - started)
            full_wall.append(time.perf_counter() - started_wall)
            # Level-triggered steady state: re-plan from the applied plan (what every reconcile does).
            started = time.process_time()
            steady = plan(models, nodes, applied(full), config=config)
            steady_times.append(time.process_time() - started)
        full_seconds = statistics.median(full_times)
        steady_seconds = statistics.median(steady_times)
        turns_seconds, turns_waiting, turns_placed = time_turns(models, nodes, steady, config)
        change_seconds = time_changes(models, nodes, config, args.changes, ["demand"])
        mixed_seconds = time_changes(
            models, nodes, config, args.changes, ["demand", "slo", "priority", "wanted"]
        )
        exact_note = ""
        if model_count <= 100:
            started = time.process_time()
            exact = plan(models, nodes, [], config=PlannerConfig(solver="milp"))
            exact_note = f"{time.process_time() - started:.2f}s, objective {exact.objective:.1f}"
        rows.append(
            {
                "models": model_count,
                "nodes": node_count,
                "placed": len(full.placements),
                "unschedulable": len(full.unschedulable),
                "full_plan_seconds": full_seconds,
                "full_plan_seconds_min": min(full_times),
                "full_plan_seconds_all": full_times,
                "full_plan_wall_seconds_all": full_wall,
                "steady_replan_seconds": steady_seconds,
                "steady_replan_actions": len(steady.actions),
                "turns_replan_seconds": turns_seconds,
                "turns_waiting_models": turns_waiting,
                "turns_given_room": turns_placed,
                "incremental_changes": len(change_seconds),
                "incremental_median_ms": 1000 * statistics.median(change_seconds),
                "incremental_p95_ms": 1000 * sorted(change_seconds)[int(0.95 * (len(change_seconds) - 1))],
                "incremental_max_ms": 1000 * max(change_seconds),
                "incremental_mixed_median_ms": 1000 * statistics.median(mixed_seconds),
                "incremental_mixed_max_ms": 1000 * max(mixed_seconds),
                "greedy_objective": full.objective,
                "optimality_gap": full.optimality_gap,
                "gap_bound": "LP relaxation" if not full.notes else "capacity-free bound",
                "milp_for_comparison": exact_note,
            }
        )
    header = (
        f"{'models':>7}{'nodes':>7}{'placed':>8}{'full plan s':>13}{'re-plan s':>11}{'actions':>9}"
        f"{'turns s':>9}{'incr p50 ms':>13}{'incr max ms':>13}{'mixed max':>11}{'gap':>8}  bound"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['models']:>7}{row['nodes']:>7}{row['placed']:>8}{row['full_plan_seconds']:>13.3f}"
            f"{row['steady_replan_seconds']:>11.3f}{row['steady_replan_actions']:>9}"
            f"{row['turns_replan_seconds']:>9.3f}"
            f"{row['incremental_median_ms']:>13.2f}{row['incremental_max_ms']:>13.2f}"
            f"{row['incremental_mixed_max_ms']:>11.2f}{row['optimality_gap']:>8.1%}  {row['gap_bound']}"
        )
    print(
        f"CPU seconds of this process (one core; wall time in the JSON): full plan, median of {args.repeat} "
        f"runs; incremental, {args.changes} changes of one model's demand (x10), and as many mixed ones "
        "(demand, SLO, priority, deleted/restored); turns: a re-plan with every placed model idle and "
        "requests waiting for 1 % of the models (the swap-in pass's worst case)"
    )
    for row in rows:
        print(
            f"{row['models']} models, turns: {row['turns_given_room']} of {row['turns_waiting_models']} "
            "waiting models given the room of idle ones"
        )
    for row in rows:
        if row["milp_for_comparison"]:
            print(
                f"{row['models']} models: exact MILP {row['milp_for_comparison']} vs greedy objective "
                f"{row['greedy_objective']:.1f}"
            )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = last["full_plan_seconds"] / max(1e-9, first["full_plan_seconds"])
        print(f"full plan time grows {growth:.0f}x for {last['models'] // first['models']}x the models")
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "timing": "CPU seconds of the benchmark process (time.process_time), pinned to one core",
        "rows": rows,
    }
    (RESULTS / "plan_scale.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS / 'plan_scale.json'}")


if __name__ == "__main__":
    main()
