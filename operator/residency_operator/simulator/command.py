"""``residency simulate``: the CLI entry to the simulator (registered on the main typer app)."""

from __future__ import annotations

from pathlib import Path

import typer

from residency_operator.simulator.report import format_table, write_json, write_plot
from residency_operator.simulator.runner import (
    POLICY_NAMES,
    parse_generate_spec,
    run_all,
    scenario_from_trace,
)
from residency_operator.simulator.trace import read_trace_csv, write_trace_csv


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to ``app``."""

    @app.command("simulate")
    def simulate(
        trace: Path | None = typer.Option(
            None, "--trace", help="CSV trace: arrival_seconds,model,prompt_tokens,output_tokens."
        ),
        generate: str | None = typer.Option(
            None,
            "--generate",
            help="A scenario YAML file, or pattern:key=value,... e.g. 'bursty:models=8,rate=4,duration=600'.",
        ),
        cluster: str | None = typer.Option(
            None, "--cluster", help="Nodes, e.g. 'h100-pcie5:1,a6000-pcie4:1,l4:2', or a YAML file."
        ),
        policy: str = typer.Option("all", "--policy", help=f"One of {', '.join(POLICY_NAMES)}, or all."),
        seed: int = typer.Option(0, "--seed", help="Seed of the generated trace."),
        out: Path = typer.Option(
            Path("simulation"), "--out", help="Directory for report.json and report.png."
        ),
    ) -> None:
        """Replay a request trace over a simulated GPU cluster and compare placement policies."""
        if (trace is None) == (generate is None):
            raise typer.BadParameter("give exactly one of --trace FILE or --generate SPEC")
        policies = list(POLICY_NAMES) if policy == "all" else [policy]
        unknown = [p for p in policies if p not in POLICY_NAMES]
        if unknown:
            raise typer.BadParameter(f"unknown policy {unknown[0]!r}; use {', '.join(POLICY_NAMES)} or all")
        try:
            if trace is not None:
                scenario = scenario_from_trace(str(trace), cluster, read_trace_csv(trace))
            else:
                assert generate is not None
                scenario = parse_generate_spec(generate, cluster, seed)
        except (OSError, ValueError, KeyError) as error:
            raise typer.BadParameter(str(error)) from error
        reports = run_all(scenario, policies)
        typer.echo(
            f"scenario {scenario.name}: {len(scenario.models)} models on {len(scenario.nodes)} nodes, "
            f"{scenario.duration_seconds:.0f} s"
        )
        typer.echo(format_table(reports))
        out.mkdir(parents=True, exist_ok=True)
        write_json({scenario.name: reports}, out / "report.json", {"seed": seed})
        write_plot(reports, out / "report.png", f"{scenario.name}: policies compared")
        if trace is None:
            from residency_operator.simulator.runner import scenario_requests

            write_trace_csv(scenario_requests(scenario), out / "trace.csv")
        typer.echo(f"wrote {out / 'report.json'} and {out / 'report.png'}")
