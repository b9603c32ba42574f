"""The `residency` command exposes every subcommand the README and the issues promise."""

from __future__ import annotations

from typer.testing import CliRunner

from residency.cli import app


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("operator", "worker", "make-model", "crds", "profile", "simulate"):
        assert command in result.output, f"`residency {command}` is not registered"


def test_crds_prints_yaml() -> None:
    result = CliRunner().invoke(app, ["crds"])
    assert result.exit_code == 0
    assert "name: llmmodels.residency.dev" in result.output


def test_operator_requires_a_models_root(monkeypatch: object) -> None:
    result = CliRunner().invoke(app, ["operator"], env={"RESIDENCY_MODEL_ROOTS": ""})
    assert result.exit_code != 0
    assert "models-root" in result.output
