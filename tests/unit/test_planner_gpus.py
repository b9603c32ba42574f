"""The planner packs GPUs, not nodes (planner/gpus.py): splits across the GPUs of one node, never across
nodes; per-GPU memory; shared host links; no needless splits; a clear reason for a model no node holds."""

from __future__ import annotations

import dataclasses

import pytest

from residency_operator.planner import GIB, CurrentPlacement, ModelDemand, NodeCapacity, PlannerConfig, plan
from residency_operator.planner.gpus import gpu_unit, link_share_gbps
from residency_operator.planner.options import gpu_bytes_needed
from residency_operator.planner.predictor import Predictor
from residency_operator.planner.types import GpuCapacity, HostLinkCapacity


def gpu_node(
    name: str,
    count: int,
    gpu_gib: float = 80,
    hbm_gbps: float = 3350.0,
    link_gbps: float = 50.0,
    gpus_per_link: int = 1,
    concurrent_gbps: float | None = None,
    host_gib: float = 1024,
) -> NodeCapacity:
    """A node of ``count`` identical GPUs, ``gpus_per_link`` of them behind each host link."""
    gpus = tuple(
        GpuCapacity(
            i, int(gpu_gib * GIB), hbm_gbps, link_gbps, host_link=i // gpus_per_link, reserved_bytes=GIB
        )
        for i in range(count)
    )
    links = tuple(
        HostLinkCapacity(
            link, tuple(g.index for g in gpus if g.host_link == link), concurrent_gbps or link_gbps
        )
        for link in sorted({g.host_link for g in gpus})
        if gpus_per_link > 1
    )
    return NodeCapacity(
        name,
        "H100-SXM",
        int(gpu_gib * GIB) * count,
        int(host_gib * GIB),
        link_gbps,
        hbm_gbps,
        200.0,
        gpu_tflops=989.0,
        reserved_gpu_bytes=GIB * count,
        gpus=gpus,
        host_links=links,
        device_to_device_gbps=300.0,
    )


def model(name: str, billions: float, **fields: object) -> ModelDemand:
    fields.setdefault("min_decode_tokens_per_second", 5.0)
    fields.setdefault("max_offload_fraction", 0.75)
    return ModelDemand(
        name=name,
        weight_bytes=int(billions * 2e9),
        kv_bytes_per_token=131072,
        max_sequence_length=2048,
        max_batch=4,
        layer_count=80,
        **fields,  # type: ignore[arg-type]
    )


def per_gpu_bytes(
    planned_placements: dict[str, object], models: dict[str, ModelDemand]
) -> dict[tuple[str, int], int]:
    """Weight bytes each GPU holds under the plan (every model's share of its weights)."""
    held: dict[tuple[str, int], int] = {}
    for name, placement in planned_placements.items():
        for share in placement.gpus:  # type: ignore[attr-defined]
            key = (placement.node, share.index)  # type: ignore[attr-defined]
            held[key] = held.get(key, 0) + round(share.resident_fraction * models[name].weight_bytes)
    return held


def test_a_model_too_big_for_one_gpu_is_split_across_gpus_of_one_node() -> None:
    nodes = [gpu_node("hgx-a", 4), gpu_node("hgx-b", 4)]
    big = model("ns/llama-70b", 70)
    planned = plan([big], nodes, [])
    placement = planned.placements["ns/llama-70b"]
    assert placement.node in ("hgx-a", "hgx-b")
    assert len(placement.gpus) == 2  # 140 GB over two 79 GiB GPUs: the fewest that hold it
    assert placement.resident_fraction == 1.0
    assert sum(g.resident_fraction for g in placement.gpus) == pytest.approx(placement.resident_fraction)
    assert len({g.index for g in placement.gpus}) == 2
    # The split's rate counts its stages' HBM reads and one hop, and beats the SLO by far.
    assert placement.predicted_decode_tokens_per_second > 10
    assert [a.kind for a in planned.actions] == ["load"]
    assert planned.actions[0].to_node == placement.node
    assert not planned.unschedulable


