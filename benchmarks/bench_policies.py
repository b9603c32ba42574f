"""SLO-met goodput of residency against today's policies on the standard scenarios.

Run: ``python benchmarks/bench_policies.py`` (prints one table per scenario and a summary of ratios,
writes benchmarks/results/policies.json and one PNG per scenario). Goal: residency >= 1.3x the best
baseline on every scenario. All policies of a scenario replay the same seeded trace in the same run.

The summary also gives, per scenario, the offered load (output tokens/s of every request: the goodput
of a policy that met every SLO) and so the highest ratio any policy could reach, and, where models have
different priorities, goodput weighted by priority (what the planner maximises; see the issue).
Scenarios marked ``extra`` are not among the issue's standard four and are listed apart.

A separate, clearly labelled memory-pressure sweep follows (``--no-sweep`` skips it; ``--sweep-only``
runs only it): the same models and seed as a standard scenario, on the same nodes with their GPU memory
scaled so that the models' whole footprint (weights + KV reservation + workspace, fully resident) is
0.5x, 1x, 1.5x and 2x of the fleet's usable GPU memory, each at the shipped request rates and at twice
them. It shows where residency pulls ahead and where it ties or trails, and the ceiling at each point.
The standard scenarios themselves are not changed by it.

A pacing ablation follows (``--no-ablation`` skips it). Residency's worker paces a model that decodes
ahead of its SLO while a model beside it on the GPU has requests waiting for a batch slot
(``residency_worker.engine.pacing``); the baselines stand for servers that do not (Ollama, ModelMesh,
vLLM), so the shipped runs serve them unpaced. The ablation replays residency unpaced and every
baseline's placements paced, to show how much of each ratio is the planner and how much the worker.

Each scenario's table replays one seeded trace, and one trace is one sample: a change to the planner can
move a ratio by several percent on one seed and the other way on the next. A seed-spread section follows
(``--seeds N``, default 3; 1 skips it): every scenario again at the next N-1 seeds (same models, nodes and
rates; other arrival times and lengths), with each seed's ratio, their mean and their minimum.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from residency_operator.planner.options import gpu_bytes_needed, usable_gpu_bytes
from residency_operator.simulator.cluster import Scenario, load_scenario
from residency_operator.simulator.report import PolicyReport, format_table, write_json, write_plot
from residency_operator.simulator.runner import (
    POLICY_NAMES,
    run_policy,
    scenario_requests,
    standard_scenarios,
    with_seed,
)

RESULTS = Path(__file__).parent / "results"
GOAL = 1.3
SWEEP_SCENARIOS = ("skewed-50x8", "small-large-mix")
"""Standard scenarios the memory-pressure sweep scales (single priority: raw goodput is the objective)."""
SWEEP_PRESSURES = (0.5, 1.0, 1.5, 2.0)
"""Whole-model footprint of all models over the fleet's usable GPU memory, at each sweep point."""
SWEEP_LOADS = (1.0, 2.0)
"""Request rates of every model scaled by these factors at each memory pressure (1 = as shipped)."""


def weighted(report: PolicyReport) -> float:
    """Goodput weighted by model priority (tokens/s x priority)."""
    return sum(priority * tokens for priority, tokens in report.goodput_by_priority_tokens_per_second.items())


def memory_pressure(scenario: Scenario) -> float:
    """Whole-model GPU footprint of every model over the fleet's usable GPU memory."""
    footprint = sum(gpu_bytes_needed(m.demand(), 1.0, "stream") for m in scenario.models)
    fleet = sum(usable_gpu_bytes(n) for n in scenario.nodes)
    return footprint / fleet if fleet else float("inf")


def at_load(scenario: Scenario, factor: float) -> Scenario:
    """The scenario with every request rate of its workload scaled by ``factor`` (same seed)."""
    if factor == 1.0:
        return scenario
    workload = copy.deepcopy(scenario.workload)
    if "total_rate_per_second" in workload:
        workload["total_rate_per_second"] = float(workload["total_rate_per_second"]) * factor
    for event in workload.get("events", []):
        event["rate_per_second"] = float(event["rate_per_second"]) * factor
    return dataclasses.replace(scenario, workload=workload, name=f"{scenario.name}x{factor:g}load")


