"""Quick churn check: the first seconds of scenarios, seed by seed, with each policy's SLO-met goodput,
its churn (preemptions, migrations, cold loads, resumes from host memory, reload seconds) and SLO
attainment per priority tier, then the means over the seeds.

Run: ``python benchmarks/bench_churn.py --scenario fleet-zipf-shift --duration 600 --seeds 11 12 13 14``
(``--policy`` repeatable, residency alone by default; ``--duration 0`` runs each scenario whole). The
short loop the reseating work of issue 26 was measured with (docs/planner.md, "Fewer reseatings"); the
policy tables of record come from bench_policies.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from residency_operator.simulator.cluster import load_scenario
from residency_operator.simulator.policies import SIMULATION_PLANNER_CONFIG
from residency_operator.simulator.report import PolicyReport
from residency_operator.simulator.runner import (
    POLICY_NAMES,
    run_policy,
    scenario_requests,
    standard_scenarios,
)


def churn_line(scenario: str, seed: int, report: PolicyReport, offered: float, seconds: float) -> str:
    tiers = " ".join(
        f"{tier}:{share * 100:.0f}%"
        for tier, share in sorted(report.slo_attainment_by_priority.items())[::-1]
    )
    return (
        f"{scenario:20s} seed={seed:<3d} {report.policy:10s} goodput={report.goodput_tokens_per_second:7.1f} "
        f"offered={offered:7.1f} preempt={report.preemptions} migrate={report.migrations} "
        f"cold={report.loads} resume={report.resumes} reload_s={report.reload_seconds:.0f} "
        f"[{tiers}] ({seconds:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", action="append", required=True, help="scenario name (repeatable)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of each run (0: whole)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the scenario's own)")
    parser.add_argument("--policy", action="append", choices=POLICY_NAMES, help="policies (repeatable)")
    parser.add_argument(
        "--incumbent-time-slack",
        type=float,
        default=SIMULATION_PLANNER_CONFIG.incumbent_time_slack,
        help='residency\'s PlannerConfig.incumbent_time_slack (docs/planner.md, "Fewer reseatings")',
    )
    parser.add_argument(
        "--no-admission",
        action="store_true",
        help="requests queue without the router's admission (the simulator before it modelled the router)",
    )
    args = parser.parse_args()
    policies = args.policy or ["residency"]
    config = dataclasses.replace(SIMULATION_PLANNER_CONFIG, incumbent_time_slack=args.incumbent_time_slack)
    paths = {path.stem: path for path in standard_scenarios()}
    for name in args.scenario:
        if name not in paths:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(sorted(paths))}")
        base = load_scenario(paths[name])
        duration = min(args.duration, base.duration_seconds) if args.duration > 0 else base.duration_seconds
        reports: dict[str, list[PolicyReport]] = {policy: [] for policy in policies}
        for seed in args.seeds or [base.seed]:
            scenario = dataclasses.replace(
                base,
                seed=seed,
                duration_seconds=duration,
                router_admission=base.router_admission and not args.no_admission,
            )
            requests = scenario_requests(scenario)
            offered = sum(r.output_tokens for r in requests) / duration
            for policy in policies:
                started = time.perf_counter()
                report = run_policy(scenario, policy, requests, config)
                reports[policy].append(report)
                print(churn_line(name, seed, report, offered, time.perf_counter() - started), flush=True)
        for policy, runs in reports.items():
            top = min(r.slo_attainment_by_priority[max(r.slo_attainment_by_priority)] for r in runs)
            print(
                f"{name:20s} mean of {len(runs)} {policy:10s} "
                f"goodput={statistics.mean(r.goodput_tokens_per_second for r in runs):7.1f} "
                f"preempt={statistics.mean(r.preemptions for r in runs):.0f} "
                f"migrate={statistics.mean(r.migrations for r in runs):.0f} "
                f"cold={statistics.mean(r.loads for r in runs):.0f} "
                f"resume={statistics.mean(r.resumes for r in runs):.0f} "
                f"top tier min={top * 100:.0f}%"
            )


if __name__ == "__main__":
    main()
