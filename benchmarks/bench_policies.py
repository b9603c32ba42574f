"""SLO-met goodput of residency against today's policies on the standard scenarios.

Run: ``python benchmarks/bench_policies.py [--seeds 10]``. Per scenario it prints one seeded run in full
(every policy, its loads, resumes and preemptions, the ceiling and SLO attainment per priority tier), then
the policy table: every policy's SLO-met goodput as the mean over ``--seeds`` seeds (the scenario's own
and the next ones: same models, nodes and rates; other arrival times and lengths), residency / the best
baseline, the ceiling (offered load / the best baseline: the most any policy could gain), the
priority-weighted ratio, and SLO attainment per tier; then the same table again with every request served
at what the measured engine does (simulator/measured.py: fitted to a measured report) while the planner
still plans with its own predictor, so the gap between its model and the engine shows; and a third time
with the planner given the profiles its workers would measure of that engine. Writes
benchmarks/results/policies.json (``--out``) and one PNG per scenario.

Goals (the planner issue): >= 1.3x the best baseline on every standard scenario whose ceiling is >= 1.5x,
>= 1.0x on all; priority-weighted >= 1.3x; the top tier's SLO attainment >= every baseline's. All
policies are served by the same simulated worker (SLO pacing, the same host memory); the baselines are
described in ``residency_operator.simulator.baselines``. Scenarios marked ``extra`` are listed apart.

``--sweep`` adds a memory-pressure sweep: the same models and seed as a standard scenario, on the same
nodes with their GPU memory scaled so that the models' whole footprint is 0.5x, 1x, 1.5x and 2x of the
fleet's usable GPU memory, each at the shipped request rates and at twice them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from residency_operator.planner.options import gpu_bytes_needed, usable_gpu_bytes
from residency_operator.planner.types import SensitivityProfile
from residency_operator.simulator.cluster import Scenario, load_scenario
from residency_operator.simulator.measured import REPORT, EngineModel, MeasuredEngine
from residency_operator.simulator.policies import VARIANTS
from residency_operator.simulator.report import (
    PolicyReport,
    ceiling_line,
    format_table,
    format_tiers,
    write_json,
    write_plot,
)
from residency_operator.simulator.runner import (
    POLICY_NAMES,
    run_policy,
    scenario_requests,
    standard_scenarios,
    with_seed,
)

RESULTS = Path(__file__).parent / "results"
GOAL = 1.3
SPLIT_GOAL = 1.3
"""Issue 30: on a multi-GPU scenario, residency with splits over residency without (offload only)."""


def policies_for(scenario: Scenario) -> tuple[str, ...]:
    """The policies a scenario is run with: every one, plus residency without splits where a node has
    several GPUs (the ablation issue 30 measures splitting against)."""
    multi_gpu = any(len(n.gpus) > 1 for n in scenario.nodes)
    return (*POLICY_NAMES, *VARIANTS) if multi_gpu else POLICY_NAMES


def is_baseline(policy: str) -> bool:
    """Today's policies residency is compared with (not residency, nor an ablation of it)."""
    return policy != "residency" and policy not in VARIANTS


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


def compare(
    scenario: Scenario,
    policies: tuple[str, ...] = POLICY_NAMES,
    engine: EngineModel | None = None,
    profiles: Sequence[SensitivityProfile] = (),
) -> tuple[list[PolicyReport], dict[str, float]]:
    """Every policy (or those named) on the scenario's one seeded trace, served by ``engine`` (default: the
    planner's own predictor); returns the reports and the run seconds."""
    requests = scenario_requests(scenario)
    reports = []
    seconds: dict[str, float] = {}
    for policy in policies:
        started = time.perf_counter()
        reports.append(run_policy(scenario, policy, requests, engine=engine, profiles=profiles))
        seconds[policy] = time.perf_counter() - started
    return reports, seconds


