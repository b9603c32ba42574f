"""Run a scenario under one or more policies and collect reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from residency_operator.planner.types import PlannerConfig, SensitivityProfile
from residency_operator.simulator.baselines import (
    BinpackPolicy,
    LruEvictPolicy,
    SleepSwapPolicy,
    UniformOffloadPolicy,
)
from residency_operator.simulator.cluster import (
    DEFAULT_CLUSTER,
    MODEL_FAMILIES,
    Scenario,
    SimModel,
    family_for_name,
    load_scenario,
    parse_cluster,
    parse_models,
)
from residency_operator.simulator.engine import Policy, Simulation
from residency_operator.simulator.measured import EngineModel
from residency_operator.simulator.policies import VARIANTS, NoSplitResidencyPolicy, ResidencyPolicy
from residency_operator.simulator.report import PolicyReport, summarise
from residency_operator.simulator.trace import Request, generate_trace, read_trace_csv
from residency_operator.simulator.validation import (
    WORKLOAD_PATTERNS,
    known_keys,
    load_yaml,
    mapping,
    number,
    whole_number,
)

POLICY_NAMES = ("residency", "lru-evict", "sleep-swap", "uniform-offload", "binpack")
SCENARIO_DIR = Path(__file__).parent / "scenarios"


def make_policy(name: str, planner_config: PlannerConfig | None = None) -> Policy:
    """A fresh policy by name."""
    if name == "residency":
        return ResidencyPolicy(planner_config)
    if name == "residency-no-split":
        return NoSplitResidencyPolicy(planner_config)
    if name == "lru-evict":
        return LruEvictPolicy()
    if name == "sleep-swap":
        return SleepSwapPolicy()
    if name == "uniform-offload":
        return UniformOffloadPolicy()
    if name == "binpack":
        return BinpackPolicy()
    known = ", ".join((*POLICY_NAMES, *VARIANTS))
    raise ValueError(f"unknown policy {name!r}; known: {known}, all")


def standard_scenarios() -> list[Path]:
    """The scenario files shipped with residency, in name order."""
    return sorted(SCENARIO_DIR.glob("*.yaml"))


GENERATE_OPTIONS = ("models", "rate", "duration", "zipf", "slo")
"""Options of the ``--generate`` shorthand: model count, total requests/s, seconds, Zipf exponent, and
every model's decode SLO in tokens/s."""

GENERATED_FAMILIES = ("llama-1b", "llama-3b", "llama-8b", "mistral-7b", "llama-13b", "qwen-0.5b")
"""Families the shorthand cycles through, in this order."""


def parse_generate_spec(spec: str, cluster: str | None, seed: int | None = None) -> Scenario:
    """A scenario from a file path or a shorthand ``pattern:models=8,rate=4,duration=600,zipf=1.1``.

    ``seed``: overrides a scenario file's own seed when given; the shorthand uses 0 when it is not.
    Refused: a scenario file that does not exist, an unknown pattern or option, and option values that
    make no workload (no models, a duration that is not > 0, a rate below 0, an SLO that is not > 0).
    """
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"scenario file {spec} not found")
        scenario = load_scenario(path)
        if cluster:
            scenario.nodes = parse_cluster(cluster)
        if seed is not None:
            scenario.seed = whole_number(seed, "--seed", minimum=0)
        return scenario
    pattern, _, options_text = spec.partition(":")
    pattern = pattern.strip() or "poisson"
    if pattern not in WORKLOAD_PATTERNS:
        raise ValueError(
            f"--generate {spec!r}: unknown pattern {pattern!r}; use {', '.join(WORKLOAD_PATTERNS)}, "
            "or a scenario .yaml file"
        )
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in options_text.split(","))):
        key, equals, value = part.partition("=")
        key = key.strip()
        if key not in GENERATE_OPTIONS:
            raise ValueError(
                f"--generate {spec!r}: unknown option {key!r}; known: {', '.join(GENERATE_OPTIONS)}"
            )
        if not equals:
            raise ValueError(f"--generate {spec!r}: option {key!r} needs a value ({key}=...)")
        options[key] = value.strip()
    where = f"--generate {spec!r}"
    count = whole_number(options.get("models", 8), f"{where}: models", minimum=1)
    slo = number(options.get("slo", 10.0), f"{where}: slo (decode tokens/s)", above=0)
    models = [
        SimModel(
            name=f"default/{GENERATED_FAMILIES[i % len(GENERATED_FAMILIES)]}-{i}",
            family=GENERATED_FAMILIES[i % len(GENERATED_FAMILIES)],
            min_decode_tokens_per_second=slo,
        )
        for i in range(count)
    ]
    workload: dict[str, Any] = {
        "pattern": pattern,
        "total_rate_per_second": number(options.get("rate", 2.0), f"{where}: rate", minimum=0),
        "popularity": "zipf" if "zipf" in options else "uniform",
        "zipf_exponent": number(options.get("zipf", 1.1), f"{where}: zipf", minimum=0),
    }
    return Scenario(
        name=f"generated-{pattern}",
        description=f"generated from {spec!r}",
        nodes=parse_cluster(cluster or DEFAULT_CLUSTER),
        models=models,
        workload=workload,
        duration_seconds=number(options.get("duration", 600.0), f"{where}: duration", above=0),
        seed=0 if seed is None else whole_number(seed, "--seed", minimum=0),
    )