def at_memory_pressure(scenario: Scenario, pressure: float) -> Scenario:
    """The scenario with every node's usable GPU memory scaled by one factor so that its memory pressure
    is ``pressure``; models, traffic, bandwidths and seed unchanged."""
    scale = memory_pressure(scenario) / pressure
    nodes = [
        dataclasses.replace(n, gpu_memory_bytes=n.reserved_gpu_bytes + round(usable_gpu_bytes(n) * scale))
        for n in scenario.nodes
    ]
    return dataclasses.replace(scenario, nodes=nodes, name=f"{scenario.name}@{pressure:g}x")


def compare(scenario: Scenario) -> tuple[list[PolicyReport], dict[str, float]]:
    """Every policy on the scenario's one seeded trace; returns the reports and the run seconds."""
    requests = scenario_requests(scenario)
    reports = []
    seconds: dict[str, float] = {}
    for policy in POLICY_NAMES:
        started = time.perf_counter()
        reports.append(run_policy(scenario, policy, requests))
        seconds[policy] = time.perf_counter() - started
    return reports, seconds


def pacing_ablation(scenario: Scenario, reports: list[PolicyReport]) -> dict[str, Any]:
    """Where the gain comes from: residency's worker paces each model to its SLO while a model beside it on
    the GPU has requests waiting (``residency_worker.engine.pacing``); the baselines' servers (Ollama,
    ModelMesh, vLLM) do not. Replays residency unpaced, and every baseline's placements paced as if they
    ran on residency's worker, on the same trace as ``reports`` (the shipped runs)."""
    requests = scenario_requests(scenario)
    flipped = {
        r.policy: run_policy(scenario, r.policy, requests, paces_decode=r.policy != "residency")
        for r in reports
        if r.policy != "uniform-offload"  # it serves nothing on these scenarios, paced or not
    }
    ours = next(r for r in reports if r.policy == "residency")
    theirs = [r for r in reports if r.policy != "residency"]
    paced_theirs = [flipped[r.policy] for r in theirs if r.policy in flipped]
    best = max(theirs, key=lambda r: r.goodput_tokens_per_second)
    best_paced = max(paced_theirs, key=lambda r: r.goodput_tokens_per_second)
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "extra": scenario.extra,
        "residency_paced": ours.goodput_tokens_per_second,
        "residency_unpaced": flipped["residency"].goodput_tokens_per_second,
        "best_baseline": best.policy,
        "best_baseline_unpaced": best.goodput_tokens_per_second,
        "best_baseline_paced_policy": best_paced.policy,
        "best_baseline_paced": best_paced.goodput_tokens_per_second,
        "baselines_paced": {p: r.goodput_tokens_per_second for p, r in flipped.items() if p != "residency"},
    }
    if len(ours.goodput_by_priority_tokens_per_second) > 1:
        row["weighted"] = {
            "residency_paced": weighted(ours),
            "residency_unpaced": weighted(flipped["residency"]),
            "best_baseline_unpaced": max(weighted(r) for r in theirs),
            "best_baseline_paced": max(weighted(r) for r in paced_theirs),
        }
    return row


def print_pacing_ablation(rows: list[dict[str, Any]]) -> None:
    """The ablation as one table: ratios of residency, paced or not, to the best baseline, paced or not."""
    print(
        "\nPacing ablation (own seed): residency's worker paces a model ahead of its SLO while a model\n"
        "beside it has requests waiting; the baselines' servers do not. 'paced' baselines replay their\n"
        "placements as if served by residency's worker. SLO-met goodput, tok/s (w: priority-weighted)"
    )
    header = (
        f"{'scenario':<22}{'ours':>8}{'ours':>9}{'best':>8}{'best':>8}{'shipped':>9}{'unpaced':>9}{'both':>8}"
    )
    print(header)
    print(f"{'':<22}{'paced':>8}{'unpaced':>9}{'base':>8}{'paced':>8}{'ratio':>9}{'ratio':>9}{'paced':>8}")
    print("-" * len(header))
    for row in rows:
        lines = [
            (
                "",
                row["residency_paced"],
                row["residency_unpaced"],
                row["best_baseline_unpaced"],
                row["best_baseline_paced"],
            )
        ]
        if "weighted" in row:
            w = row["weighted"]
            lines.append(
                (
                    " w",
                    w["residency_paced"],
                    w["residency_unpaced"],
                    w["best_baseline_unpaced"],
                    w["best_baseline_paced"],
                )
            )
        for mark, paced, unpaced, base, base_paced in lines:
            name = row["scenario"] + (" *" if row["extra"] else "") + mark
            print(
                f"{name:<22}{paced:>8.0f}{unpaced:>9.0f}{base:>8.0f}{base_paced:>8.0f}"
                f"{_ratio(paced, base):>8.2f}x{_ratio(unpaced, base):>8.2f}x"
                f"{_ratio(paced, base_paced):>7.2f}x"
            )
    print("shipped ratio = ours paced / best baseline; unpaced ratio = ours unpaced / best baseline;")
    print("both paced = ours / best baseline on residency's worker")


