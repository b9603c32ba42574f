"""The `residency` command exposes every subcommand the README and the issues promise."""

from __future__ import annotations

import pytest
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


def test_make_model_help_lists_every_preset_and_arch() -> None:
    from residency.modelgen import ARCHES, PRESETS

    result = CliRunner().invoke(app, ["make-model", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for name in (*PRESETS, *ARCHES):
        assert name in result.output, f"`make-model --help` does not list {name}"


def test_presets_the_docs_and_demo_use_exist() -> None:
    """Every `--preset X` in README.md, docs/ and hack/demo.sh names a preset make-model has."""
    import re
    from pathlib import Path

    from residency.modelgen import PRESETS

    root = Path(__file__).resolve().parents[2]
    texts = [root / "README.md", root / "hack" / "demo.sh", *sorted((root / "docs").glob("*.md"))]
    named = {m for path in texts for m in re.findall(r"--preset[ =]([\w.-]+)", path.read_text())}
    named |= set(re.findall(r"[\w-]+:\w+:([\w.-]+):\d+", (root / "hack" / "demo.sh").read_text()))
    assert named, "found no preset named in the docs"
    assert named <= set(PRESETS), f"presets named but missing: {sorted(named - set(PRESETS))}"


def test_chat_reads_the_router_from_the_environment() -> None:
    """`residency chat` without --router goes to $RESIDENCY_ROUTER (here a port nothing listens on)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    router = f"http://127.0.0.1:{port}"
    result = CliRunner().invoke(
        app, ["chat", "m", "hi", "--timeout-seconds", "2"], env={"RESIDENCY_ROUTER": router}
    )
    assert result.exit_code == 2
    assert f"cannot reach the router at {router}" in result.output


def test_operator_capacity_requests_are_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an autoscaler a placeholder Pod only sits Pending: the operator makes them when asked."""
    from residency_operator.config import OperatorConfig

    monkeypatch.delenv("RESIDENCY_CAPACITY_REQUESTS", raising=False)
    assert OperatorConfig.from_env().capacity.enabled is False
    monkeypatch.setenv("RESIDENCY_CAPACITY_REQUESTS", "true")
    assert OperatorConfig.from_env().capacity.enabled is True
    result = CliRunner().invoke(app, ["operator", "--help"], env={"COLUMNS": "400"})
    assert "--capacity-requests" in result.output and "--no-capacity-requests" in result.output
