"""SLO-met goodput of residency against today's policies on the standard scenarios.

Run: ``python benchmarks/bench_policies.py`` (prints one table per scenario and a summary of ratios,
writes benchmarks/results/policies.json and one PNG per scenario). Goal: residency >= 1.3x the best
baseline on every scenario. All policies of a scenario replay the same seeded trace in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

from residency_operator.simulator.cluster import load_scenario
from residency_operator.simulator.report import PolicyReport, format_table, write_json, write_plot
from residency_operator.simulator.runner import (
    POLICY_NAMES,
    run_policy,
    scenario_requests,
    standard_scenarios,
)

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", action="append", help="scenario name (default: all standard ones)")
    parser.add_argument("--seed", type=int, default=None, help="override each scenario's seed")
    args = parser.parse_args()
    all_reports: dict[str, list[PolicyReport]] = {}
    summary: list[dict[str, Any]] = []
    for path in standard_scenarios():
        scenario = load_scenario(path)
        if args.scenario and scenario.name not in args.scenario:
            continue
        if args.seed is not None:
            scenario.seed = args.seed
        requests = scenario_requests(scenario)
        reports = []
        seconds: dict[str, float] = {}
        for policy in POLICY_NAMES:
            started = time.perf_counter()
            reports.append(run_policy(scenario, policy, requests))
            seconds[policy] = time.perf_counter() - started
        all_reports[scenario.name] = reports
        print(
            f"\n{scenario.name}: {len(scenario.models)} models, {len(scenario.nodes)} nodes, "
            f"{len(requests)} requests over {scenario.duration_seconds:.0f} s (seed {scenario.seed})"
        )
        print(format_table(reports))
        ours = next(r for r in reports if r.policy == "residency")
        best = max((r for r in reports if r.policy != "residency"), key=lambda r: r.goodput_tokens_per_second)
        ratio = (
            ours.goodput_tokens_per_second / best.goodput_tokens_per_second
            if best.goodput_tokens_per_second
            else float("inf")
        )
        summary.append(
            {
                "scenario": scenario.name,
                "residency_goodput": ours.goodput_tokens_per_second,
                "best_baseline": best.policy,
                "best_baseline_goodput": best.goodput_tokens_per_second,
                "ratio": ratio,
                "residency_goodput_by_priority": ours.goodput_by_priority_tokens_per_second,
                "best_baseline_goodput_by_priority": best.goodput_by_priority_tokens_per_second,
                "simulation_seconds": seconds,
            }
        )
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_plot(
            reports, RESULTS / f"policies-{scenario.name}.png", f"{scenario.name}: SLO-met goodput by policy"
        )
    header = (
        f"{'scenario':<20}{'residency tok/s':>16}{'best baseline':>18}{'its tok/s':>11}{'ratio':>8}  goal"
    )
    print("\n" + header)
    print("-" * len(header))
    for row in summary:
        verdict = "1.3x met" if row["ratio"] >= 1.3 else "1.3x NOT met"
        print(
            f"{row['scenario']:<20}{row['residency_goodput']:>16.1f}{row['best_baseline']:>18}"
            f"{row['best_baseline_goodput']:>11.1f}{row['ratio']:>7.2f}x  {verdict}"
        )
    for row in summary:
        tiers = row["residency_goodput_by_priority"]
        if len(tiers) > 1:
            theirs = row["best_baseline_goodput_by_priority"]
            split = ", ".join(f"priority {p}: {tiers[p]:.1f} vs {theirs.get(p, 0.0):.1f}" for p in tiers)
            print(f"{row['scenario']}: goodput by priority, residency vs {row['best_baseline']}: {split}")
    write_json(all_reports, RESULTS / "policies.json", {"summary": summary, "machine": platform.platform()})
    print(f"wrote {RESULTS / 'policies.json'}")


if __name__ == "__main__":
    main()