def seed_row(scenario: Scenario, reports: list[PolicyReport], offered: float) -> dict[str, Any]:
    """Residency / best baseline (and the ceiling) of one seeded run."""
    ours = next(r for r in reports if r.policy == "residency")
    best = max((r for r in reports if r.policy != "residency"), key=lambda r: r.goodput_tokens_per_second)
    return {
        "seed": scenario.seed,
        "residency_goodput": ours.goodput_tokens_per_second,
        "best_baseline": best.policy,
        "best_baseline_goodput": best.goodput_tokens_per_second,
        "offered_tokens_per_second": offered,
        "ratio": _ratio(ours.goodput_tokens_per_second, best.goodput_tokens_per_second),
        "ceiling_ratio": _ratio(offered, best.goodput_tokens_per_second),
    }


def seed_spread(base: Scenario, first: dict[str, Any], seeds: int) -> dict[str, Any]:
    """``first`` (the run at the scenario's own seed, see :func:`seed_row`) and runs at the next
    ``seeds - 1`` seeds: residency / best baseline at each, their mean, minimum and maximum."""
    per_seed = [first]
    for offset in range(1, seeds):
        reseeded = with_seed(base, base.seed + offset)
        offered = sum(r.output_tokens for r in scenario_requests(reseeded)) / base.duration_seconds
        reports, _ = compare(reseeded)
        per_seed.append(seed_row(reseeded, reports, offered))
    ratios = [float(row["ratio"]) for row in per_seed]
    return {
        "scenario": base.name,
        "extra": base.extra,
        "per_seed": per_seed,
        "mean_ratio": statistics.fmean(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "mean_ceiling_ratio": statistics.fmean(float(row["ceiling_ratio"]) for row in per_seed),
    }


def print_seed_spread(rows: list[dict[str, Any]]) -> None:
    """The seed spread as one table."""
    seeds = [row["seed"] for row in rows[0]["per_seed"]] if rows else []
    print(
        "\nSeed spread: each scenario at its own seed (+0) and the next ones (same models, nodes, rates);\n"
        "ratio = residency / best baseline at that seed; ceiling = offered / best baseline (mean)"
    )
    header = f"{'scenario':<22}" + "".join(f"{f'seed+{i}':>9}" for i in range(len(seeds)))
    header += f"{'mean':>8}{'min':>8}{'ceiling':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        name = row["scenario"] + (" *" if row["extra"] else "")
        cells = "".join(f"{seed_row['ratio']:>8.2f}x" for seed_row in row["per_seed"])
        print(
            f"{name:<22}{cells}{row['mean_ratio']:>7.2f}x{row['min_ratio']:>7.2f}x"
            f"{row['mean_ceiling_ratio']:>8.2f}x"
        )


def sweep(base: Scenario) -> list[dict[str, Any]]:
    """Residency / best baseline at each memory pressure of :data:`SWEEP_PRESSURES` and offered load of
    :data:`SWEEP_LOADS`."""
    rows = []
    for load in SWEEP_LOADS:
        loaded = at_load(base, load)
        offered = sum(r.output_tokens for r in scenario_requests(loaded)) / base.duration_seconds
        for pressure in SWEEP_PRESSURES:
            scaled = at_memory_pressure(loaded, pressure)
            reports, _ = compare(scaled)
            ours = next(r for r in reports if r.policy == "residency")
            best = max(
                (r for r in reports if r.policy != "residency"), key=lambda r: r.goodput_tokens_per_second
            )
            rows.append(
                {
                    "scenario": base.name,
                    "memory_pressure": pressure,
                    "load_factor": load,
                    "fleet_usable_gpu_bytes": sum(usable_gpu_bytes(n) for n in scaled.nodes),
                    "offered_tokens_per_second": offered,
                    "goodput_by_policy": {r.policy: r.goodput_tokens_per_second for r in reports},
                    "best_baseline": best.policy,
                    "ratio": _ratio(ours.goodput_tokens_per_second, best.goodput_tokens_per_second),
                    "ceiling_ratio": _ratio(offered, best.goodput_tokens_per_second),
                }
            )
    return rows


def print_sweep(rows: list[dict[str, Any]]) -> None:
    """The sweep as one table."""
    print(
        "\nMemory-pressure sweep (separate from the standard scenarios): every node's GPU memory scaled so\n"
        "that all models whole (weights + KV reservation + workspace) need the given multiple of the\n"
        "fleet's usable GPU memory (pressure), at the shipped request rates and at twice them (load);\n"
        "same models and seed. ratio = residency / best baseline; ceiling = offered / best baseline"
    )
    header = (
        f"{'scenario':<18}{'pressure':>9}{'load':>6}{'fleet GiB':>10}{'residency':>10}{'lru-evict':>10}"
        f"{'uniform':>9}{'binpack':>9}{'offered':>9}{'ratio':>8}{'ceiling':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        goodput = row["goodput_by_policy"]
        if row["ratio"] >= GOAL:
            verdict = f">= {GOAL}x"
        elif row["ratio"] >= 0.95:
            verdict = "tie" if row["ratio"] < 1.05 else "ahead"
        else:
            verdict = "behind"
        if row["ceiling_ratio"] < GOAL:
            verdict += f" ({GOAL}x unreachable)"
        print(
            f"{row['scenario']:<18}{row['memory_pressure']:>8.1f}x{row['load_factor']:>5.0f}x"
            f"{row['fleet_usable_gpu_bytes'] / 2**30:>10.0f}"
            f"{goodput['residency']:>10.1f}{goodput['lru-evict']:>10.1f}{goodput['uniform-offload']:>9.1f}"
            f"{goodput['binpack']:>9.1f}{row['offered_tokens_per_second']:>9.1f}{row['ratio']:>7.2f}x"
            f"{row['ceiling_ratio']:>8.2f}x  {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", action="append", help="scenario name (default: all shipped ones)")
    parser.add_argument("--seed", type=int, default=None, help="override each scenario's seed")
    parser.add_argument("--no-sweep", action="store_true", help="skip the memory-pressure sweep")
    parser.add_argument("--no-ablation", action="store_true", help="skip the pacing ablation")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per scenario in the seed-spread section (1 skips it)"
    )
    parser.add_argument(
        "--sweep-only", action="store_true", help="only the memory-pressure sweep (prints, writes nothing)"
    )
    args = parser.parse_args()
    if args.sweep_only:
        for path in standard_scenarios():
            base = load_scenario(path)
            if base.name in SWEEP_SCENARIOS and (not args.scenario or base.name in args.scenario):
                if args.seed is not None:
                    base.seed = args.seed
                print_sweep(sweep(base))
        return
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    sweep_rows: list[dict[str, Any]] = []
    ablation_rows: list[dict[str, Any]] = []
    spread_rows: list[dict[str, Any]] = []
    all_reports: dict[str, list[PolicyReport]] = {}
    summary: list[dict[str, Any]] = []
    for path in standard_scenarios():
        scenario = load_scenario(path)
        if args.scenario and scenario.name not in args.scenario:
            continue
        if args.seed is not None:
            scenario.seed = args.seed
        requests = scenario_requests(scenario)
        offered = sum(r.output_tokens for r in requests) / scenario.duration_seconds
        reports, seconds = compare(scenario)
        if scenario.name in SWEEP_SCENARIOS and not args.no_sweep:
            sweep_rows.extend(sweep(scenario))
        if not args.no_ablation:
            ablation_rows.append(pacing_ablation(scenario, reports))
        if args.seeds > 1 and scenario.trace_path is None:  # a recorded trace has no seed to vary
            spread_rows.append(seed_spread(scenario, seed_row(scenario, reports, offered), args.seeds))
        all_reports[scenario.name] = reports
        label = " (extra scenario)" if scenario.extra else ""
        print(
            f"\n{scenario.name}{label}: {len(scenario.models)} models, {len(scenario.nodes)} nodes, "
            f"{len(requests)} requests over {scenario.duration_seconds:.0f} s (seed {scenario.seed}); "
            f"offered {offered:.1f} tok/s; memory pressure {memory_pressure(scenario):.2f}x"
        )
        print(format_table(reports))
        ours = next(r for r in reports if r.policy == "residency")
        baselines = [r for r in reports if r.policy != "residency"]
        best = max(baselines, key=lambda r: r.goodput_tokens_per_second)
        best_weighted = max(baselines, key=weighted)
        summary.append(
            {
                "scenario": scenario.name,
                "extra": scenario.extra,
                "offered_tokens_per_second": offered,
                "residency_goodput": ours.goodput_tokens_per_second,
                "best_baseline": best.policy,
                "best_baseline_goodput": best.goodput_tokens_per_second,
                "goodput_by_policy": {r.policy: r.goodput_tokens_per_second for r in reports},
                "ratio": _ratio(ours.goodput_tokens_per_second, best.goodput_tokens_per_second),
                "ceiling_ratio": _ratio(offered, best.goodput_tokens_per_second),
                "memory_pressure": memory_pressure(scenario),
                "residency_goodput_by_priority": ours.goodput_by_priority_tokens_per_second,
                "best_baseline_goodput_by_priority": best.goodput_by_priority_tokens_per_second,
                "priority_weighted": len(ours.goodput_by_priority_tokens_per_second) > 1,
                "residency_weighted_goodput": weighted(ours),
                "best_weighted_baseline": best_weighted.policy,
                "best_baseline_weighted_goodput": weighted(best_weighted),
                # one priority tier (priority 0 weighs nothing): no weighted ratio, rather than Infinity
                "weighted_ratio": _ratio(weighted(ours), weighted(best_weighted))
                if weighted(best_weighted)
                else None,
                "simulation_seconds": seconds,
            }
        )
        if args.scenario:
            continue
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_plot(
            reports, RESULTS / f"policies-{scenario.name}.png", f"{scenario.name}: SLO-met goodput by policy"
        )
    header = (
        f"{'scenario':<20}{'residency':>10}{'lru-evict':>10}{'uniform':>9}{'binpack':>9}{'offered':>9}"
        f"{'ratio':>8}{'ceiling':>9}  goal"
    )
    print("\nSLO-met goodput (tok/s); ratio = residency / best baseline; ceiling = offered / best baseline")
    print(header)
    print("-" * len(header))
    for extra in (False, True):
        for row in (r for r in summary if r["extra"] == extra):
            goodput = row["goodput_by_policy"]
            verdict = f"{GOAL}x met" if row["ratio"] >= GOAL else f"{GOAL}x NOT met"
            if row["ceiling_ratio"] < GOAL:
                verdict += f" (unreachable: ceiling {row['ceiling_ratio']:.2f}x)"
            name = row["scenario"] + (" *" if extra else "")
            print(
                f"{name:<20}{goodput['residency']:>10.1f}{goodput['lru-evict']:>10.1f}"
                f"{goodput['uniform-offload']:>9.1f}{goodput['binpack']:>9.1f}"
                f"{row['offered_tokens_per_second']:>9.1f}{row['ratio']:>7.2f}x{row['ceiling_ratio']:>8.2f}x"
                f"  {verdict}"
            )
    if any(r["extra"] for r in summary):
        print("* extra scenario, not one of the issue's standard four")
    for row in summary:
        if row["priority_weighted"]:
            tiers = row["residency_goodput_by_priority"]
            theirs = row["best_baseline_goodput_by_priority"]
            split = ", ".join(f"priority {p}: {tiers[p]:.1f} vs {theirs.get(p, 0.0):.1f}" for p in tiers)
            print(f"{row['scenario']}: goodput by priority, residency vs {row['best_baseline']}: {split}")
            print(
                f"{row['scenario']}: priority-weighted goodput (tok/s x priority): residency "
                f"{row['residency_weighted_goodput']:.0f} vs {row['best_weighted_baseline']} "
                f"{row['best_baseline_weighted_goodput']:.0f} = {row['weighted_ratio']:.2f}x"
            )
    if ablation_rows:
        print_pacing_ablation(ablation_rows)
    if spread_rows:
        print_seed_spread(spread_rows)
    if sweep_rows:
        print_sweep(sweep_rows)
    if args.scenario:
        print("(a subset of scenarios: benchmarks/results/policies.json left as it was)")
        return
    write_json(
        all_reports,
        RESULTS / "policies.json",
        {
            "summary": summary,
            "seed_spread": spread_rows,
            "pacing_ablation": ablation_rows,
            "memory_sweep": sweep_rows,
            "machine": platform.platform(),
        },
    )
    print(f"wrote {RESULTS / 'policies.json'}")


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("inf")


if __name__ == "__main__":
    main()
