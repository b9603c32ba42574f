"""Simulator tests: traces, baselines against the planner on cases with a known answer, reproducibility."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from residency_operator.planner.types import PlannerConfig
from residency_operator.simulator.cluster import Scenario, SimModel, load_scenario, make_node, parse_cluster
from residency_operator.simulator.engine import Simulation
from residency_operator.simulator.policies import SIMULATION_PLANNER_CONFIG, ResidencyPolicy
from residency_operator.simulator.runner import (
    POLICY_NAMES,
    parse_generate_spec,
    run_all,
    run_policy,
    scenario_requests,
    standard_scenarios,
)
from residency_operator.simulator.trace import Request, generate_trace, read_trace_csv, write_trace_csv

FAST_PLANNER = PlannerConfig(solver="greedy", amortisation_horizon_seconds=300.0)


def small_scenario(
    nodes: str | list[dict[str, object]], models: list[SimModel], rate: float, seconds: float
) -> Scenario:
    return Scenario(
        name="test",
        description="",
        nodes=parse_cluster(nodes),
        models=models,
        workload={"pattern": "poisson", "total_rate_per_second": rate, "output_tokens_mean": 64},
        duration_seconds=seconds,
        seed=7,
        ttft_slo_seconds=10.0,
    )


def test_generator_is_seeded_and_patterns_differ() -> None:
    models = [SimModel(name=f"ns/m{i}", family="llama-1b") for i in range(3)]
    workload = {"pattern": "bursty", "total_rate_per_second": 2.0}
    first = generate_trace(models, workload, 300.0, seed=1)
    assert first == generate_trace(models, workload, 300.0, seed=1)
    assert first != generate_trace(models, workload, 300.0, seed=2)
    assert all(0 <= r.arrival_seconds < 300 for r in first)
    assert [r.arrival_seconds for r in first] == sorted(r.arrival_seconds for r in first)
    diurnal = generate_trace(models, {**workload, "pattern": "diurnal"}, 300.0, seed=1)
    assert diurnal and diurnal != first
    with pytest.raises(ValueError, match="unknown workload pattern"):
        generate_trace(models, {"pattern": "chaotic"}, 10.0, seed=1)


def test_generator_rate_and_popularity() -> None:
    models = [SimModel(name=f"ns/m{i}", family="llama-1b") for i in range(4)]
    trace = generate_trace(models, {"total_rate_per_second": 4.0, "popularity": "zipf"}, 500.0, seed=3)
    assert 1700 < len(trace) < 2300
    counts = [sum(1 for r in trace if r.model == m.name) for m in models]
    assert counts == sorted(counts, reverse=True)


def test_trace_csv_round_trip(tmp_path: Path) -> None:
    requests = [Request(0.5, "ns/a", 100, 20), Request(1.25, "ns/b", 7, 3)]
    path = tmp_path / "trace.csv"
    write_trace_csv(requests, path)
    assert read_trace_csv(path) == requests
    path.write_text("arrival_seconds,model\n1,ns/a\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_trace_csv(path)


def test_infinite_memory_all_policies_tie() -> None:
    """With memory to spare, every policy runs every model whole: the same goodput."""
    huge = [{"preset": "h100-pcie5", "name": "big", "gpu_memory_gib": 100_000, "host_memory_gib": 100_000}]
    models = [SimModel(name=f"ns/m{i}", family="llama-1b", max_batch=8) for i in range(4)]
    scenario = small_scenario(huge, models, rate=1.0, seconds=120.0)
    reports = run_all(scenario, POLICY_NAMES, FAST_PLANNER)
    goodputs = [r.goodput_tokens_per_second for r in reports]
    assert goodputs[0] > 0
    assert max(goodputs) - min(goodputs) <= 0.01 * max(goodputs), dict(
        zip(POLICY_NAMES, goodputs, strict=True)
    )


def test_one_big_node_one_model_same_goodput() -> None:
    models = [SimModel(name="ns/only", family="llama-8b", max_batch=8)]
    scenario = small_scenario("h100-pcie5:1", models, rate=0.5, seconds=120.0)
    reports = run_all(scenario, POLICY_NAMES, FAST_PLANNER)
    goodputs = {r.policy: r.goodput_tokens_per_second for r in reports}
    assert min(goodputs.values()) > 0
    assert max(goodputs.values()) - min(goodputs.values()) <= 0.01 * max(goodputs.values()), goodputs


def test_seeded_runs_are_reproducible() -> None:
    models = [
        SimModel(name=f"ns/m{i}", family=f) for i, f in enumerate(["llama-1b", "llama-8b", "llama-13b"])
    ]
    scenario = small_scenario("l4:2", models, rate=1.0, seconds=90.0)
    first = run_policy(scenario, "residency", planner_config=FAST_PLANNER)
    second = run_policy(scenario, "residency", planner_config=FAST_PLANNER)
    # Everything but the wall-clock time the planner took is a function of the seed.
    assert dataclasses.replace(first, plan_seconds_mean=None) == dataclasses.replace(
        second, plan_seconds_mean=None
    )
    assert first.requests > 0
    baseline = run_policy(scenario, "lru-evict")
    assert baseline == run_policy(scenario, "lru-evict")


def test_residency_fits_models_whole_model_policies_cannot() -> None:
    """A 13B model does not fit an L4 whole; residency offloads part of it and serves its requests."""
    models = [SimModel(name="ns/big", family="llama-13b", min_decode_tokens_per_second=2.0, max_batch=2)]
    scenario = small_scenario("l4:1", models, rate=0.05, seconds=300.0)
    residency = run_policy(scenario, "residency", planner_config=FAST_PLANNER)
    binpack = run_policy(scenario, "binpack")
    assert binpack.goodput_tokens_per_second == 0.0
    assert residency.goodput_tokens_per_second > 0.0


def test_standard_scenarios_load() -> None:
    paths = standard_scenarios()
    names = {load_scenario(p).name for p in paths}
    assert {"small-large-mix", "skewed-50x8", "priority-burst", "bandwidth-starved"} <= names
    skewed = load_scenario(next(p for p in paths if p.stem == "skewed-50x8"))
    assert len(skewed.models) == 50 and len(skewed.nodes) == 8
    assert scenario_requests(skewed)


def test_generate_spec_shorthand_and_cluster_parsing() -> None:
    scenario = parse_generate_spec("diurnal:models=5,rate=3,duration=60", "l4:2,h100-pcie5:1", seed=4)
    assert len(scenario.models) == 5 and scenario.duration_seconds == 60.0
    assert [n.name for n in scenario.nodes] == ["l4-0", "l4-1", "h100-pcie5"]
    assert make_node("x", "l4").gpu_type == "L4"
    with pytest.raises(ValueError, match="unknown GPU preset"):
        parse_cluster("tpu:1")


def test_planner_sees_observed_prompt_work() -> None:
    """The residency policy passes the prompt tokens/s and the mean prompt length it observed."""
    model = SimModel(name="ns/m", family="llama-1b")
    requests = [Request(float(t), "ns/m", 400 + 100 * (t % 2), 16) for t in range(10)]
    sim = Simulation(parse_cluster("l4:1"), [model], requests, duration_seconds=12.0)
    assert sim.observed_prompts("ns/m") == (None, None)
    sim.run(ResidencyPolicy(FAST_PLANNER))
    rate, mean = sim.observed_prompts("ns/m")
    assert mean == 450 and rate == pytest.approx(4500 / 30.0)
    demand = model.demand(1.0, rate, mean)
    assert demand.prompt_tokens_per_second == rate and demand.effective_prompt_tokens == 450


def test_extra_scenarios_are_marked() -> None:
    scenarios = [load_scenario(p) for p in standard_scenarios()]
    fleets = [s for s in scenarios if s.name.startswith("fleet-")]
    standard = {"small-large-mix", "skewed-50x8", "priority-burst", "bandwidth-starved", "multi-gpu-split"}
    standard |= {s.name for s in fleets}
    assert all(s.extra == (s.name not in standard) for s in scenarios)
    # The oversubscribed family (docs/planner.md): large heterogeneous fleets, many models in several tiers,
    # popularity that shifts.
    assert len(fleets) >= 2
    for fleet in fleets:
        assert len(fleet.nodes) >= 10 and len({n.gpu_type for n in fleet.nodes}) >= 3
        assert len(fleet.models) >= 80 and len({m.priority for m in fleet.models}) >= 4
        assert fleet.workload["popularity"] == "zipf" and "popularity_shift_seconds" in fleet.workload
        top = max(m.priority for m in fleet.models)
        top_tier = {m.name for m in fleet.models if m.priority == top}
        bursts = [event["model"] for event in fleet.workload["events"]]  # a name or a prefix of names
        assert any(name.startswith(burst) for burst in bursts for name in top_tier)  # a top-tier burst


def test_reasons_name_memory_when_the_only_gpus_fast_enough_are_full() -> None:
    """priority-burst at 21 s with idle pinned models kept on the GPU (the older rule): idle high-priority
    models fill the H100; the batch 8B models left out need an H100 for their SLO at the memory they could
    get. Their reason is memory, not the H100's time (which is nearly all free)."""
    scenario = load_scenario(next(p for p in standard_scenarios() if p.stem == "priority-burst"))
    scenario = dataclasses.replace(scenario, duration_seconds=22.0)
    sim = Simulation(scenario.nodes, scenario.models, scenario_requests(scenario), scenario.duration_seconds)
    policy = ResidencyPolicy(
        dataclasses.replace(SIMULATION_PLANNER_CONFIG, idle_pinned_models_leave_gpu=False)
    )
    sim.run(policy)
    last = policy.plans[-1]
    h100_busy = sum(p.gpu_busy_fraction for p in last.placements.values() if p.node == "h100")
    assert h100_busy < 0.5
    left_out = {u.model: u for u in last.unschedulable if u.model.startswith("batch/llama-8b")}
    assert left_out
    for reason in left_out.values():
        assert reason.reason == "InsufficientGPUMemory", reason
        # where the H100 is the only kind fast enough, the message names it; where no node at all has
        # the memory, the largest free of any
        assert "resident for SLO 8 tok/s" in reason.message
        assert re.search(
            r"(the H100-PCIe with the most free has|largest free is) \d+\.\d GiB", reason.message
        )


