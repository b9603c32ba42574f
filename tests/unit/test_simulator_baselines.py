"""The baselines as users run them (simulator/baselines.py): lru-evict keeps host copies and never evicts a
``preemptible: false`` model, sleep-swap wakes models from host memory, uniform-offload keeps the highest
priorities and every model's smallest allowed residency, and every policy is served paced."""

from __future__ import annotations

import pytest

from residency_operator.planner.options import gpu_bytes_needed, usable_gpu_bytes
from residency_operator.simulator.baselines import (
    LruEvictPolicy,
    SleepSwapPolicy,
    UniformOffloadPolicy,
    uniform_assignment,
)
from residency_operator.simulator.cluster import SimModel, load_scenario, make_node
from residency_operator.simulator.engine import Simulation
from residency_operator.simulator.runner import POLICY_NAMES, SCENARIO_DIR, make_policy
from residency_operator.simulator.trace import Request

L4 = make_node("l4", "l4")


def two_8b(first_preemptible: bool = True) -> list[SimModel]:
    """Two 8B models: one L4 holds one of them whole, not both."""
    return [
        SimModel(name="ns/a", family="llama-8b", preemptible=first_preemptible, max_sequence_length=2048),
        SimModel(name="ns/b", family="llama-8b", max_sequence_length=2048),
    ]


def alternating(*at: tuple[float, str]) -> list[Request]:
    return [Request(t, name, 64, 16) for t, name in at]


def test_every_policy_is_served_paced() -> None:
    assert all(getattr(make_policy(name), "paces_decode", False) for name in POLICY_NAMES)
    assert "sleep-swap" in POLICY_NAMES


def test_lru_evict_keeps_an_evicted_models_weights_in_host_memory() -> None:
    requests = alternating((0.0, "ns/a"), (20.0, "ns/b"), (40.0, "ns/a"))
    sim = Simulation([L4], two_8b(), requests, duration_seconds=60.0)
    outcomes = sim.run(LruEvictPolicy())
    assert all(o.completed for o in outcomes)
    # a and b cold-loaded once each; a's return is a resume from the host copy b's load left it
    assert sim.counters.loads == 2 and sim.counters.resumes == 1
    assert sim.counters.evictions == 0 and sim.counters.preemptions == 2


def test_lru_evict_never_evicts_a_non_preemptible_model() -> None:
    requests = alternating((0.0, "ns/a"), (20.0, "ns/b"))
    sim = Simulation([L4], two_8b(first_preemptible=False), requests, duration_seconds=60.0)
    outcomes = sim.run(LruEvictPolicy())
    assert sim.models["ns/a"].node == "l4"
    assert sim.counters.preemptions == 0
    assert [o.completed for o in outcomes if o.model == "ns/b"] == [False]


def test_sleep_swap_starts_every_model_asleep_in_host_memory_and_wakes_it_at_link_speed() -> None:
    requests = alternating((0.0, "ns/a"), (20.0, "ns/b"), (40.0, "ns/a"))
    sim = Simulation([L4], two_8b(), requests, duration_seconds=60.0)
    outcomes = sim.run(SleepSwapPolicy())
    assert all(o.completed for o in outcomes)
    assert sim.counters.loads == 0 and sim.counters.resumes == 3
    # each wake moved 16 GB at the L4's 25 GB/s, not from its 2 GB/s storage
    assert sim.counters.reload_seconds < 3 * 16 / 10


def test_uniform_offload_keeps_the_highest_priorities_each_at_an_allowed_residency() -> None:
    scenario = load_scenario(SCENARIO_DIR / "fleet-zipf-shift.yaml")
    sim = Simulation(scenario.nodes, scenario.models, [], duration_seconds=1.0)
    UniformOffloadPolicy().step(sim, 0.0)
    placed = [r for r in sim.models.values() if r.node is not None]
    left_out = [r for r in sim.models.values() if r.node is None]
    # Spread by fit, not bytes alone: nearly every model of the large fleet is loaded.
    assert len(placed) >= 0.9 * len(sim.models)
    for runtime in placed:
        assert runtime.resident_fraction >= runtime.demand.min_resident_fraction - 1e-9
    if left_out:
        assert max(r.spec.priority for r in left_out) <= min(r.spec.priority for r in placed)
    # one resident fraction per node, where no model's own floor is higher
    for node in sim.nodes:
        levels = {
            r.resident_fraction
            for r in placed
            if r.node == node.name and r.resident_fraction > r.demand.min_resident_fraction + 1e-9
        }
        assert len(levels) <= 1
    sim.check_capacity()


@pytest.mark.parametrize("preemptible", [True, False])
def test_uniform_assignment_fits_every_model_at_its_smallest_residency(preemptible: bool) -> None:
    models = [
        SimModel(name=f"ns/m{i}", family="llama-8b", preemptible=preemptible, priority=i) for i in range(4)
    ]
    sim = Simulation([L4], models, [], duration_seconds=1.0)
    assignment = uniform_assignment(sim)
    (members,) = assignment.values()
    need = sum(gpu_bytes_needed(r.demand, r.demand.min_resident_fraction, "stream") for r in members)
    assert need <= usable_gpu_bytes(L4)
    # the highest priorities are the ones kept
    kept = sorted(r.spec.priority for r in members)
    assert kept == list(range(4 - len(kept), 4))
