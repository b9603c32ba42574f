"""`residency report --quick` end to end on the emulated tier: every section measured, written, labelled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from residency.cli import app

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    args = ["report", "--quick", "--shapes", "tiny", "--emulate", "--out", str(root / "out")]
    result = CliRunner().invoke(app, [*args, "--models", str(root / "models")])
    assert result.exit_code == 0, result.output
    return root / "out" / "emulated-cpu"


def test_report_writes_json_markdown_and_plots(report_dir: Path) -> None:
    for name in (
        "report.json",
        "report.md",
        "curves-stream.png",
        "curves-cpu.png",
        "preemption.png",
        "peers.png",
    ):
        assert (report_dir / name).stat().st_size > 0, name
    markdown = (report_dir / "report.md").read_text()
    assert "EMULATED" in markdown and "## Goals" in markdown
    for section in (
        "(a) Decode under",
        "(b) Preemption cost",
        "(c) Link bandwidth",
        "Peers, same run",
        "Predictor",
    ):
        assert section in markdown


def test_every_section_measured_something_and_says_emulated(report_dir: Path) -> None:
    report = json.loads((report_dir / "report.json").read_text())
    assert report["emulated"] is True and report["skipped"] == []
    settings = report["settings"]
    for shape in report["shapes"]:
        points = {
            (p["execution_mode"], p["sequence_length"], p["resident_fraction"]) for p in shape["curve_points"]
        }
        expected = {
            (mode, length, fraction)
            for mode in settings["modes"]
            for length in settings["sequence_lengths"]
            for fraction in settings["fractions"]
        }
        assert points == expected
        assert all(p["decode_tokens_per_second"] > 0 for p in shape["curve_points"])
        # the KV saved on preemption is exactly the context in flight, and the reload moves every weight
        for preemption in shape["preemptions"]:
            assert preemption["kv_save"]["emulated"] is True
            assert (
                preemption["kv_save"]["moved_bytes"] >= preemption["kv_tokens"] * shape["kv_bytes_per_token"]
            )
            # every weight moves back (the engine's host cache aligns each tensor to 256 bytes)
            assert preemption["reload"]["moved_bytes"] == pytest.approx(shape["weight_bytes"], rel=0.02)
        assert [p["kv_tokens"] for p in shape["preemptions"]] == list(settings["kv_tokens"])
        assert len(shape["reload_pinned"]) == len(shape["reload_pageable"]) == settings["reload_trials"]
        assert shape["peer"]["accelerate_tokens_per_second"] > 0
        assert shape["peer"]["from_pretrained_seconds"]
    summary = report["summary"]
    for label, data in summary["shapes"].items():
        assert data["normalised"]["stream/32"]["1"] == pytest.approx(1.0), label
        assert 0 < data["preemption"][0]["reload_share"] < 1
    assert set(summary["goals"]) == set(summary["goal_targets"])
    assert len(report["predictions"]) == sum(len(s["curve_points"]) for s in report["shapes"])


def test_render_only_rebuilds_the_markdown(report_dir: Path) -> None:
    (report_dir / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", "--render-only", str(report_dir / "report.json")])
    assert result.exit_code == 0, result.output
    assert "## Goals" in (report_dir / "report.md").read_text()


def test_a_bad_shape_is_refused_with_the_choices() -> None:
    result = CliRunner().invoke(app, ["report", "--shapes", "gpt-9"])
    assert result.exit_code != 0
    assert "unknown shape 'gpt-9'" in result.output


@pytest.mark.parametrize(
    ("device_map", "expected"),
    [
        ({"model.embed_tokens": 0, "model.layers.0": "cpu", "lm_head": "cpu"}, "cuda:0"),
        ({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "lm_head": "disk"}, "cpu"),
        ({"": "cuda:1"}, "cuda:1"),
    ],
)
def test_the_accelerate_baseline_feeds_its_prompt_where_the_model_computes(
    device_map: dict[str, object], expected: str
) -> None:
    # A GPU limit below the embedding's size makes Accelerate map every module to the CPU; the prompt
    # then has to be on the CPU too (it was put on the GPU, and the baseline crashed).
    from types import SimpleNamespace

    import torch

    from residency_worker.report.measure import execution_device

    model = SimpleNamespace(hf_device_map=device_map, device=torch.device("meta"))
    assert execution_device(model) == torch.device(expected)
    assert execution_device(SimpleNamespace(device=torch.device("cpu"))) == torch.device("cpu")