def scenario_from_trace(
    trace_path: str,
    cluster: str | None,
    requests: Sequence[Request],
    models_path: str | None = None,
) -> Scenario:
    """A scenario for a CSV trace. Its models come from ``models_path`` (a YAML file with a ``models:``
    list as a scenario writes it: priorities, SLOs, offload limits; optionally a ``cluster:``), or else are
    inferred from the trace's names (``…llama-8b…`` → that family, priority 0, the default SLO).

    Refused: a trace without requests (every policy would report zero on it), a name that names no known
    family when no models file is given (it is never mapped to some other family), and trace rows for
    models the models file does not list. The simulation runs until a minute past the last arrival.
    """
    if not requests:
        raise ValueError(f"{trace_path}: the trace has no requests")
    names = sorted({r.model for r in requests})
    nodes = None
    if models_path is not None:
        path = Path(models_path)
        if not path.is_file():
            raise ValueError(f"models file {models_path} not found")
        loaded = mapping(load_yaml(path), str(path))
        known_keys(loaded, ("models", "cluster"), str(path))
        if "models" not in loaded:
            raise ValueError(f"{path}: missing `models` (a list of model entries, as in a scenario file)")
        models = parse_models(loaded["models"], f"{path}: models")
        unknown = sorted(set(names) - {m.name for m in models})
        if unknown:
            raise ValueError(
                f"{trace_path}: the trace names models {path} does not list: {', '.join(unknown[:5])}"
            )
        if "cluster" in loaded and not cluster:
            nodes = parse_cluster(loaded["cluster"], path.parent)
    else:
        models = []
        for name in names:
            family = family_for_name(name)
            if family is None:
                raise ValueError(
                    f"{trace_path}: model {name!r} names no known family "
                    f"({', '.join(sorted(MODEL_FAMILIES))}); give --models FILE to say what each model is"
                )
            models.append(SimModel(name=name, family=family))
    duration = max((r.arrival_seconds for r in requests), default=0.0) + 60.0
    return Scenario(
        name=Path(trace_path).stem,
        description=f"trace {trace_path}",
        nodes=nodes if nodes is not None else parse_cluster(cluster or DEFAULT_CLUSTER),
        models=models,
        trace_path=trace_path,
        duration_seconds=duration,
    )


def scenario_requests(scenario: Scenario) -> list[Request]:
    """The scenario's trace: read from its CSV, or generated from its workload and seed.

    A recorded trace with requests arriving at or after the scenario's ``duration_seconds`` is refused:
    the simulation would never replay them, and every policy's figures would quietly leave them out.
    """
    if not scenario.trace_path:
        return generate_trace(scenario.models, scenario.workload, scenario.duration_seconds, scenario.seed)
    requests = read_trace_csv(scenario.trace_path)
    # A scenario file lists its models; a trace row for another one would stop the simulation midway.
    unknown = sorted({r.model for r in requests} - {m.name for m in scenario.models})
    if unknown:
        names = ", ".join(unknown[:5])
        raise ValueError(
            f"{scenario.trace_path}: the trace names models the scenario does not define: {names}"
        )
    late = [r for r in requests if r.arrival_seconds >= scenario.duration_seconds]
    if late:
        raise ValueError(
            f"{scenario.trace_path}: {len(late)} of {len(requests)} requests arrive at or after "
            f"duration_seconds ({scenario.duration_seconds:g} s; the last at "
            f"{late[-1].arrival_seconds:g} s): "
            "raise duration_seconds past the last arrival, or cut the trace"
        )
    return requests


def run_policy(
    scenario: Scenario,
    policy_name: str,
    requests: Sequence[Request] | None = None,
    planner_config: PlannerConfig | None = None,
    tick_seconds: float = 0.5,
    paces_decode: bool | None = None,
    engine: EngineModel | None = None,
    profiles: Sequence[SensitivityProfile] = (),
) -> PolicyReport:
    """Simulate one policy on one scenario. ``paces_decode`` overrides whether its models are served paced
    to their SLOs (by default only residency's worker paces; see ``Policy``): for ablations."""
    if not scenario.nodes:
        # Parsing refuses such clusters; a scenario built in code gets the same answer, not a planner crash.
        raise ValueError(f"scenario {scenario.name}: the cluster has no nodes")
    trace = list(requests) if requests is not None else scenario_requests(scenario)
    sim = Simulation(
        scenario.nodes,
        scenario.models,
        trace,
        scenario.duration_seconds,
        tick_seconds=tick_seconds,
        ttft_slo_seconds=scenario.ttft_slo_seconds,
        queue_timeout_seconds=scenario.queue_timeout_seconds,
        engine=engine,
        router_admission=scenario.router_admission,
    )
    policy = make_policy(policy_name, planner_config)
    if profiles and isinstance(policy, ResidencyPolicy):
        policy.profiles = tuple(profiles)
    if paces_decode is not None:
        policy.paces_decode = paces_decode  # type: ignore[attr-defined]
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
    requests: Sequence[Request] | None = None,
) -> list[PolicyReport]:
    """Every policy on the same trace (``requests``, or the scenario's own)."""
    requests = list(requests) if requests is not None else scenario_requests(scenario)
    return [run_policy(scenario, name, requests, planner_config, tick_seconds) for name in policies]


def with_seed(scenario: Scenario, seed: int) -> Scenario:
    """A copy of the scenario with another seed."""
    return dataclasses.replace(scenario, seed=seed)
