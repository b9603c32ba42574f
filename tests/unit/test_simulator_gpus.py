"""The simulator's multi-GPU nodes: presets, the split scenario, per-GPU memory, shared host links and
activation hops in its own engine, and the no-split ablation of residency."""

from __future__ import annotations

import dataclasses

import pytest

from residency_operator.planner.options import gpu_bytes_needed
from residency_operator.planner.types import GIB
from residency_operator.simulator.cluster import SimModel, load_scenario, make_node, parse_cluster
from residency_operator.simulator.devices import Topology, sharing_groups
from residency_operator.simulator.engine import Simulation, SimulationError
from residency_operator.simulator.runner import SCENARIO_DIR, make_policy, scenario_requests


def test_multi_gpu_presets_describe_each_gpu_and_their_shared_links() -> None:
    hgx = make_node("hgx", "h100-sxm-8x")
    assert len(hgx.gpus) == 8 and hgx.gpu_memory_bytes == 8 * 80 * GIB
    assert {g.usable_bytes for g in hgx.gpus} == {79 * GIB}
    assert [link.gpus for link in hgx.host_links] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert hgx.device_to_device_gbps == 300
    l4 = make_node("l4", "l4-4x", gpu_count=2)
    assert len(l4.gpus) == 2 and l4.gpu_memory_bytes == 2 * 24 * GIB
    assert make_node("one", "l4").gpus == ()
    with pytest.raises(ValueError, match="gpu_count"):
        make_node("bad", "l4-4x", gpu_count=0)


def test_the_multi_gpu_scenario_has_a_model_that_fits_no_single_gpu() -> None:
    scenario = load_scenario(SCENARIO_DIR / "multi-gpu-split.yaml")
    assert not scenario.extra
    assert all(len(n.gpus) > 1 for n in scenario.nodes)
    largest_gpu = max(g.usable_bytes for n in scenario.nodes for g in n.gpus)
    too_big = [m for m in scenario.models if gpu_bytes_needed(m.demand(), 1.0, "stream") > largest_gpu]
    assert {m.family for m in too_big} == {"llama-70b"}
    assert len(scenario.models) > 10


def sim_of(cluster: str, *models: SimModel) -> Simulation:
    return Simulation(parse_cluster(cluster), list(models), [], 10.0)


def test_a_split_takes_memory_on_each_of_its_gpus_and_one_gpu_cannot_hold_a_70b() -> None:
    sim = sim_of("h100-sxm-8x:1", SimModel("big", "llama-70b"))
    assert [n.name for n in sim.nodes] == [f"h100-sxm-8x/{i}" for i in range(8)]
    sim.place("big", "h100-sxm-8x/0,1", 1.0, "stream")
    sim.check_capacity()
    free_0, _ = sim.free_bytes("h100-sxm-8x/0")
    free_1, _ = sim.free_bytes("h100-sxm-8x/1")
    assert 0 < free_0 < 79 * GIB and 0 < free_1 < 79 * GIB
    assert sim.free_bytes("h100-sxm-8x/2")[0] == 79 * GIB
    (current,) = sim.current_placements()
    assert (current.node, current.gpus) == ("h100-sxm-8x", (0, 1))
    sim.place("big", "h100-sxm-8x/3", 1.0, "stream")
    with pytest.raises(SimulationError, match="over-committed"):
        sim.check_capacity()


def test_a_shared_host_link_is_divided_among_the_models_streaming_now() -> None:
    topology = Topology(parse_cluster("l4-4x:1"))
    unit = topology.unit("l4-4x/0")
    alone = topology.streaming_node(unit, 1)
    two = topology.streaming_node(unit, 2)
    assert alone.host_to_device_gbps == 25 and two.host_to_device_gbps == pytest.approx(13.0)
    assert (
        topology.link_key(unit)
        == topology.link_key(topology.unit("l4-4x/1"))
        != topology.link_key(topology.unit("l4-4x/2"))
    )
    # Served: a model offloaded on GPU 0 decodes slower while its neighbour on GPU 1 streams too.
    sim = sim_of("l4-4x:1", SimModel("a", "llama-13b"), SimModel("b", "llama-13b"))
    for name, gpu in (("a", 0), ("b", 1)):
        sim.place(name, f"l4-4x/{gpu}", 0.5, "stream")
        sim.models[name].busy_until_seconds = 0.0
    a = sim.models["a"]
    solo = sim._sharing([a])[0][1][0]
    both = sim._sharing([a, sim.models["b"]])[0][1][0]
    assert sim._decode_step(a, both, 1) > 1.5 * sim._decode_step(a, solo, 1)


def test_a_split_pays_an_activation_hop_per_stage_boundary() -> None:
    topology = Topology(parse_cluster("h100-sxm-8x:1,l4-4x:1"))
    model = SimModel("big", "llama-70b").demand()
    assert topology.hop_seconds(topology.unit("h100-sxm-8x/0"), model, 8) == 0.0
    two = topology.hop_seconds(topology.unit("h100-sxm-8x/0,1"), model, 8)
    four = topology.hop_seconds(topology.unit("h100-sxm-8x/0,1,2,3"), model, 8)
    assert four == pytest.approx(3 * two) and two > 0
    assert topology.hop_seconds(topology.unit("l4-4x/0,1"), model, 8) > two  # PCIe, not NVLink


def test_models_on_overlapping_gpu_sets_take_turns_together() -> None:
    topology = Topology(parse_cluster("h100-sxm-8x:1"))
    units = [
        topology.unit(name) for name in ("h100-sxm-8x/0,1", "h100-sxm-8x/1", "h100-sxm-8x/2", "h100-sxm-8x/2")
    ]
    assert sharing_groups(enumerate(units)) == [[0, 1], [2, 3]]


def test_residency_splits_the_70b_and_the_no_split_ablation_never_does() -> None:
    scenario = load_scenario(SCENARIO_DIR / "multi-gpu-split.yaml")
    scenario = dataclasses.replace(scenario, duration_seconds=40.0)
    requests = scenario_requests(scenario)
    found = {}
    for name in ("residency", "residency-no-split"):
        sim = Simulation(scenario.nodes, scenario.models, requests, scenario.duration_seconds)
        policy = make_policy(name)
        sim.run(policy)
        found[name] = {
            p.model
            for plan in policy.plans
            for p in plan.placements.values()
            if len(p.gpus) > 1  # type: ignore[attr-defined]
        }
    assert found["residency"] == {"team-a/llama-70b-0", "team-a/llama-70b-1"}
    assert found["residency-no-split"] == set()