def seed_row(scenario: Scenario, reports: list[PolicyReport], offered: float) -> dict[str, Any]:
    """Residency / best baseline (and the ceiling) of one seeded run."""
    ours = next(r for r in reports if r.policy == "residency")
    best = max((r for r in reports if is_baseline(r.policy)), key=lambda r: r.goodput_tokens_per_second)
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
        f"{'scenario':<18}{'pressure':>9}{'load':>6}{'fleet GiB':>10}"
        + "".join(f"{p[:10]:>11}" for p in POLICY_NAMES)
        + f"{'offered':>9}{'ratio':>8}{'ceiling':>9}  verdict"
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
            + "".join(f"{goodput[p]:>11.1f}" for p in POLICY_NAMES)
            + f"{row['offered_tokens_per_second']:>9.1f}{row['ratio']:>7.2f}x"
            f"{row['ceiling_ratio']:>8.2f}x  {verdict}"
        )


SeedRun = tuple[float, list[PolicyReport], dict[str, float]]
"""The offered load (tok/s), every policy's report and its run seconds, of one seed."""


@dataclasses.dataclass(frozen=True)
class Scoring:
    """What serves the simulated requests: the planner's own predictor (``engine`` None), or an engine
    fitted to a measured report, with the planner given that engine's profiles when ``profiled``."""

    engine: MeasuredEngine | None = None
    profiled: bool = False

    def served_by(self, scenario: Scenario) -> tuple[EngineModel | None, list[SensitivityProfile]]:
        if self.engine is None or not self.profiled:
            return self.engine, []
        return self.engine, self.engine.profiles([m.demand() for m in scenario.models], scenario.nodes)


def _seed_run(
    base: Scenario, offset: int, policies: tuple[str, ...] = POLICY_NAMES, scoring: Scoring = Scoring()
) -> SeedRun:
    """The policies' run at ``base.seed + offset``."""
    scenario = with_seed(base, base.seed + offset) if offset else base
    offered = sum(r.output_tokens for r in scenario_requests(scenario)) / scenario.duration_seconds
    engine, profiles = scoring.served_by(scenario)
    reports, took = compare(scenario, policies, engine, profiles)
    return offered, reports, took


def run_seeds(
    base: Scenario,
    offsets: list[int],
    jobs: int = 1,
    policies: tuple[str, ...] = POLICY_NAMES,
    scoring: Scoring = Scoring(),
) -> dict[int, SeedRun]:
    """The policies' runs at ``base.seed + offset`` for each offset, in ``jobs`` processes at once (each
    seed's run is the same as in one process)."""
    if jobs > 1 and len(offsets) > 1:
        with multiprocessing.Pool(min(jobs, len(offsets))) as pool:
            runs = pool.starmap(_seed_run, [(base, offset, policies, scoring) for offset in offsets])
        return dict(zip(offsets, runs, strict=True))
    return {offset: _seed_run(base, offset, policies, scoring) for offset in offsets}


def seed_record(
    seed: int, offered: float, reports: list[PolicyReport], seconds: dict[str, float]
) -> dict[str, Any]:
    """What the table needs of one seeded run (JSON-ready: runs of one scenario made apart, e.g. its seeds
    split over two invocations, are merged from these; see ``--merge``)."""
    return {
        "seed": seed,
        "offered_tokens_per_second": offered,
        "policies": {
            r.policy: {
                "goodput": r.goodput_tokens_per_second,
                "weighted": weighted(r),
                "attainment": {str(t): v for t, v in r.slo_attainment_by_priority.items()},
                "goodput_by_priority": {
                    str(t): v for t, v in r.goodput_by_priority_tokens_per_second.items()
                },
                "requests_by_priority": {str(t): v for t, v in r.requests_by_priority.items()},
                "preemptions": float(r.preemptions),
                "evictions": float(r.evictions),
                "loads": float(r.loads),
                "resumes": float(r.resumes),
                "migrations": float(r.migrations),
                "seconds": seconds.get(r.policy, 0.0),
            }
            for r in reports
        },
    }


