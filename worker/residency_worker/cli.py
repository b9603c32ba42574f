"""Worker commands of the `residency` CLI: `worker`, `make-model` and `profile`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

from residency.modelgen import ARCHES, PRESETS
from residency_worker.hostmem import enable_huge_pages


def _read_token(path: Path | None, env_name: str) -> str | None:
    """A bearer token from a file (preferred) or an environment variable; never logged."""
    if path is not None:
        token = path.read_text().strip()
        if not token:
            raise typer.BadParameter(f"{path} is empty")
        return token
    return os.environ.get(env_name) or None


def worker(
    node: str = typer.Option(os.uname().nodename, "--node", help="Name of the node this worker serves."),
    gpu_memory: str | None = typer.Option(
        None,
        "--gpu-memory",
        help="GPU memory budget of each GPU, e.g. 8GiB, or one per GPU (8GiB,4GiB). Required without a GPU "
        "(the tier is then emulated on the CPU).",
    ),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        help="The CUDA GPUs to drive: 'all' or indices like 0,2 (numbered 0..n-1 in that order). Default: "
        "the current GPU only.",
    ),
    emulated_gpus: int | None = typer.Option(
        None,
        "--emulated-gpus",
        help="Emulate this many GPUs on the CPU, each with the --gpu-memory budget (separate budgets, one "
        "host memory; everything they report says emulated).",
    ),
    models_root: list[Path] = typer.Option(
        ..., "--models-root", help="Allowed root for model dirs (repeatable)."
    ),
    trust_remote_code_root: list[Path] = typer.Option(
        [],
        "--trust-remote-code-root",
        help="Allow models that ship custom code (config.json auto_map) under this root, which must also "
        "be a --models-root (repeatable). Default: nowhere; transformers gets trust_remote_code=False.",
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8100, "--port"),
    admin_token_file: Path | None = typer.Option(
        None, "--admin-token-file", help="File holding the admin bearer token (or env RESIDENCY_ADMIN_TOKEN)."
    ),
    inference_token_file: Path | None = typer.Option(
        None,
        "--inference-token-file",
        help="Require this bearer token for inference (or env RESIDENCY_INFERENCE_TOKEN); open when unset.",
    ),
    emulate: bool = typer.Option(
        False, "--emulate", help="Use the emulated tier even when a GPU is present."
    ),
    preempted_wait_seconds: float = typer.Option(10.0, help="How long a request to a preempted model waits."),
    calibration_mib: int = typer.Option(256, help="Size of the start-up host→device peak measurement."),
    log_level: str = typer.Option("info", "--log-level"),
    join: bool = typer.Option(
        False,
        "--join/--standalone",
        help="Join the cluster: register the NodeProfile and converge to this node's ModelPlacements.",
    ),
    endpoint: str | None = typer.Option(
        None, help="URL the router uses to reach this worker (default http://HOST:PORT)."
    ),
    host_memory: str | None = typer.Option(
        None, help="Host memory budget for offloaded weights (default: all RAM)."
    ),
    pod_name: str | None = typer.Option(
        os.environ.get("POD_NAME"),
        help="This worker's Pod (env POD_NAME): annotated against scale-down while it serves.",
    ),
    pod_namespace: str | None = typer.Option(os.environ.get("POD_NAMESPACE"), help="Namespace of that Pod."),
    protect: bool = typer.Option(
        True,
        "--protect/--no-protect",
        help="Annotate the Pod safe-to-evict=false / do-not-disrupt while serving.",
    ),
    node_heartbeat: bool = typer.Option(
        False, help="Also keep the Node object Ready (local clusters without a kubelet)."
    ),
    lease_renew_seconds: float = typer.Option(
        10.0,
        envvar="RESIDENCY_LEASE_RENEW_SECONDS",
        min=0.5,
        help="Seconds between renewals of this node's Lease (the kubelet's 10 s); the Lease lasts four "
        "periods. Keep the operator's RESIDENCY_HEARTBEAT_GRACE_SECONDS at three periods or more.",
    ),
    background_profile: bool = typer.Option(
        False,
        "--background-profile/--no-background-profile",
        help="Measure a compact SensitivityProfile of each model loaded here that has none for this GPU, "
        "in idle time, and publish it (docs/profiles.md).",
    ),
) -> None:
    """Run the node's worker: the torch engine plus its OpenAI-compatible and admin HTTP API."""
    enable_huge_pages()  # before torch is imported
    from residency_worker.engine import Engine
    from residency_worker.engine.tiers import parse_bytes
    from residency_worker.gpus import build_tiers
    from residency_worker.node import serve_node
    from residency_worker.server import ServerSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tiers = build_tiers(gpus, emulated_gpus, gpu_memory, emulate=emulate)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    for tier in tiers:
        if tier.emulated:
            typer.echo(
                f"no GPU in use: EMULATED GPU {tier.index} on the CPU with a {tier.budget_bytes}-byte "
                "budget; every report says emulated: true",
                err=True,
            )
        else:
            typer.echo(
                f"GPU {tier.index} ({tier.device}): {tier.gpu_name}, budget {tier.budget_bytes} bytes",
                err=True,
            )
    admin_token = _read_token(admin_token_file, "RESIDENCY_ADMIN_TOKEN")
    if admin_token is None:
        typer.echo("no admin token configured: the admin API will refuse every call", err=True)
    engine = Engine(
        tiers,
        list(models_root),
        node=node,
        calibration_bytes=calibration_mib * 2**20,
        remote_code_roots=list(trust_remote_code_root),
    )
    settings = ServerSettings(
        admin_token=admin_token,
        inference_token=_read_token(inference_token_file, "RESIDENCY_INFERENCE_TOKEN"),
        preempted_wait_seconds=preempted_wait_seconds,
    )
    agent_config = None
    if join:
        from residency_worker.presence import AgentConfig, host_memory_bytes

        agent_config = AgentConfig(
            node=node,
            endpoint=endpoint or f"http://{host}:{port}",
            host_memory_bytes=parse_bytes(host_memory) if host_memory else host_memory_bytes(),
            node_heartbeat=node_heartbeat,
            heartbeat_seconds=lease_renew_seconds,
            pod_name=pod_name if protect else None,
            pod_namespace=pod_namespace,
            lease_namespace=pod_namespace or os.environ.get("RESIDENCY_NAMESPACE", "default"),
            background_profile=background_profile,
        )
    try:
        serve_node(engine, settings, host, port, agent_config, log_level)
    finally:
        engine.close()


