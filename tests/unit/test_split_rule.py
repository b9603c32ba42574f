"""The layer-split rule of a multi-GPU placement (engine/split.py) and the worker's GPU flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from residency.split import check_shares, compute_order, scaled_shares, split_stages, stage_bytes
from residency_worker.engine.types import GpuResidencyReport, ResidencyReport
from residency_worker.gpus import build_tiers, gpus_changed, placement_gpus

LAYER = 100


def _sizes(name: str) -> int:
    return {"embed": 40, "head": 60}.get(name, LAYER)


def _order(layers: int, embed: bool = True) -> list[str]:
    return compute_order(
        (["embed"] if embed else []) + ["head"] + [f"layer.{i}" for i in range(layers)], layers
    )


def test_compute_order_is_embedding_layers_head() -> None:
    assert _order(3) == ["embed", "layer.0", "layer.1", "layer.2", "head"]
    assert _order(2, embed=False) == ["layer.0", "layer.1", "head"]


def test_even_shares_cut_contiguous_ranges_first_gpu_first_layers() -> None:
    stages = split_stages(_order(8), _sizes, [0.5, 0.5])
    layers = [stages[f"layer.{i}"] for i in range(8)]
    assert layers == sorted(layers) and set(layers) == {0, 1}
    assert stages["embed"] == 0 and stages["head"] == 1


def test_each_gpu_holds_its_share_within_half_a_unit() -> None:
    for shares in ([0.2, 0.3, 0.5], [0.5, 0.25, 0.25], [0.1, 0.9], [1 / 3] * 3):
        stages = split_stages(_order(12), _sizes, shares)
        total = sum(_sizes(n) for n in stages)
        for stage, share in enumerate(shares):
            held = sum(_sizes(n) for n, s in stages.items() if s == stage)
            assert abs(held - share / sum(shares) * total) <= LAYER / 2, (shares, stage, held)
        in_order = [stages[n] for n in _order(12)]
        assert in_order == sorted(in_order), "contiguous, in pipeline order"


def test_zero_share_gpu_holds_nothing_and_one_gpu_holds_all() -> None:
    stages = split_stages(_order(4), _sizes, [0.6, 0.0, 0.4])
    assert 1 not in stages.values()
    assert set(split_stages(_order(4), _sizes, [0.7]).values()) == {0}
    # shares that sum to 0 with units resident anyway (a minimum residency): spread evenly
    assert set(split_stages(_order(4), _sizes, [0.0, 0.0]).values()) == {0, 1}


def test_only_resident_units_are_split() -> None:
    resident = ["layer.0", "layer.1", "layer.2", "head"]  # prefix layers and the head; the rest offloaded
    stages = split_stages(resident, _sizes, [0.5, 0.5])
    assert stages == {"layer.0": 0, "layer.1": 0, "layer.2": 1, "head": 1}


def test_check_shares_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="GPU 4 does not exist on this node: it has 2 GPUs"):
        check_shares(((0, 0.2), (4, 0.2)), 2, 0.4)
    with pytest.raises(ValueError, match="more than once"):
        check_shares(((1, 0.2), (1, 0.2)), 2, 0.4)
    with pytest.raises(ValueError, match=r"sum to 0\.500000, not the resident fraction 0\.6"):
        check_shares(((0, 0.25), (1, 0.25)), 2, 0.6)
    check_shares(((1, 0.25), (0, 0.25)), 2, 0.5)


def test_scaled_shares_keep_proportions() -> None:
    scaled = scaled_shares(((3, 0.2), (1, 0.6)), 0.4)
    assert [index for index, _ in scaled] == [3, 1]
    assert [share for _, share in scaled] == pytest.approx([0.1, 0.3])
    assert scaled_shares(((0, 0.0), (1, 0.0)), 0.5) == ((0, 0.25), (1, 0.25))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_worker_gpus_that_do_not_exist_fail_with_a_clear_message() -> None:
    with pytest.raises(
        ValueError, match=r"GPU 0, 2 does not exist: this machine has 0 CUDA GPUs.*--emulated-gpus"
    ):
        build_tiers("0,2", None, "8GiB")
    with pytest.raises(ValueError, match="GPU none does not exist"):
        build_tiers("all", None, "8GiB")


def test_emulated_gpus_get_a_budget_each() -> None:
    tiers = build_tiers(None, 3, "8MiB")
    assert [t.index for t in tiers] == [0, 1, 2] and all(
        t.emulated and t.budget_bytes == 8 * 2**20 for t in tiers
    )
    assert [t.budget_bytes for t in build_tiers(None, 2, "8MiB,4MiB")] == [8 * 2**20, 4 * 2**20]
    assert len({id(t) for t in tiers}) == 3 and all(t.device.type == "cpu" for t in tiers)
    with pytest.raises(ValueError, match="3 GPU memory budgets given for 2 GPUs"):
        build_tiers(None, 2, "1MiB,1MiB,1MiB")
    with pytest.raises(ValueError, match="needs a declared budget"):
        build_tiers(None, 2, None)
    with pytest.raises(ValueError, match="drop --emulated-gpus"):
        build_tiers("0", 2, "1MiB")


def _held(*gpus: tuple[int, float]) -> ResidencyReport:
    reports = [GpuResidencyReport(index, share, share, 0, 0) for index, share in gpus]
    total = sum(share for _, share in gpus)
    return ResidencyReport("m", total, total, 0, 1, [], [], "stream", "stream", 0, 0, True, reports)


def test_agent_sees_a_change_of_gpus_or_shares() -> None:
    split = {
        "residentFraction": 0.6,
        "gpus": [{"index": 0, "residentFraction": 0.3}, {"index": 1, "residentFraction": 0.3}],
    }
    assert placement_gpus(split) == ((0, 0.3), (1, 0.3))
    assert not gpus_changed(split, _held((0, 0.3), (1, 0.3)), 0.02)
    assert gpus_changed(split, _held((1, 0.3), (0, 0.3)), 0.02), "another order"
    assert gpus_changed(split, _held((0, 0.4), (1, 0.2)), 0.02), "other shares"
    assert gpus_changed(split, _held((0, 0.6)), 0.02)
    single = {"residentFraction": 0.5}
    assert placement_gpus(single) == ()
    assert not gpus_changed(single, _held((0, 0.5)), 0.02)
    assert gpus_changed(single, _held((1, 0.5)), 0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_worker_command_refuses_gpus_that_do_not_exist(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from residency_worker.cli import register

    app = typer.Typer()
    register(app)
    started = CliRunner().invoke(app, ["worker", "--gpus", "0,1", "--models-root", str(tmp_path)])
    assert started.exit_code == 2
    assert "GPU 0, 1 does not exist: this machine has 0 CUDA GPUs" in " ".join(started.output.split())


def test_stage_bytes_charge_each_gpu_its_own_units_kv_and_the_last_one_staging() -> None:
    units = {"embed": 40, "layer.0": 100, "layer.1": 100, "layer.2": 100, "layer.3": 100, "head": 60}
    stage_of = {"embed": 0, "layer.0": 0, "layer.1": 1, "head": 2}  # layers 2 and 3 offloaded
    common = {"num_layers": 4, "layer_kv_bytes": 10, "staging_bytes": 200, "workspace_bytes": 7}
    streamed = stage_bytes(units, stage_of, 3, stream_offloaded=True, **common)
    assert [(s.weight_bytes, s.kv_bytes, s.staging_bytes, s.workspace_bytes) for s in streamed] == [
        (140, 10, 0, 7),
        (100, 10, 0, 7),
        (60, 20, 200, 7),  # the head, and the KV of the two layers streamed into it
    ]
    on_host = stage_bytes(units, stage_of, 3, stream_offloaded=False, **common)
    assert [s.kv_bytes for s in on_host] == [10, 10, 0]
    idle = stage_bytes(units, {"layer.0": 1}, 3, stream_offloaded=False, **common)
    assert [s.total_bytes for s in idle] == [0, 117, 207], "a GPU that computes nothing reserves nothing"
