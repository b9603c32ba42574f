"""The `residency` command: operator, worker, models, CRDs, planning tools."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

app = typer.Typer(
    help="residency: share GPU nodes among LLMs with measured partial GPU residency, offload and preemption.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def crds(
    out: Path | None = typer.Option(None, help="Write one YAML file per CRD into this directory."),
) -> None:
    """Print (or write) the CustomResourceDefinitions generated from the typed API."""
    from residency.api.crdgen import render_crds, write_crds

    if out is None:
        typer.echo("---\n".join(render_crds().values()), nl=False)
        return
    for path in write_crds(out):
        typer.echo(f"wrote {path}")


@app.command()
def operator(
    models_root: list[Path] = typer.Option(
        [],
        "--models-root",
        help="Allowed root for model directories (repeatable; env RESIDENCY_MODEL_ROOTS).",
    ),
    namespace: list[str] = typer.Option([], "--namespace", "-n", help="Watch only these namespaces."),
    liveness: str | None = typer.Option(
        None, help="Serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    ),
) -> None:
    """Run the kopf operator: validates LLMModels, plans placements, writes status and Events."""
    from residency_operator.config import OperatorConfig
    from residency_operator.main import run_operator

    env = OperatorConfig.from_env()
    roots = list(models_root) or env.allowed_model_roots
    if not roots:
        raise typer.BadParameter("give at least one --models-root (or set RESIDENCY_MODEL_ROOTS)")
    config = OperatorConfig(
        allowed_model_roots=roots, resync_seconds=env.resync_seconds, namespaces=namespace
    )
    run_operator(config, liveness_endpoint=liveness)


def _register_contributed() -> None:
    """Commands contributed by the worker (worker, make-model, profile) and the planner (simulate)."""
    from residency_operator.simulator.command import register as register_simulator
    from residency_worker.cli import register as register_worker

    register_worker(app)
    register_simulator(app)


# TEMPORARY while the worker and planner packages land; a test asserts every command is registered.
with contextlib.suppress(ModuleNotFoundError):
    _register_contributed()