def test_a_split_never_spans_nodes_even_where_only_two_nodes_together_have_room() -> None:
    # Each node has one free GPU (the other holds a model of higher priority): two GPUs exist, on two nodes.
    nodes = [gpu_node("a", 2), gpu_node("b", 2)]
    keepers = [model(f"ns/keep-{n}", 30, priority=100, preemptible=False) for n in ("a", "b")]
    current = [CurrentPlacement(f"ns/keep-{n}", n, 1.0, gpus=(0,)) for n in ("a", "b")]
    big = model("ns/big", 70, max_offload_fraction=0.0)
    planned = plan([*keepers, big], nodes, current)
    assert "ns/big" not in planned.placements
    assert {p.node for p in planned.placements.values()} == {"a", "b"}
    assert any(u.model == "ns/big" for u in planned.unschedulable)


def test_shares_respect_each_gpus_memory() -> None:
    nodes = [gpu_node("hgx", 8)]
    models = {
        m.name: m
        for m in [model(f"ns/big-{i}", 70) for i in range(2)] + [model(f"ns/s-{i}", 8) for i in range(10)]
    }
    planned = plan(list(models.values()), nodes, [])
    usable = {(n.name, g.index): g.usable_bytes for n in nodes for g in n.gpus}
    for key, held in per_gpu_bytes(planned.placements, models).items():
        assert held <= usable[key], key
    splits = [p for p in planned.placements.values() if len(p.gpus) > 1]
    assert {p.model for p in splits} == {"ns/big-0", "ns/big-1"}
    # No GPU serves two splits, and no small model shares a split's GPUs.
    split_gpus = [g.index for p in splits for g in p.gpus]
    assert len(split_gpus) == len(set(split_gpus))
    for p in planned.placements.values():
        if len(p.gpus) == 1:
            assert p.gpus[0].index not in split_gpus


def test_a_model_that_fits_one_gpu_is_not_split() -> None:
    planned = plan([model("ns/llama-8b", 8), model("ns/codellama-34b", 34)], [gpu_node("hgx", 8)], [])
    for placement in planned.placements.values():
        assert len(placement.gpus) == 1
        assert placement.gpus[0].resident_fraction == pytest.approx(placement.resident_fraction)


def test_a_model_no_node_can_hold_is_unschedulable_with_its_reason() -> None:
    # 405B in bf16 (810 GB) with at most half offloaded needs 405 GB of GPU memory: more than 4 x 80 GiB.
    huge = model("ns/llama-405b", 405, max_offload_fraction=0.5)
    planned = plan([huge], [gpu_node("hgx", 4)], [])
    assert "ns/llama-405b" not in planned.placements
    (reason,) = planned.unschedulable
    assert reason.reason == "ExceedsNodeCapacity"
    assert "never spans nodes" in reason.message and "hgx" in reason.message


def test_a_running_split_that_no_longer_fits_is_evicted_and_refused() -> None:
    huge = model("ns/big", 405, max_offload_fraction=0.5)
    current = [CurrentPlacement("ns/big", "hgx", 1.0, gpus=(0, 1, 2, 3))]
    planned = plan([huge], [gpu_node("hgx", 4)], current)
    assert [(a.kind, a.model) for a in planned.actions] == [("evict", "ns/big")]
    assert [u.reason for u in planned.unschedulable] == ["ExceedsNodeCapacity"]


def test_without_splits_a_large_model_runs_on_one_gpu_offloaded() -> None:
    big = model("ns/llama-70b", 70, min_decode_tokens_per_second=0.5)
    split = plan([big], [gpu_node("hgx", 4)], []).placements["ns/llama-70b"]
    alone = plan([big], [gpu_node("hgx", 4)], [], config=PlannerConfig(allow_gpu_splits=False)).placements[
        "ns/llama-70b"
    ]
    assert len(alone.gpus) == 1 and alone.resident_fraction < 1.0
    assert len(split.gpus) == 2 and split.resident_fraction == 1.0
    # The split reads its weights from HBM; offloaded, most of them cross the host link every token.
    assert split.predicted_decode_tokens_per_second > 5 * alone.predicted_decode_tokens_per_second