def test_a_burst_does_not_send_production_models_to_the_slow_gpu() -> None:
    """priority-burst-idle at the burst (t=200 s): the production models were released while quiet, their
    weights kept in the H100's host memory, and batch models filled the GPUs. The production models, with
    requests waiting, take the room of lower-priority batch models on the faster GPUs (resuming on the
    H100 from that cache where its time allows), never a cold load onto the L4, where an 8B model barely
    meets its SLO of 15 tok/s (17.6 predicted) and its queue waits out a load from storage."""
    scenario = load_scenario(next(p for p in standard_scenarios() if p.stem == "priority-burst-idle"))
    scenario = dataclasses.replace(scenario, duration_seconds=230.0)
    sim = Simulation(scenario.nodes, scenario.models, scenario_requests(scenario), scenario.duration_seconds)
    policy = ResidencyPolicy()
    sim.run(policy)
    burst = [p for p in policy.plans if p.planned_at_seconds >= 200.0]
    assert burst
    placed = {
        (name, placement.node)
        for planned in burst
        for name, placement in planned.placements.items()
        if name.startswith("prod/")
    }
    assert {name for name, _ in placed} == {"prod/llama-8b-0", "prod/llama-8b-1", "prod/llama-13b"}
    assert not {node for _, node in placed} & {"l4"}, placed
    resumed = {(a.kind, a.model) for planned in burst for a in planned.actions if a.model.startswith("prod/")}
    assert ("resume", "prod/llama-8b-0") in resumed