def scenario_means(
    base: Scenario,
    seeds: int,
    first: tuple[list[PolicyReport], dict[str, float]] | None = None,
    jobs: int = 1,
    runs: dict[int, SeedRun] | None = None,
    engine: MeasuredEngine | None = None,
    profiled: bool = False,
) -> dict[str, Any]:
    """Every policy at the scenario's own seed and the next ``seeds - 1``: per policy the mean SLO-met
    goodput, priority-weighted goodput, per-tier SLO attainment and churn, and the mean offered load.
    ``first``: the reports (and seconds) of the run at the scenario's own seed, if already made; ``jobs``:
    seeds run side by side in that many processes; ``runs``: seeds already run (by offset)."""
    offsets = range(seeds if base.trace_path is None else 1)
    done = dict(runs or {})
    todo = [offset for offset in offsets if offset not in done and not (offset == 0 and first is not None)]
    done.update(run_seeds(base, todo, jobs, policies_for(base), scoring=Scoring(engine, profiled)))
    records = []
    for offset in offsets:
        if offset == 0 and first is not None:
            offered = sum(r.output_tokens for r in scenario_requests(base)) / base.duration_seconds
            records.append(seed_record(base.seed, offered, *first))
        else:
            records.append(seed_record(base.seed + offset, *done[offset]))
    return summarise_records(base.name, base.extra, memory_pressure(base), records)


def partial_row(base: Scenario, runs: dict[int, SeedRun]) -> dict[str, Any]:
    """The seeded runs of some of the policies only (``--policy``): records to merge, no table yet."""
    return {
        "scenario": base.name,
        "extra": base.extra,
        "memory_pressure": memory_pressure(base),
        "partial": True,
        "records": [seed_record(base.seed + offset, *runs[offset]) for offset in sorted(runs)],
    }