def test_a_shared_host_link_lowers_the_predicted_rate_of_streaming_models() -> None:
    predictor = Predictor()
    big = model("ns/offloaded", 60, min_decode_tokens_per_second=None)
    apart = gpu_node("apart", 2, link_gbps=25.0)
    shared = gpu_node("shared", 2, link_gbps=25.0, gpus_per_link=2, concurrent_gbps=26.0)
    assert link_share_gbps(shared, shared.gpus[0]) == pytest.approx(13.0)
    assert link_share_gbps(apart, apart.gpus[0]) == pytest.approx(25.0)
    rate_apart = predictor.decode_tokens_per_second(big, gpu_unit(apart, (0,)), 0.5, "stream")
    rate_shared = predictor.decode_tokens_per_second(big, gpu_unit(shared, (0,)), 0.5, "stream")
    assert rate_shared < 0.7 * rate_apart
    # The plan: two streaming models on the two GPUs of one link each get part of it.
    models = [
        model(f"ns/m-{i}", 60, min_decode_tokens_per_second=None, allowed_modes=("stream",)) for i in range(2)
    ]
    config = PlannerConfig(allow_gpu_splits=False)
    on_shared = plan(models, [shared], [], config=config).placements
    on_apart = plan(models, [dataclasses.replace(apart, name="shared")], [], config=config).placements
    for name in on_shared:
        assert on_shared[name].resident_fraction < 1.0
        assert (
            on_shared[name].predicted_decode_tokens_per_second
            < on_apart[name].predicted_decode_tokens_per_second
        )


def test_a_split_takes_gpus_from_lower_priority_models_which_move() -> None:
    node = gpu_node("hgx", 4)
    small = [model(f"ns/s-{i}", 30, priority=0) for i in range(4)]
    current = [CurrentPlacement(f"ns/s-{i}", "hgx", 1.0, gpus=(i,)) for i in range(4)]
    big = model("ns/big", 70, priority=100, max_offload_fraction=0.0, min_decode_tokens_per_second=10)
    planned = plan([*small, big], [node], current)
    placement = planned.placements["ns/big"]
    assert len(placement.gpus) == 2
    taken = {g.index for g in placement.gpus}
    for p in planned.placements.values():
        if p.model != "ns/big":
            assert not taken & {g.index for g in p.gpus}
    moved = {a.model for a in planned.actions if a.model != "ns/big"}
    assert len(moved) >= 2  # the models that held those GPUs went elsewhere, or were preempted
    assert sum(len(p.gpus) for p in planned.placements.values()) <= 4


def test_a_running_split_keeps_its_gpus_from_round_to_round() -> None:
    nodes = [gpu_node("hgx", 8)]
    models = [model("ns/big", 70), *(model(f"ns/s-{i}", 8) for i in range(6))]
    first = plan(models, nodes, [])
    current = [
        CurrentPlacement(p.model, p.node, p.resident_fraction, p.mode, gpus=tuple(g.index for g in p.gpus))
        for p in first.placements.values()
    ]
    second = plan(models, nodes, current)
    assert second.actions == ()
    assert second.placements["ns/big"].gpus == first.placements["ns/big"].gpus


def test_a_preempted_model_resumes_on_any_gpu_of_its_node() -> None:
    node = gpu_node("hgx", 2)
    busy = model("ns/busy", 30, priority=10, preemptible=False)
    waiting = model("ns/back", 8)
    # ``back`` is cached in the node's host memory from GPU 1; GPU 0 is the one free now.
    current = [
        CurrentPlacement("ns/busy", "hgx", 1.0, gpus=(1,)),
        CurrentPlacement("ns/back", "hgx", 0.0, state="preempted", gpus=(1,)),
    ]
    planned = plan([busy, waiting], [node], current)
    assert [a.kind for a in planned.actions if a.model == "ns/back"] == ["resume"]


def test_a_split_unit_holds_its_stages_workspace() -> None:
    node = gpu_node("hgx", 4)
    big = model("m", 70)
    unit = gpu_unit(node, (0, 1), big.workspace_bytes)
    assert unit.gpu_memory_bytes == 2 * 80 * GIB
    assert unit.reserved_gpu_bytes == 2 * GIB + big.workspace_bytes
    assert unit.pipeline_hop_seconds > 0 and gpu_unit(node, (0,)).pipeline_hop_seconds == 0
    assert gpu_bytes_needed(big, 1.0, "stream") <= unit.gpu_memory_bytes - unit.reserved_gpu_bytes


def test_single_gpu_nodes_plan_exactly_as_before() -> None:
    l4 = NodeCapacity("l4-0", "L4", 24 * GIB, 128 * GIB, 25.0, 300.0, 60.0)
    models = [model("ns/a", 8), model("ns/b", 3)]
    planned = plan(models, [l4], [])
    assert all(p.gpus == () and p.node == "l4-0" for p in planned.placements.values())
    # A fleet with one multi-GPU node leaves the single-GPU node's placements as they are named.
    mixed = plan(models, [l4, gpu_node("hgx", 2)], [])
    assert all((p.gpus == ()) == (p.node == "l4-0") for p in mixed.placements.values())


