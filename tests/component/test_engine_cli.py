"""The worker's CLI commands: make-model writes a loadable model, profile writes JSON and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from residency_worker.cli import register

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_make_model_then_profile(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    model_dir = tmp_path / "models" / "tiny"
    made = runner.invoke(cli, ["make-model", str(model_dir), "--arch", "qwen2", "--dtype", "float32"])
    assert made.exit_code == 0, made.output
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    out = tmp_path / "profiles" / "tiny.json"
    profiled = runner.invoke(
        cli,
        [
            "profile",
            str(model_dir),
            "--gpu-memory",
            "64MiB",
            "--dtype",
            "float32",
            "--fractions",
            "1.0,0.0",
            "--sequence-lengths",
            "8",
            "--decode-tokens",
            "3",
            "--trials",
            "1",
            "--out",
            str(out),
        ],
    )
    assert profiled.exit_code == 0, profiled.output
    assert "EMULATED" in profiled.output
    document = json.loads(out.read_text())
    assert document["emulated"] is True and len(document["points"]) == 4
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_refused(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    wrong_arch = runner.invoke(cli, ["make-model", str(tmp_path / "x"), "--arch", "gpt2"])
    assert wrong_arch.exit_code != 0 and "gpt2" in wrong_arch.output
    no_budget = runner.invoke(cli, ["worker", "--models-root", str(tmp_path), "--gpu-memory", "lots"])
    assert no_budget.exit_code != 0 and "memory size" in no_budget.output
