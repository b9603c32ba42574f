"""The simulator's router: the router's own admission rule (429 past what a model serves within its TTFT
target) applied to every policy's requests alike, and the router's hold for a model that is not ready."""

from __future__ import annotations

from residency_operator.planner.types import PlannerConfig
from residency_operator.simulator.cluster import Scenario, SimModel, make_node, parse_cluster
from residency_operator.simulator.engine import Simulation
from residency_operator.simulator.runner import POLICY_NAMES, run_all
from residency_operator.simulator.trace import Request

FAST_PLANNER = PlannerConfig(solver="greedy", amortisation_horizon_seconds=300.0)


class _PlaceAt:
    """A policy that places one model whole on one node at ``at_seconds``."""

    name = "place-at"

    def __init__(self, model: str, node: str, at_seconds: float = 0.0) -> None:
        self.model, self.node, self.at_seconds = model, node, at_seconds

    def step(self, sim: Simulation, now_seconds: float) -> None:
        if sim.models[self.model].node is None and now_seconds >= self.at_seconds:
            sim.place(self.model, self.node, 1.0, "stream")


def _overloaded(router_admission: bool) -> Simulation:
    """An 8B model on an L4 whose batch (4) serves under 1 request/s of 128 tokens, asked 3 a second."""
    model = SimModel(name="ns/m", family="llama-8b", max_batch=4, min_decode_tokens_per_second=5)
    node = make_node("l4", "l4")
    requests = [Request(10.0 + i / 3, "ns/m", 256, 128) for i in range(3 * 100)]
    return Simulation(
        [node],
        [model],
        requests,
        duration_seconds=150.0,
        ttft_slo_seconds=10.0,
        router_admission=router_admission,
    )


def test_an_overloaded_model_refuses_at_once_what_it_would_serve_late() -> None:
    gated = _overloaded(router_admission=True)
    outcomes = gated.run(_PlaceAt("ns/m", "l4"))
    refused = [o for o in outcomes if o.refused]
    admitted = [o for o in outcomes if not o.refused]
    assert refused and all(o.dropped and not o.completed and not o.met_slo for o in refused)
    assert gated.gate.refused == len(refused)
    # what it admits waits at most about a batch, not the whole queue: nearly all meet the 10 s TTFT
    completed = [o for o in admitted if o.completed]
    assert sum(o.met_slo for o in completed) >= 0.9 * len(completed)
    assert max(o.ttft_seconds or 0.0 for o in completed) < 20.0

    ungated = _overloaded(router_admission=False)
    unbounded = ungated.run(_PlaceAt("ns/m", "l4"))
    assert not any(o.refused for o in unbounded)
    # without it every request queues: later ones wait past the TTFT target or time out (30 s)
    assert sum(o.met_slo for o in outcomes) > 1.5 * sum(o.met_slo for o in unbounded)
    assert sum(o.dropped for o in unbounded) > 0


def test_every_admitted_request_gives_its_slot_back() -> None:
    """In flight counts what was admitted and has not ended: nothing leaks once the trace is served."""
    model = SimModel(name="ns/m", family="llama-1b", max_batch=8, min_decode_tokens_per_second=5)
    node = make_node("h100", "h100-pcie5")
    requests = [Request(5.0 + i / 10, "ns/m", 64, 16) for i in range(100)]
    sim = Simulation([node], [model], requests, duration_seconds=40.0)
    outcomes = sim.run(_PlaceAt("ns/m", "h100"))
    assert all(o.met_slo for o in outcomes) and not any(o.refused for o in outcomes)
    assert sim.gate.admission.gates["ns/m"].in_flight == 0
    assert not sim.models["ns/m"].admitted


def test_requests_for_a_model_not_ready_are_held_then_admitted_not_refused() -> None:
    """The router holds a request while its model loads (503 only at the hold deadline): twenty requests
    that arrive before the model is placed all pass the gate once it is ready; a new model admits two
    batches at once (16), the rest when those end."""
    model = SimModel(name="ns/m", family="llama-1b", max_batch=8, min_decode_tokens_per_second=5)
    node = make_node("h100", "h100-pcie5")
    requests = [Request(1.0, "ns/m", 64, 16) for _ in range(20)]
    sim = Simulation([node], [model], requests, duration_seconds=30.0, queue_timeout_seconds=25.0)
    outcomes = sim.run(_PlaceAt("ns/m", "h100", at_seconds=5.0))
    refused = sum(o.refused for o in outcomes)
    assert refused == 4  # over two batches when it became ready: the router answers those 429 at once
    assert sum(o.completed for o in outcomes) == 16


def test_the_gate_is_the_same_for_every_policy() -> None:
    """Every policy's requests pass the router; with admission off no policy sees a 429."""
    models = [
        SimModel(name=f"ns/m{i}", family="llama-8b", max_batch=4, min_decode_tokens_per_second=10)
        for i in range(3)
    ]
    scenario = Scenario(
        name="test",
        description="",
        nodes=parse_cluster("l4:1"),
        models=models,
        workload={"pattern": "poisson", "total_rate_per_second": 6.0, "output_tokens_mean": 64},
        duration_seconds=120.0,
        seed=7,
    )
    gated = {r.policy: r for r in run_all(scenario, POLICY_NAMES, FAST_PLANNER)}
    assert all(r.refused > 0 for r in gated.values()), {p: r.refused for p, r in gated.items()}
    scenario.router_admission = False
    ungated = run_all(scenario, POLICY_NAMES, FAST_PLANNER)
    assert all(r.refused == 0 for r in ungated)
