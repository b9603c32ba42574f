"""The policy benchmark's helpers: the scenario variants it replays and the seed spread it reports."""

from __future__ import annotations

import json
from types import ModuleType

import bench_modules
import pytest

from residency_operator.simulator.cluster import Scenario, SimModel, parse_cluster
from residency_operator.simulator.runner import scenario_requests


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return bench_modules.load("bench_policies")


def tiny_scenario(seed: int = 5) -> Scenario:
    """Two small models on two nodes, briefly: four policies finish in a second or two."""
    return Scenario(
        name="tiny",
        description="",
        nodes=parse_cluster(
            [{"preset": "l4", "name": "l4", "count": 1}, {"preset": "a6000-pcie4", "name": "a6"}]
        ),
        models=[
            SimModel(name="ns/small", family="llama-1b", min_decode_tokens_per_second=10.0),
            SimModel(name="ns/large", family="llama-8b", min_decode_tokens_per_second=10.0),
        ],
        workload={"pattern": "poisson", "total_rate_per_second": 1.0, "output_tokens_mean": 32},
        duration_seconds=60.0,
        seed=seed,
    )


def test_seed_spread_replays_further_seeds_and_summarises_them(bench: ModuleType) -> None:
    scenario = tiny_scenario()
    reports, _ = bench.compare(scenario)
    offered = sum(r.output_tokens for r in scenario_requests(scenario)) / scenario.duration_seconds
    first = bench.seed_row(scenario, reports, offered)
    spread = bench.seed_spread(scenario, first, 3)

    rows = spread["per_seed"]
    assert [row["seed"] for row in rows] == [5, 6, 7]
    assert rows[0] is first
    # Other seeds are other traces, not the first one again.
    assert len({round(row["offered_tokens_per_second"], 6) for row in rows}) > 1
    ratios = [row["ratio"] for row in rows]
    assert spread["mean_ratio"] == pytest.approx(sum(ratios) / 3)
    assert spread["min_ratio"] == min(ratios) and spread["max_ratio"] == max(ratios)
    for row in rows:
        goodput = {
            r.policy: r.goodput_tokens_per_second for r in bench.compare(tiny_scenario(row["seed"]))[0]
        }
        best = max(value for policy, value in goodput.items() if policy != "residency")
        assert row["residency_goodput"] == pytest.approx(goodput["residency"])
        assert row["best_baseline_goodput"] == pytest.approx(best)
        assert row["ratio"] == pytest.approx(goodput["residency"] / best)
        # No policy serves more than is asked, so the ceiling bounds every policy's ratio.
        assert row["ratio"] <= row["ceiling_ratio"] + 1e-9
    # The scenario passed in is left as it was.
    assert scenario.seed == 5


def test_load_and_memory_pressure_variants(bench: ModuleType) -> None:
    scenario = tiny_scenario()
    doubled = bench.at_load(scenario, 2.0)
    assert doubled.workload["total_rate_per_second"] == 2.0
    assert scenario.workload["total_rate_per_second"] == 1.0
    assert len(scenario_requests(doubled)) > 1.5 * len(scenario_requests(scenario))
    assert bench.at_load(scenario, 1.0) is scenario

    for pressure in (0.5, 2.0):
        scaled = bench.at_memory_pressure(scenario, pressure)
        assert bench.memory_pressure(scaled) == pytest.approx(pressure, rel=1e-3)
        # Only GPU memory changes: models, bandwidths and seed stay.
        assert scaled.models == scenario.models and scaled.seed == scenario.seed
        assert [n.hbm_gbps for n in scaled.nodes] == [n.hbm_gbps for n in scenario.nodes]


def test_scenario_means_average_every_policy_over_seeds(bench: ModuleType) -> None:
    scenario = tiny_scenario()
    row = bench.scenario_means(scenario, 2)
    assert row["seeds"] == 2 and len(row["per_seed_ratio"]) == 2
    goodputs = [
        {r.policy: r.goodput_tokens_per_second for r in bench.compare(tiny_scenario(seed))[0]}
        for seed in (5, 6)
    ]
    for policy, mean in row["policies"].items():
        assert mean["goodput"] == pytest.approx(sum(g[policy] for g in goodputs) / 2)
    best = row["best_baseline"]
    assert best != "residency" and "sleep-swap" in row["policies"]
    assert row["ratio"] == pytest.approx(
        row["policies"]["residency"]["goodput"] / row["policies"][best]["goodput"]
    )
    assert row["ratio"] <= row["ceiling_ratio"] + 1e-9
    # The goal: 1.3x where the ceiling allows 1.5x, else not falling behind.
    assert bench.verdict({"ratio": 1.31, "ceiling_ratio": 2.0}) == "1.3x met"
    assert bench.verdict({"ratio": 1.2, "ceiling_ratio": 2.0}) == "1.3x NOT met"
    assert bench.verdict({"ratio": 1.0, "ceiling_ratio": 1.2}) == "1x met"


def test_seeds_split_over_invocations_merge_into_the_same_row(bench: ModuleType) -> None:
    whole = bench.scenario_means(tiny_scenario(), 2)
    halves = [bench.scenario_means(tiny_scenario(seed), 1) for seed in (6, 5)]
    merged = bench.merge_rows(json.loads(json.dumps(halves, default=str)))  # as read back from the JSON
    assert merged["seeds"] == 2 and merged["first_seed"] == 5
    for key in ("ratio", "ceiling_ratio", "weighted_ratio", "offered_tokens_per_second"):
        assert merged[key] == pytest.approx(whole[key])
    for policy, mean in whole["policies"].items():
        for key in ("goodput", "weighted", "preemptions", "loads", "resumes", "migrations"):
            assert merged["policies"][policy][key] == pytest.approx(mean[key])
        assert merged["policies"][policy]["attainment"] == pytest.approx(mean["attainment"])
    with pytest.raises(ValueError, match="ran residency twice"):
        bench.merge_rows([halves[0], halves[0]])


def test_seeds_in_parallel_processes_give_the_same_row(bench: ModuleType) -> None:
    serial = bench.scenario_means(tiny_scenario(), 3)
    parallel = bench.scenario_means(tiny_scenario(), 3, jobs=2)
    assert parallel["per_seed_ratio"] == pytest.approx(serial["per_seed_ratio"])
    assert parallel["policies"]["residency"]["goodput"] == pytest.approx(
        serial["policies"]["residency"]["goodput"]
    )


def test_policies_run_apart_merge_into_the_same_row(bench: ModuleType) -> None:
    scenario = tiny_scenario()
    whole = bench.scenario_means(scenario, 2)
    baselines = tuple(p for p in bench.POLICY_NAMES if p != "residency")
    apart = [
        bench.partial_row(scenario, bench.run_seeds(scenario, [0, 1], 1, policies))
        for policies in (("residency",), baselines)
    ]
    merged = bench.merge_rows(json.loads(json.dumps(apart, default=str)))
    assert list(merged["policies"]) == list(whole["policies"])
    assert merged["ratio"] == pytest.approx(whole["ratio"])
    assert merged["per_seed_ratio"] == pytest.approx(whole["per_seed_ratio"])
    with pytest.raises(ValueError, match="lacks residency"):
        bench.merge_rows([apart[1]])