def test_the_planner_is_fed_demand_as_the_operator_feeds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured traffic for a running model; for one that does not run (no worker sees its requests) the
    requests waiting for it at its SLO, as inputs.planner_inputs gives the operator's planner."""
    from residency_operator.simulator import policies

    models = [
        SimModel(name="ns/a", family="llama-8b", min_decode_tokens_per_second=5.0, max_batch=4),
        SimModel(name="ns/b", family="llama-8b", min_decode_tokens_per_second=7.0, max_batch=4),
    ]
    # one GPU that holds one of them whole: both asked for, steadily
    node = make_node("one", "l4", gpu_memory_gib=20)
    requests = [Request(float(t) / 2, f"ns/{'ab'[t % 2]}", 64, 32) for t in range(40)]
    sim = Simulation([node], models, requests, duration_seconds=20.0)
    seen: list[tuple[float, dict[str, object]]] = []
    real_plan = policies.plan

    def spy(demands, nodes, current, profiles, now, config):  # type: ignore[no-untyped-def]
        running = {name for name, runtime in sim.models.items() if runtime.node is not None}
        for d in demands:
            if now > 0 and d.name in running:
                assert d.demand_decode_tokens_per_second == sim.observed_demand_tokens_per_second(d.name)
            elif now > 0:
                rate = next(m.min_decode_tokens_per_second for m in models if m.name == d.name)
                assert d.demand_decode_tokens_per_second == min(d.waiting_requests, 4) * rate
                seen.append((now, {"name": d.name, "waiting": d.waiting_requests}))
            else:
                assert d.demand_decode_tokens_per_second is None  # nothing observed before time passes
        return real_plan(demands, nodes, current, profiles, now, config)

    monkeypatch.setattr(policies, "plan", spy)
    sim.run(ResidencyPolicy(FAST_PLANNER))
    # the model left out was asked for, so it was planned with its waiting requests at least once
    assert any(row["waiting"] for _, row in seen)