def summarise_records(
    name: str, extra: bool, pressure: float, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """The policy table's row of one scenario from its seeded runs (see :func:`seed_record`)."""
    policies = list(records[0]["policies"])
    tiers = sorted(
        {
            int(t)
            for record in records
            for v in record["policies"].values()
            for t in v["requests_by_priority"]
        },
        reverse=True,
    )

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    by_policy: dict[str, dict[str, Any]] = {}
    for policy in policies:
        runs = [record["policies"][policy] for record in records]
        by_policy[policy] = {
            "goodput": mean([r["goodput"] for r in runs]),
            "weighted": mean([r["weighted"] for r in runs]),
            "attainment": {t: mean([r["attainment"].get(str(t), 0.0) for r in runs]) for t in tiers},
            "goodput_by_priority": {
                t: mean([r["goodput_by_priority"].get(str(t), 0.0) for r in runs]) for t in tiers
            },
            **{
                churn: mean([r[churn] for r in runs])
                for churn in ("preemptions", "evictions", "loads", "resumes", "migrations", "seconds")
            },
        }
    offered = mean([record["offered_tokens_per_second"] for record in records])
    ours = by_policy["residency"]
    theirs = {p: v for p, v in by_policy.items() if is_baseline(p)}
    best = max(theirs, key=lambda p: theirs[p]["goodput"])
    best_weighted = max(theirs, key=lambda p: theirs[p]["weighted"])
    top = tiers[0] if tiers else 0
    per_seed = [
        _ratio(
            record["policies"]["residency"]["goodput"],
            max(v["goodput"] for p, v in record["policies"].items() if is_baseline(p)),
        )
        for record in records
    ]
    return {
        "scenario": name,
        "extra": extra,
        "seeds": len(records),
        "first_seed": records[0]["seed"],
        "offered_tokens_per_second": offered,
        "memory_pressure": pressure,
        "policies": by_policy,
        "best_baseline": best,
        "ratio": _ratio(ours["goodput"], theirs[best]["goodput"]),
        "ceiling_ratio": _ratio(offered, theirs[best]["goodput"]),
        "per_seed_ratio": per_seed,
        "best_weighted_baseline": best_weighted,
        "weighted_ratio": _ratio(ours["weighted"], theirs[best_weighted]["weighted"])
        if theirs[best_weighted]["weighted"]
        else None,
        "top_tier": top,
        "top_tier_attainment_residency": ours["attainment"].get(top, 0.0),
        "top_tier_attainment_best_baseline": max(v["attainment"].get(top, 0.0) for v in theirs.values()),
        "variant_ratios": {
            variant: {
                "ratio": _ratio(ours["goodput"], by_policy[variant]["goodput"]),
                "per_seed": [
                    _ratio(r["policies"]["residency"]["goodput"], r["policies"][variant]["goodput"])
                    for r in records
                ],
            }
            for variant in VARIANTS
            if variant in by_policy
        },
        "records": records,
    }


def merge_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's rows from invocations that ran different seeds of it, or different policies at the
    same seeds (``--policy``), as one row over all seeds; each seed must end up with every policy."""
    by_seed: dict[int, dict[str, Any]] = {}
    for row in rows:
        for record in row["records"]:
            seed = int(record["seed"])
            merged = by_seed.setdefault(
                seed,
                {
                    "seed": seed,
                    "offered_tokens_per_second": record["offered_tokens_per_second"],
                    "policies": {},
                },
            )
            if abs(merged["offered_tokens_per_second"] - record["offered_tokens_per_second"]) > 1e-6:
                raise ValueError(f"{row['scenario']}: seed {seed} replayed two different traces")
            for policy, values in record["policies"].items():
                if policy in merged["policies"]:
                    raise ValueError(f"{row['scenario']}: seed {seed} ran {policy} twice")
                merged["policies"][policy] = values
    records = [by_seed[seed] for seed in sorted(by_seed)]
    ran = {p for record in records for p in record["policies"]}
    expected = [p for p in (*POLICY_NAMES, *VARIANTS) if p in POLICY_NAMES or p in ran]
    for record in records:
        missing = sorted(set(expected) - set(record["policies"]))
        if missing:
            raise ValueError(f"{rows[0]['scenario']}: seed {record['seed']} lacks {', '.join(missing)}")
        record["policies"] = {p: record["policies"][p] for p in expected}
    return summarise_records(rows[0]["scenario"], rows[0]["extra"], rows[0]["memory_pressure"], records)


def verdict(row: dict[str, Any]) -> str:
    """The issue's goal for one scenario: >= 1.3x where the ceiling is >= 1.5x, >= 1.0x elsewhere."""
    goal = GOAL if row["ceiling_ratio"] >= 1.5 else 1.0
    met = row["ratio"] >= goal
    return f"{goal:g}x {'met' if met else 'NOT met'}"


def print_summary(rows: list[dict[str, Any]], scored_by: str = "the planner's own predictor") -> None:
    """The policy table: per scenario mean goodput of each policy, ratio, ceiling, goal."""
    policies = list(dict.fromkeys(p for row in rows for p in row["policies"]))
    seeds = rows[0]["seeds"] if rows else 0

    def label(policy: str) -> str:
        return policy.removeprefix("residency-") if policy in VARIANTS else policy[:10]

    print(
        f"\nScored by {scored_by}."
        f"\nSLO-met goodput (tok/s), mean of {seeds} seed(s) per scenario; ratio = residency / best baseline;"
        "\nceiling = offered / best baseline; w ratio = priority-weighted goodput ratio"
    )
    header = f"{'scenario':<20}" + "".join(f"{label(p):>11}" for p in policies)
    header += f"{'offered':>9}{'ratio':>8}{'ceiling':>9}{'w ratio':>9}  goal"
    print(header)
    print("-" * len(header))
    for row in rows:
        name = row["scenario"] + (" *" if row["extra"] else "")
        cells = "".join(
            f"{row['policies'][p]['goodput']:>11.1f}" if p in row["policies"] else f"{'-':>11}"
            for p in policies
        )
        w = "-" if row["weighted_ratio"] is None else f"{row['weighted_ratio']:.2f}x"
        print(
            f"{name:<20}{cells}{row['offered_tokens_per_second']:>9.1f}{row['ratio']:>7.2f}x"
            f"{row['ceiling_ratio']:>8.2f}x{w:>9}  {verdict(row)}"
        )
    if any(r["extra"] for r in rows):
        print("* extra scenario, not one of the standard ones")
    print("\nSLO attainment by priority tier (mean over seeds), each policy")
    for row in rows:
        tiers = list(row["policies"]["residency"]["attainment"])
        if len(tiers) < 2:
            continue
        print(f"{row['scenario']}:")
        ran = [p for p in policies if p in row["policies"]]
        print(f"  {'priority':>8}" + "".join(f"{label(p):>11}" for p in ran))
        for tier in tiers:
            print(f"  {tier:>8}" + "".join(f"{row['policies'][p]['attainment'][tier]:>11.1%}" for p in ran))
        print(
            f"  top tier {row['top_tier']}: residency {row['top_tier_attainment_residency']:.1%} vs best "
            f"baseline {row['top_tier_attainment_best_baseline']:.1%}"
        )
    print(
        "\nPriority-weighted goodput (tok/s x priority) and churn per run (mean over seeds): preemptions,"
        "\ncold loads, resumes from host memory, migrations"
    )
    header = f"  {'scenario':<20}{'policy':<17}{'weighted':>11}{'preempt':>9}{'loads':>8}"
    header += f"{'resumes':>9}{'migrate':>9}"
    print(header)
    for row in rows:
        for p in policies:
            if p not in row["policies"]:
                continue
            v = row["policies"][p]
            print(
                f"  {row['scenario']:<20}{p:<17}{v['weighted']:>11.0f}{v['preemptions']:>9.0f}"
                f"{v['loads']:>8.0f}{v['resumes']:>9.0f}{v['migrations']:>9.0f}"
            )
    print("\nPer seed, residency / best baseline:")
    for row in rows:
        print(f"  {row['scenario']:<20}" + " ".join(f"{r:.2f}x" for r in row["per_seed_ratio"]))
    split_rows = [row for row in rows if row.get("variant_ratios")]
    if split_rows:
        print(f"\nResidency with splits across a node's GPUs / without (offload only); goal {SPLIT_GOAL:g}x:")
        for row in split_rows:
            for variant, found in row["variant_ratios"].items():
                met = "met" if found["ratio"] >= SPLIT_GOAL else "NOT met"
                print(
                    f"  {row['scenario']:<20}residency / {variant}: {found['ratio']:.2f}x ({met}); per seed "
                    + " ".join(f"{r:.2f}x" for r in found["per_seed"])
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", action="append", help="scenario name (default: all shipped ones)")
    parser.add_argument("--seed", type=int, default=None, help="override each scenario's first seed")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per scenario (the means are over them)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="run the seeds of a scenario in this many processes at once"
    )
    parser.add_argument("--sweep", action="store_true", help="also run the memory-pressure sweep")
    parser.add_argument("--out", type=Path, default=RESULTS / "policies.json", help="where the JSON goes")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print one table from the JSON of runs made apart (e.g. a scenario's seeds split over two "
        "invocations with --seed and --seeds) and write it to --out; runs nothing",
    )
    parser.add_argument(
        "--policy",
        action="append",
        choices=(*POLICY_NAMES, *VARIANTS),
        help="run only these policies (repeatable); writes the runs for --merge, prints no table",
    )
    parser.add_argument(
        "--engine-report",
        type=Path,
        default=REPORT,
        help="measured report JSON the second table is scored by (simulator/measured.py)",
    )
    parser.add_argument(
        "--no-measured", action="store_true", help="skip the tables scored by the measured engine"
    )
    parser.add_argument(
        "--no-admission",
        action="store_true",
        help="serve without the router's admission (every request queues until served or timed out), "
        "as the simulator did before it modelled the router's 429s: for before/after comparisons",
    )
    args = parser.parse_args()
    if args.merge:
        merge_files(args.merge, args.out)
        return
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    all_reports: dict[str, list[PolicyReport]] = {}
    started = time.perf_counter()
    for path in standard_scenarios():
        scenario = load_scenario(path)
        if args.scenario and scenario.name not in args.scenario:
            continue
        if args.seed is not None:
            scenario.seed = args.seed
        if args.no_admission:
            scenario.router_admission = False
        offsets = list(range(args.seeds if scenario.trace_path is None else 1))
        if args.policy:
            policies = tuple(p for p in policies_for(scenario) if p in args.policy)
            rows.append(partial_row(scenario, run_seeds(scenario, offsets, args.jobs, policies)))
            print(
                f"{scenario.name}: {', '.join(policies)} at {len(offsets)} seed(s) from {scenario.seed}",
                flush=True,
            )
            continue
        requests = scenario_requests(scenario)
        runs = run_seeds(scenario, offsets, args.jobs, policies_for(scenario))
        _, reports, _ = runs[0]
        all_reports[scenario.name] = reports
        offered = sum(r.output_tokens for r in requests) / scenario.duration_seconds
        label = " (extra scenario)" if scenario.extra else ""
        print(
            f"\n{scenario.name}{label}: {len(scenario.models)} models, {len(scenario.nodes)} nodes, "
            f"{len(requests)} requests over {scenario.duration_seconds:.0f} s (seed {scenario.seed}); "
            f"memory pressure {memory_pressure(scenario):.2f}x",
            flush=True,
        )
        print(format_table(reports))
        print(ceiling_line(reports, offered))
        print(format_tiers(reports), flush=True)
        rows.append(scenario_means(scenario, args.seeds, runs=runs))
        if args.sweep and scenario.name in SWEEP_SCENARIOS:
            sweep_rows.extend(sweep(scenario))
        if not args.scenario:
            RESULTS.mkdir(parents=True, exist_ok=True)
            write_plot(
                reports,
                RESULTS / f"policies-{scenario.name}.png",
                f"{scenario.name}: SLO-met goodput by policy",
            )
    measured_rows: list[dict[str, Any]] = []
    profiled_rows: list[dict[str, Any]] = []
    if not args.policy:
        print_summary(rows)
    if not args.policy and not args.no_measured:
        # The same planner, the same traces; requests served at what the measured engine really does,
        # then the planner given the curves the workers would measure of that engine.
        measured = MeasuredEngine.from_report(args.engine_report)
        for path in standard_scenarios():
            scenario = load_scenario(path)
            if args.scenario and scenario.name not in args.scenario:
                continue
            if args.seed is not None:
                scenario.seed = args.seed
            for profiled, found in ((False, measured_rows), (True, profiled_rows)):
                found.append(
                    scenario_means(scenario, args.seeds, jobs=args.jobs, engine=measured, profiled=profiled)
                )
        print_summary(measured_rows, f"the measured engine ({measured.source}, simulator/measured.py)")
        print_summary(
            profiled_rows,
            "the measured engine, residency planning with the profiles its workers would publish of it",
        )
    if sweep_rows:
        print_sweep(sweep_rows)
    write_json(
        all_reports,
        args.out,
        {
            "summary": rows,
            "summary_measured_engine": measured_rows,
            "summary_measured_engine_profiled": profiled_rows,
            "memory_sweep": sweep_rows,
            "seeds": args.seeds,
            "machine": platform.platform(),
            "wall_seconds": time.perf_counter() - started,
        },
    )
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


def merge_files(paths: list[Path], out: Path) -> None:
    """The policy table over the runs of several ``bench_policies`` JSON files (see ``--merge``)."""
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["summary"]:
            by_scenario.setdefault(row["scenario"], []).append(row)
    rows = [merge_rows(by_scenario[name]) for name in sorted(by_scenario)]
    print_summary(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"summary": rows, "merged_from": [str(p) for p in paths], "machine": platform.platform()},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out}")


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("inf")


if __name__ == "__main__":
    main()