def test_a_split_with_layers_in_host_memory_leaves_the_last_gpu_room_for_the_staging_buffers() -> None:
    # 110B in bf16 (220 GB) fits no 2 x 80 GiB node resident: both GPUs, the rest streamed from host memory.
    big = model("ns/big", 110, min_decode_tokens_per_second=None, allowed_modes=("stream",))
    placement = plan([big], [gpu_node("hgx", 2)], []).placements["ns/big"]
    assert [g.index for g in placement.gpus] == [0, 1] and placement.resident_fraction < 1.0
    first, last = (g.resident_fraction for g in placement.gpus)
    assert last < first  # the last GPU of the pipeline holds the streamed layers' staging buffers
    staging = 2 * big.effective_bytes_per_layer
    assert (first - last) * big.weight_bytes == pytest.approx(staging, rel=0.6)


def test_on_an_emulated_node_a_model_too_big_for_either_gpu_runs_split_across_both() -> None:
    # Emulated GPUs measure their "HBM" and their link on the same DRAM: offloading predicts the same rate as
    # a split (less its hop); the split keeps the weights resident and runs there.
    emulated = gpu_node("emu", 2, gpu_gib=0.25, hbm_gbps=20.0, link_gbps=20.0, host_gib=4)
    tiny = ModelDemand(
        name="ns/tiny",
        weight_bytes=300 * 1024**2,
        kv_bytes_per_token=1024,
        max_sequence_length=256,
        max_batch=2,
        layer_count=24,
        workspace_bytes=8 * 1024**2,
        max_offload_fraction=0.75,
    )
    emulated = dataclasses.replace(
        emulated,
        gpus=tuple(dataclasses.replace(g, reserved_bytes=0) for g in emulated.gpus),
        reserved_gpu_bytes=0,
    )
    placement = plan([tiny], [emulated], []).placements["ns/tiny"]
    assert [g.index for g in placement.gpus] == [0, 1]
    assert placement.resident_fraction == 1.0


def test_a_higher_priority_split_takes_the_gpus_of_a_lower_priority_split() -> None:
    """Two models that each need both GPUs of the node: the one of higher priority preempts the running one,
    whose reason speaks of GPUs; deleted again, the first comes back on them."""
    node = gpu_node("hgx", 2)
    low = model("ns/low", 70, priority=1, max_offload_fraction=0.0, min_decode_tokens_per_second=None)
    high = model("ns/high", 70, priority=100, max_offload_fraction=0.0, min_decode_tokens_per_second=None)
    first = plan([low], [node], []).placements["ns/low"]
    assert len(first.gpus) == 2
    current = [CurrentPlacement("ns/low", "hgx", 1.0, gpus=tuple(g.index for g in first.gpus))]
    second = plan([low, high], [node], current)
    assert {g.index for g in second.placements["ns/high"].gpus} == {0, 1}
    assert "ns/low" not in second.placements
    assert next((a.kind, a.model) for a in second.actions) == ("preempt", "ns/low")
    (refused,) = second.unschedulable
    assert refused.reason == "InsufficientGPUMemory"
    assert refused.message.startswith("preempted for higher-priority ns/high (priority 100); needs 2 GPUs")
    # the same priority does not displace a running split
    peer = dataclasses.replace(high, priority=1)
    kept = plan([low, peer], [node], current)
    assert {g.index for g in kept.placements["ns/low"].gpus} == {0, 1} and "ns/high" not in kept.placements
    # a preemptible: false split is never displaced
    pinned = dataclasses.replace(low, preemptible=False)
    assert "ns/low" in plan([pinned, high], [node], current).placements


def l4_node(name: str) -> NodeCapacity:
    """4 x L4 (24 GiB, 300 GB/s HBM), two GPUs per host link, host memory read at 80 GB/s."""
    node = gpu_node(name, 4, gpu_gib=24, hbm_gbps=300, link_gbps=25, gpus_per_link=2, concurrent_gbps=26)
    return dataclasses.replace(node, host_memory_gbps=80.0, gpu_tflops=121.0)


