"""Run a scenario under one or more policies and collect reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from residency_operator.planner.types import PlannerConfig
from residency_operator.simulator.cluster import (
    MODEL_FAMILIES,
    Scenario,
    SimModel,
    family_for_name,
    load_scenario,
    parse_cluster,
)
from residency_operator.simulator.engine import Policy, Simulation
from residency_operator.simulator.policies import (
    BinpackPolicy,
    LruEvictPolicy,
    ResidencyPolicy,
    UniformOffloadPolicy,
)
from residency_operator.simulator.report import PolicyReport, summarise
from residency_operator.simulator.trace import Request, generate_trace, read_trace_csv

POLICY_NAMES = ("residency", "lru-evict", "uniform-offload", "binpack")
SCENARIO_DIR = Path(__file__).parent / "scenarios"


def make_policy(name: str, planner_config: PlannerConfig | None = None) -> Policy:
    """A fresh policy by name."""
    if name == "residency":
        return ResidencyPolicy(planner_config)
    if name == "lru-evict":
        return LruEvictPolicy()
    if name == "uniform-offload":
        return UniformOffloadPolicy()
    if name == "binpack":
        return BinpackPolicy()
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}, all")


def standard_scenarios() -> list[Path]:
    """The scenario files shipped with residency, in name order."""
    return sorted(SCENARIO_DIR.glob("*.yaml"))


def parse_generate_spec(spec: str, cluster: str | None, seed: int) -> Scenario:
    """A scenario from a file path or a shorthand ``pattern:models=8,rate=4,duration=600,zipf=1.1``."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.exists():
        scenario = load_scenario(path)
        if cluster:
            scenario.nodes = parse_cluster(cluster)
        scenario.seed = seed
        return scenario
    pattern, _, options_text = spec.partition(":")
    options: dict[str, str] = {}
    for part in filter(None, options_text.split(",")):
        key, _, value = part.partition("=")
        options[key.strip()] = value.strip()
    families = ["llama-1b", "llama-3b", "llama-8b", "mistral-7b", "llama-13b", "qwen-0.5b"]
    count = int(options.get("models", 8))
    models = [
        SimModel(
            name=f"default/{families[i % len(families)]}-{i}",
            family=families[i % len(families)],
            min_decode_tokens_per_second=float(options.get("slo", 10.0)),
        )
        for i in range(count)
    ]
    workload: dict[str, Any] = {
        "pattern": pattern or "poisson",
        "total_rate_per_second": float(options.get("rate", 2.0)),
        "popularity": "zipf" if "zipf" in options else "uniform",
        "zipf_exponent": float(options.get("zipf", 1.1)),
    }
    return Scenario(
        name=f"generated-{pattern or 'poisson'}",
        description=f"generated from {spec!r}",
        nodes=parse_cluster(cluster or "h100-pcie5:1,a6000-pcie4:1,l4:2"),
        models=models,
        workload=workload,
        duration_seconds=float(options.get("duration", 600.0)),
        seed=seed,
    )


def scenario_from_trace(trace_path: str, cluster: str | None, requests: Sequence[Request]) -> Scenario:
    """A scenario for a CSV trace: models are inferred from names (``…llama-8b…`` → that family)."""
    names = sorted({r.model for r in requests})
    models = [SimModel(name=name, family=family_for_name(name)) for name in names]
    assert all(m.family in MODEL_FAMILIES for m in models)
    duration = max((r.arrival_seconds for r in requests), default=0.0) + 60.0
    return Scenario(
        name=Path(trace_path).stem,
        description=f"trace {trace_path}",
        nodes=parse_cluster(cluster or "h100-pcie5:1,a6000-pcie4:1,l4:2"),
        models=models,
        trace_path=trace_path,
        duration_seconds=duration,
    )


def scenario_requests(scenario: Scenario) -> list[Request]:
    """The scenario's trace: read from its CSV, or generated from its workload and seed."""
    if scenario.trace_path:
        return read_trace_csv(scenario.trace_path)
    return generate_trace(scenario.models, scenario.workload, scenario.duration_seconds, scenario.seed)


def run_policy(
    scenario: Scenario,
    policy_name: str,
    requests: Sequence[Request] | None = None,
    planner_config: PlannerConfig | None = None,
    tick_seconds: float = 0.5,
) -> PolicyReport:
    """Simulate one policy on one scenario."""
    trace = list(requests) if requests is not None else scenario_requests(scenario)
    sim = Simulation(
        scenario.nodes,
        scenario.models,
        trace,
        scenario.duration_seconds,
        tick_seconds=tick_seconds,
        ttft_slo_seconds=scenario.ttft_slo_seconds,
        queue_timeout_seconds=scenario.queue_timeout_seconds,
    )
    policy = make_policy(policy_name, planner_config)
    outcomes = sim.run(policy)
    plan_seconds = None
    if isinstance(policy, ResidencyPolicy) and policy.plans:
        plan_seconds = sum(p.solve_seconds for p in policy.plans) / len(policy.plans)
    return summarise(
        policy_name,
        scenario.name,
        scenario.duration_seconds,
        outcomes,
        sim.counters,
        sim.gpu_memory_utilisation,
        plan_seconds,
        {m.name: m.priority for m in scenario.models},
    )


def run_all(
    scenario: Scenario,
    policies: Sequence[str] = POLICY_NAMES,
    planner_config: PlannerConfig | None = None,
    tick_seconds: float = 0.5,
) -> list[PolicyReport]:
    """Every policy on the same trace."""
    requests = scenario_requests(scenario)
    return [run_policy(scenario, name, requests, planner_config, tick_seconds) for name in policies]


def with_seed(scenario: Scenario, seed: int) -> Scenario:
    """A copy of the scenario with another seed."""
    return dataclasses.replace(scenario, seed=seed)