def make_model_command(
    out_dir: Path = typer.Argument(..., help="Directory to write (created if needed)."),
    arch: str = typer.Option("llama", "--arch", help=" | ".join(ARCHES)),
    preset: str = typer.Option("tiny", "--preset", help=" | ".join(PRESETS)),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 | float16 | float32"),
    layers: int | None = typer.Option(
        None, "--layers", min=1, help="The preset's widths at this many layers (default: the preset's)."
    ),
) -> None:
    """Write a random-initialised Hugging Face model directory with real shapes (no downloads)."""
    from residency.modelgen import make_model

    overrides = None if layers is None else {"num_hidden_layers": layers}
    try:
        path = make_model(out_dir, arch=arch, preset=preset, seed=seed, dtype=dtype, overrides=overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(str(path))


def profile(
    model_dir: Path = typer.Argument(..., help="Hugging Face model directory to profile."),
    out: Path = typer.Option(
        Path("profile.json"), "--out", help="Profile JSON (a PNG is written beside it)."
    ),
    gpu_memory: str | None = typer.Option(None, "--gpu-memory", help="Budget; required without a GPU."),
    dtype: str = typer.Option("bfloat16", "--dtype"),
    fractions: str = typer.Option("1.0,0.9,0.75,0.5,0.25,0.0", "--fractions"),
    sequence_lengths: str = typer.Option("128,512", "--sequence-lengths"),
    decode_tokens: int = typer.Option(16, "--decode-tokens"),
    trials: int = typer.Option(3, "--trials"),
    emulate: bool = typer.Option(False, "--emulate"),
) -> None:
    """Measure decode/prefill tokens/s against resident fraction in both modes; write JSON and a PNG."""
    enable_huge_pages()  # before torch is imported
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from residency_worker.engine import Engine, make_gpu_tier
    from residency_worker.engine.profile import ProfileSettings, plot_profile, profile_model
    from residency_worker.engine.tiers import parse_bytes

    settings = ProfileSettings(
        dtype=dtype,
        fractions=tuple(float(f) for f in fractions.split(",")),
        sequence_lengths=tuple(int(n) for n in sequence_lengths.split(",")),
        decode_tokens=decode_tokens,
        trials=trials,
    )
    try:
        tier = make_gpu_tier(parse_bytes(gpu_memory) if gpu_memory else None, force_emulated=emulate)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    directory = model_dir.resolve()
    engine = Engine(tier, [directory.parent], node="profile", calibration_bytes=64 * 2**20)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task(f"profiling {directory.name}", total=settings.visits)

        def advance(description: str) -> None:
            bar.update(task, advance=1, description=description)

        result = profile_model(engine, str(directory), settings, progress=advance)
    engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    png = out.with_suffix(".png")
    plot_profile(result, png)
    for skipped in result.skipped:
        typer.echo(f"skipped {skipped}", err=True)
    typer.echo(f"wrote {out} and {png}{' (EMULATED GPU tier)' if result.emulated else ''}")


DEFAULT_REPORT_SHAPES = "qwen2.5-0.5b,qwen2.5-3b,llama-3-8b"


def report(
    out: Path = typer.Option(Path("reports"), "--out", help="Reports folder; one subfolder per GPU."),
    models: Path = typer.Option(
        Path.home() / ".cache/residency/report-models", "--models", help="Where the random models are kept."
    ),
    shapes: str = typer.Option(
        DEFAULT_REPORT_SHAPES,
        "--shapes",
        help="Comma-separated preset[:layers][@arch], e.g. llama-3-8b:16 for its widths at 16 layers.",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Tiny shapes, reduced grid: checks the pipeline on a CPU."
    ),
    sequence_lengths: str | None = typer.Option(None, "--sequence-lengths", help="Default 512,4096."),
    decode_tokens: int | None = typer.Option(None, "--decode-tokens"),
    trials: int | None = typer.Option(None, "--trials"),
    budget_seconds: float | None = typer.Option(
        None,
        "--budget-seconds",
        help="Stop starting new steps after this long; the rest is listed as skipped.",
    ),
    gpu_memory: str | None = typer.Option(
        None, "--gpu-memory", help="GPU budget (default: 90% of the GPU; 8GiB for the emulated tier)."
    ),
    emulate: bool = typer.Option(False, "--emulate", help="Use the emulated tier even with a GPU."),
    sections: str = typer.Option(
        "preemption,peers,pageable,curves", "--sections", help="Which sections to measure."
    ),
    render_only: Path | None = typer.Option(
        None, "--render-only", help="Re-render report.md and the plots from an existing report.json."
    ),
    curves_from: Path | None = typer.Option(
        None, "--curves-from", help="With --render-only: take the decode curves from this curves-only run."
    ),
) -> None:
    """Measure decode under offload, preemption cost, link amplification and the peers; write the report."""
    import dataclasses

    enable_huge_pages()  # before torch is imported
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from residency_worker.engine.tiers import parse_bytes
    from residency_worker.report import ReportSettings, Shape, run_report
    from residency_worker.report.measure import SECTIONS

    if render_only is not None:
        from residency_worker.report.render import render
        from residency_worker.report.run import analyse, combine

        base = json.loads(render_only.read_text())
        combined = combine(base, json.loads(curves_from.read_text())) if curves_from else analyse(base)
        render_only.write_text(json.dumps(combined, indent=2) + "\n")
        typer.echo(render(combined, render_only.parent).read_text())
        return
    try:
        parsed = tuple(Shape.parse(s) for s in shapes.split(",") if s)
        if quick:  # the quick grid takes tiny shapes unless some were named
            settings = ReportSettings.quick(None if shapes == DEFAULT_REPORT_SHAPES else parsed)
        else:
            settings = ReportSettings(shapes=parsed)
        chosen = tuple(section for section in sections.split(",") if section)
        unknown = sorted(set(chosen) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
        overrides: dict[str, object] = {"budget_seconds": budget_seconds, "sections": chosen}
        if sequence_lengths:
            overrides["sequence_lengths"] = tuple(int(n) for n in sequence_lengths.split(","))
        if decode_tokens:
            overrides["decode_tokens"] = decode_tokens
        if trials:
            overrides["trials"] = trials
        settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]
        budget_bytes = parse_bytes(gpu_memory) if gpu_memory else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
        task = bar.add_task("residency report", total=None)
        folder = run_report(
            settings,
            out,
            models,
            gpu_memory_bytes=budget_bytes,
            emulate=emulate,
            progress=lambda text: bar.update(task, description=text),
        )
    typer.echo(f"wrote {folder / 'report.md'}, report.json and plots")
    typer.echo((folder / "report.md").read_text())


def register(app: typer.Typer) -> None:
    """Adds the worker's commands to the main `residency` CLI."""
    app.command("worker")(worker)
    app.command("make-model")(make_model_command)
    app.command("profile")(profile)
    app.command("report")(report)