def served_model(
    name: str, billions: float, layers: int, demand: float | None, **fields: object
) -> ModelDemand:
    """A model with a batch of 8 and a measured demand (decode tokens/s; None: not measured yet)."""
    return ModelDemand(
        name=name,
        weight_bytes=int(billions * 2e9),
        kv_bytes_per_token=131072,
        max_sequence_length=2048,
        max_batch=8,
        layer_count=layers,
        max_offload_fraction=0.75,
        demand_decode_tokens_per_second=demand,
        **fields,  # type: ignore[arg-type]
    )


def l4_fleet(big_priority: int, big_demand: float | None, small_demand: float | None) -> list[ModelDemand]:
    """A 33B model that only a split holds on L4s (three of them, ~36 tokens/s at its SLO of 3 per
    sequence; offloaded on one L4 it misses that SLO), beside eight 8B models (one L4 each)."""
    big = served_model("ns/big", 33, 64, big_demand, priority=big_priority, min_decode_tokens_per_second=3.0)
    smalls = [
        served_model(f"ns/s-{i}", 8, 32, small_demand, min_decode_tokens_per_second=10.0) for i in range(8)
    ]
    return [big, *smalls]


def test_a_split_serving_little_of_its_demand_does_not_take_gpus_busy_models_need() -> None:
    """Asked 200 tokens/s, the split would serve 36 within its SLO, while its three L4s serve 20 tokens/s
    each of busy 8B models: it is not made, whatever its priority, and its reason says so."""
    for priority in (0, 100):
        planned = plan(l4_fleet(priority, 200.0, 20.0), [l4_node("l4")], [])
        assert "ns/big" not in planned.placements
        assert len(planned.placements) == 4  # one 8B model on each L4
        (refused,) = [u for u in planned.unschedulable if u.model == "ns/big"]
        assert refused.reason == "InsufficientGPUMemory"
        assert "would serve 35.8 tokens/s more within its SLO" in refused.message
        assert "tokens/s of other models without room" in refused.message


def test_a_split_serving_most_of_its_demand_competes_in_its_priority_tier() -> None:
    """Asked 40 tokens/s, the split serves most of it (36): at a higher priority than the 8B models it takes
    its three L4s from them; at their priority it does not (it serves less than their 60)."""
    planned = plan(l4_fleet(100, 40.0, 20.0), [l4_node("l4")], [])
    assert len(planned.placements["ns/big"].gpus) == 3
    assert planned.placements["ns/big"].resident_fraction == 1.0
    peer = plan(l4_fleet(0, 40.0, 20.0), [l4_node("l4")], [])
    assert "ns/big" not in peer.placements
    (refused,) = [u for u in peer.unschedulable if u.model == "ns/big"]
    assert "of models of priority 0 or above without room" in refused.message


def test_a_model_only_a_split_holds_gets_one_where_its_gpus_are_not_needed_elsewhere() -> None:
    """However little of its demand it serves: when the other models are idle, or nobody's demand is
    measured yet (a new fleet), the split is made."""
    for small_demand, big_demand in ((0.0, 200.0), (None, None)):
        planned = plan(l4_fleet(0, big_demand, small_demand), [l4_node("l4")], [])
        assert len(planned.placements["ns/big"].gpus) == 3, (small_demand, big_demand)


def test_a_running_split_of_an_idle_model_gives_its_gpus_to_busy_models() -> None:
    """Idle, a running split keeps its GPUs while nobody needs them, and gives them up once the 8B models
    it keeps out are asked for; a running split serving most of its demand keeps them (hysteresis aside)."""
    node = l4_node("l4")
    running = [CurrentPlacement("ns/big", "l4", 1.0, gpus=(0, 1, 2))]
    idle_fleet = l4_fleet(0, 0.0, 0.0)
    kept = plan(idle_fleet, [node], running)
    assert {g.index for g in kept.placements["ns/big"].gpus} == {0, 1, 2}
    busy = l4_fleet(0, 0.0, 20.0)
    released = plan(busy, [node], running)
    assert "ns/big" not in released.placements
    assert {a.kind for a in released.actions if a.model == "ns/big"} <= {"preempt", "evict"}
    assert any(a.model == "ns/big" for a in released.actions)
    assert len(released.placements) == 4  # an 8B model on each L4
    (refused,) = [u for u in released.unschedulable if u.model == "ns/big"]
    assert "idle" in refused.message
    asked = plan(l4_fleet(100, 40.0, 20.0), [node], running)
    assert {g.index for g in asked.placements["ns/big"].gpus} == {0, 1, 2}