def test_spec_idle_releases_a_quiet_model_and_sets_its_cached_weights_aside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the operator applies spec.idle: quiet for idle_after_seconds, the model is released outside the
    plan with its weights kept in host memory (which the plan may not use); a request resumes it."""
    from residency_operator.simulator import policies

    sleepy = SimModel(name="ns/sleepy", family="llama-3b", idle_after_seconds=30.0)
    models = [sleepy, SimModel(name="ns/busy", family="llama-3b")]
    node = make_node("one", "l4")
    requests = [Request(float(t), "ns/sleepy", 64, 16) for t in range(5)]
    requests += [Request(float(t), "ns/busy", 64, 16) for t in range(0, 120, 5)]
    requests.append(Request(100.0, "ns/sleepy", 64, 16))
    requests.sort(key=lambda r: r.arrival_seconds)
    sim = Simulation([node], models, requests, duration_seconds=130.0)
    seen: list[tuple[float, bool, int, str | None]] = []
    real_plan = policies.plan

    def spy(demands, nodes, current, profiles, now, config):  # type: ignore[no-untyped-def]
        planned = {d.name for d in demands} | {c.model for c in current}
        seen.append(
            (now, "ns/sleepy" in planned, nodes[0].reserved_host_bytes, sim.models["ns/sleepy"].cached_node)
        )
        return real_plan(demands, nodes, current, profiles, now, config)

    monkeypatch.setattr(policies, "plan", spy)
    outcomes = sim.run(ResidencyPolicy(FAST_PLANNER))
    cache_bytes = sleepy.demand().weight_bytes
    quiet = [row for row in seen if 45.0 <= row[0] < 100.0]
    assert quiet and all(row[1:] == (False, cache_bytes, "one") for row in quiet)
    assert all(row[1:] == (True, 0, None) for row in seen if row[0] < 30.0)
    late = next(o for o in outcomes if o.model == "ns/sleepy" and o.arrival_seconds == 100.0)
    assert late.met_slo and late.output_tokens == 16
    assert sim.counters.loads == 2, "one cold load each; the sleepy one came back by a resume"


class _PlaceOnce:
    """A policy that puts one model on one node at t=0 and then leaves it."""

    name = "place-once"

    def __init__(self, model: str, node: str) -> None:
        self.model, self.node = model, node

    def step(self, sim: Simulation, now_seconds: float) -> None:
        if sim.models[self.model].node is None and now_seconds == 0.0:
            sim.place(self.model, self.node, 1.0, "stream")


def test_a_waiting_request_joins_the_batch_when_a_slot_frees_not_at_the_next_tick() -> None:
    """Continuous batching, as the worker does it: with one batch slot, three short requests queued at
    once run back to back within one scheduling tick, each starting as soon as the one before ends."""
    model = SimModel(name="ns/m", family="llama-1b", max_batch=1, min_decode_tokens_per_second=1.0)
    node = make_node("h100", "h100-pcie5")
    # Load finishes before the requests arrive; each request is a few milliseconds of GPU work.
    requests = [Request(5.0, "ns/m", 16, 8) for _ in range(3)]
    # without the router's admission, which admits a new model's first two batches only (here 2 requests)
    sim = Simulation(
        [node], [model], requests, duration_seconds=10.0, tick_seconds=0.5, router_admission=False
    )
    outcomes = sim.run(_PlaceOnce("ns/m", "h100"))
    assert [o.completed for o in outcomes] == [True, True, True]
    runtime = sim.models["ns/m"]
    step = sim.predictor.decode_step_seconds(runtime.demand, node, 1.0, "stream", batch=1)
    prefill = sim.predictor.prefill_seconds(runtime.demand, node, 1.0, "stream", 16)
    one_request = prefill + 7 * step
    ttfts = sorted(o.ttft_seconds or 0.0 for o in outcomes)
    # The third starts after the first two ended: about two requests' time, far below a tick (0.5 s).
    assert ttfts[2] == pytest.approx(2 * one_request + prefill, rel=1e-6)
    assert ttfts[2] < 0.1


class _Script:
    """A policy that places one model at t=0, preempts it (weights kept) at ``preempt_at`` and resumes it
    on the same node at ``resume_at`` (None: never)."""

    name = "script"

    def __init__(self, model: str, node: str, preempt_at: float, resume_at: float | None) -> None:
        self.model, self.node, self.preempt_at, self.resume_at = model, node, preempt_at, resume_at

    def step(self, sim: Simulation, now_seconds: float) -> None:
        if now_seconds == 0.0 or now_seconds == self.resume_at:
            sim.place(self.model, self.node, 1.0, "stream")
        elif now_seconds == self.preempt_at:
            sim.preempt(self.model, keep_cache=True)


@pytest.mark.parametrize("resume_at", [22.0, None])
def test_requests_parked_by_a_preemption_are_given_back_after_the_workers_wait(
    resume_at: float | None,
) -> None:
    """As the worker does it: a request in flight on a preempted model stays parked (its KV cache saved)
    and continues if the model resumes within ``preempted_wait_seconds``; past that the worker answers 503
    with Retry-After and the router holds it again, so it frees its batch slot, counts as restarted and
    waits in the queue, whose timeout runs from its arrival. Before, it stayed parked for as long as the
    model stayed preempted."""
    model = SimModel(name="ns/m", family="llama-8b", max_batch=4, min_decode_tokens_per_second=1.0)
    node = make_node("l4", "l4")
    # The cold load ends near t=9; long requests, so both are still decoding at the preemption (t=20).
    requests = [Request(1.0, "ns/m", 64, 4000) for _ in range(2)]
    sim = Simulation(
        [node],
        [model],
        requests,
        duration_seconds=60.0,
        queue_timeout_seconds=40.0,
        preempted_wait_seconds=10.0,
    )
    policy = _Script("ns/m", "l4", preempt_at=20.0, resume_at=resume_at)
    seen: dict[float, tuple[int, int]] = {}
    real_step = policy.step

    def step(s: Simulation, now_seconds: float) -> None:
        real_step(s, now_seconds)
        seen[now_seconds] = (len(s.models["ns/m"].active), len(s.models["ns/m"].queue))

    policy.step = step  # type: ignore[method-assign]
    outcomes = sim.run(policy)
    assert seen[19.5] == (2, 0) and seen[20.0] == (2, 0), "parked, not dropped, at the preemption"
    if resume_at is not None:
        # resumed in time: both continue where they stopped, none restarted, none dropped
        assert seen[35.0] == (2, 0) and sim.counters.restarted_requests == 0
        assert not any(o.dropped for o in outcomes)
    else:
        # (seen after each tick's policy step, before that tick expires anything)
        assert seen[30.0] == (2, 0), "still parked within the worker's wait"
        assert seen[30.5] == (0, 2), "given back to the router's queue once the wait passed"
        assert sim.counters.restarted_requests == 2
        # never resumed: dropped at the queue timeout (40 s from their arrival), not parked for ever
        assert seen[41.5] == (0, 2) and seen[42.0] == (0, 0)
        assert [o.dropped for o in outcomes] == [True, True]


class _PlaceAll:
    """A policy that puts every model on one node at t=0, whole, and serves paced or not."""

    name = "place-all"

    def __init__(self, node: str, paces_decode: bool) -> None:
        self.node, self.paces_decode = node, paces_decode

    def step(self, sim: Simulation, now_seconds: float) -> None:
        if now_seconds == 0.0:
            for name in sorted(sim.models):
                sim.place(name, self.node, 1.0, "stream")


@pytest.mark.parametrize("paces_decode", [False, True])
def test_paced_decoding_gives_a_queued_models_time_to_it(paces_decode: bool) -> None:
    """Two 8B models and a 13B one share an H100, each asked 1 request/s of 128 tokens (priority-burst's
    production burst). Unpaced, the GPU's time splits evenly: the 8B ones decode far faster than their SLO
    while the 13B one, whose batch holds 4, falls behind, and its queue and time to first token grow. Paced
    (the residency worker), the 8B ones decode at 1.25x their SLO while it has requests waiting, and the time
    they leave serves it: every request of every model meets its SLO."""
    node = make_node("h100", "h100-pcie5")
    models = [
        SimModel(name=f"ns/small-{i}", family="llama-8b", max_batch=8, min_decode_tokens_per_second=15)
        for i in range(2)
    ] + [SimModel(name="ns/big", family="llama-13b", max_batch=4, min_decode_tokens_per_second=10)]
    # Loads end by t=2; then 60 s of one request per second per model.
    requests = [Request(5.0 + t, m.name, 512, 128) for t in range(60) for m in models]
    sim = Simulation([node], models, requests, duration_seconds=120.0, ttft_slo_seconds=10.0)
    outcomes = sim.run(_PlaceAll("h100", paces_decode))
    met = {m.name: sum(o.met_slo for o in outcomes if o.model == m.name) / 60 for m in models}
    assert met["ns/small-0"] == met["ns/small-1"] == 1.0
    refused = sum(o.refused for o in outcomes if o.model == "ns/big")
    if paces_decode:
        assert met["ns/big"] == 1.0 and refused == 0
    else:
        # it falls behind: the router refuses (429) what it could not serve within the TTFT target
        assert met["ns/big"] < 0.9 and refused > 0, (met, refused)
        # and without the router's admission its queue grows until most requests miss their SLO
        sim = Simulation(
            [node], models, requests, duration_seconds=120.0, ttft_slo_seconds=10.0, router_admission=False
        )
        outcomes = sim.run(_PlaceAll("h100", paces_decode))
        assert sum(o.met_slo for o in outcomes if o.model == "ns/big") / 60 < 0.5
