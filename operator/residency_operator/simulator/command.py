"""``residency simulate``: the CLI entry to the simulator (registered on the main typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
import yaml

from residency_operator.simulator.report import (
    ceiling_line,
    format_table,
    format_tiers,
    write_json,
    write_plot,
)
from residency_operator.simulator.runner import (
    POLICY_NAMES,
    parse_generate_spec,
    run_all,
    scenario_from_trace,
    scenario_requests,
)
from residency_operator.simulator.trace import read_trace_csv, write_trace_csv

INPUT_ERRORS = (OSError, ValueError, KeyError, TypeError, yaml.YAMLError)
"""What reading a trace, a cluster or a scenario raises on bad input (the parsers raise ValueError naming
the file, line or key; the rest are caught so that no input can end in a traceback)."""


def refuse(message: str) -> NoReturn:
    """Report bad input as ``residency chat`` reports a bad invocation: ``error: ...`` on one line of
    stderr, exit status 2. A traceback or a boxed panel buries what is wrong with the input."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(2)


def describe(error: BaseException) -> str:
    """A one-line description of an input error (a KeyError alone prints just the quoted key)."""
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r}" if error.args else "missing key"
    return str(error) or type(error).__name__


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to ``app``."""

    @app.command("simulate")
    def simulate(
        trace: Path | None = typer.Option(
            None,
            "--trace",
            help="CSV trace: arrival_seconds,model,prompt_tokens,output_tokens (header line required). "
            "Each model is inferred from its name (a known family such as llama-8b in it; others are "
            "refused) unless --models says what it is.",
        ),
        models: Path | None = typer.Option(
            None,
            "--models",
            help="With --trace: a YAML file with a `models:` list, each entry as in a scenario file "
            "({name, family, priority, preemptible, slo, max_offload_fraction, count, ...}), and "
            "optionally a `cluster:` list; it gives the trace's models their priorities and SLOs.",
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
        seed: int | None = typer.Option(
            None,
            "--seed",
            help="Seed of the generated trace (default: a scenario file's own seed; 0 for a pattern).",
        ),
        out: Path = typer.Option(
            Path("simulation"), "--out", help="Directory for report.json and report.png."
        ),
    ) -> None:
        """Replay a request trace over a simulated GPU cluster and compare placement policies."""
        if (trace is None) == (generate is None):
            refuse("give exactly one of --trace FILE or --generate SPEC")
        if trace is not None and seed is not None:
            refuse("--seed applies to --generate; a recorded --trace has no seed")
        if models is not None and trace is None:
            refuse("--models applies to --trace; a scenario file lists its own models")
        policies = list(POLICY_NAMES) if policy == "all" else [policy]
        unknown = [p for p in policies if p not in POLICY_NAMES]
        if unknown:
            refuse(f"unknown policy {unknown[0]!r}; use {', '.join(POLICY_NAMES)} or all")
        try:
            if trace is not None:
                scenario = scenario_from_trace(
                    str(trace), cluster, read_trace_csv(trace), None if models is None else str(models)
                )
            else:
                assert generate is not None
                scenario = parse_generate_spec(generate, cluster, seed)
            # Generated here, inside the check, so that a workload the generator cannot use is an input
            # error too; every policy then replays this same trace.
            requests = scenario_requests(scenario)
        except INPUT_ERRORS as error:
            refuse(describe(error))
        typer.echo(
            f"scenario {scenario.name}: {len(scenario.models)} models on {len(scenario.nodes)} nodes, "
            f"{scenario.duration_seconds:.0f} s (seed {scenario.seed})"
        )
        if not any(node.accepts_work for node in scenario.nodes):
            typer.echo(
                "warning: no node accepts work (all cordoned): every policy places nothing and serves no "
                "request",
                err=True,
            )
        reports = run_all(scenario, policies, requests=requests)
        offered = sum(r.output_tokens for r in requests) / scenario.duration_seconds
        typer.echo(format_table(reports))
        typer.echo(ceiling_line(reports, offered))
        typer.echo(format_tiers(reports))
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_json(
                {scenario.name: reports},
                out / "report.json",
                {"seed": scenario.seed, "offered_tokens_per_second": offered},
            )
            write_plot(reports, out / "report.png", f"{scenario.name}: policies compared")
            if trace is None:
                write_trace_csv(requests, out / "trace.csv")
        except OSError as error:
            refuse(f"cannot write the report to {out}: {describe(error)}")
        typer.echo(f"wrote {out / 'report.json'} and {out / 'report.png'}")
