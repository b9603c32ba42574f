"""The `residency` command: operator, worker, models, CRDs, planning tools."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

app = typer.Typer(
    help="residency: share GPU nodes among LLMs with measured partial GPU residency, offload and preemption.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold tokens: never print them
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
    trust_remote_code_root: list[Path] = typer.Option(
        [],
        "--trust-remote-code-root",
        help="Allow models that ship custom code (config.json auto_map) under this root, which must also "
        "be a --models-root (repeatable; env RESIDENCY_REMOTE_CODE_ROOTS). Default: nowhere.",
    ),
    liveness: str | None = typer.Option(
        None, help="Serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    ),
    capacity_requests: bool | None = typer.Option(
        None,
        "--capacity-requests/--no-capacity-requests",
        help="Create placeholder Pods that ask a cluster autoscaler for GPU nodes when a model fits "
        "nowhere (env RESIDENCY_CAPACITY_REQUESTS; default off: without an autoscaler they stay Pending).",
    ),
) -> None:
    """Run the kopf operator: validates LLMModels, plans placements, writes status and Events."""
    from residency_operator.config import OperatorConfig
    from residency_operator.main import run_operator

    env = OperatorConfig.from_env()
    roots = list(models_root) or env.allowed_model_roots
    if not roots:
        raise typer.BadParameter("give at least one --models-root (or set RESIDENCY_MODEL_ROOTS)")
    remote = list(trust_remote_code_root) or env.remote_code_roots
    capacity = env.capacity
    if capacity_requests is not None:
        capacity = dataclasses.replace(capacity, enabled=capacity_requests)
    config = dataclasses.replace(
        env, allowed_model_roots=roots, namespaces=namespace, remote_code_roots=remote, capacity=capacity
    )
    run_operator(config, liveness_endpoint=liveness)


def _read_token(path: Path | None) -> str | None:
    return path.read_text().strip() if path else None


@app.command()
def router(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    hold_seconds: float = typer.Option(60.0, help="How long a request waits for a loading/resuming model."),
    auth: str = typer.Option(
        "kubernetes",
        help="kubernetes: callers present a token the API server accepts (TokenReview) and need the verb "
        "on the model (SubjectAccessReview); token: one shared token from --token-file; none: open "
        "(tests of other parts only).",
    ),
    token_file: Path | None = typer.Option(None, help="With --auth token: the bearer token clients present."),
    worker_token_file: Path | None = typer.Option(
        None, help="Bearer token the workers' inference API wants."
    ),
    verb: str = typer.Option("infer", help="The verb a caller needs on llmmodels/<name> in its namespace."),
    auth_cache_seconds: float = typer.Option(10.0, min=0.0, help="How long review answers are cached."),
    default_namespace: str = typer.Option(
        "default", help="Where a bare model name resolves for callers that are not ServiceAccounts."
    ),
    wake_namespace: str = typer.Option(
        "default", envvar="RESIDENCY_NAMESPACE", help="Namespace of the wake ConfigMap (the router's own)."
    ),
    ttft_target_seconds: float = typer.Option(
        2.0, min=0.01, help="Admission: each model admits what it serves within this time to first token."
    ),
    admission: bool = typer.Option(
        True, help="Admission control (429 + Retry-After over a model's limit); off admits everything."
    ),
) -> None:
    """Run the OpenAI-compatible router: one endpoint, routed by `model` to the worker holding it."""
    from residency_operator.router.main import AuthMode, RouterOptions, run_router

    modes: dict[str, AuthMode] = {"kubernetes": "kubernetes", "token": "token", "none": "none"}
    if auth not in modes:
        raise typer.BadParameter("--auth is kubernetes, token or none")
    run_router(
        RouterOptions(
            host=host,
            port=port,
            hold_seconds=hold_seconds,
            auth=modes[auth],
            token=_read_token(token_file),
            worker_token=_read_token(worker_token_file),
            verb=verb,
            auth_cache_seconds=auth_cache_seconds,
            default_namespace=default_namespace,
            wake_namespace=wake_namespace,
            ttft_target_seconds=ttft_target_seconds,
            admission=admission,
        )
    )


@app.command()
def chat(
    model: str = typer.Argument(..., help="namespace/name, or a name in the caller's namespace."),
    prompt: str = typer.Argument(..., help="The user message."),
    router_url: str = typer.Option(
        "http://127.0.0.1:8000",
        "--router",
        envvar="RESIDENCY_ROUTER",
        help="The router's base URL (`make demo` prints the export line for its router).",
    ),
    max_tokens: int = typer.Option(32, min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 decodes greedily."),
    token_file: Path | None = typer.Option(None, help="Bearer token for the router."),
    timeout_seconds: float = typer.Option(120.0, help="Give up after this long."),
) -> None:
    """Send one chat message through the router and print the answer."""
    import httpx

    token = _read_token(token_file)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    try:
        response = httpx.post(
            f"{router_url.rstrip('/')}/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=timeout_seconds,
        )
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the router at {router_url}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if response.status_code != 200:
        typer.echo(f"error {response.status_code}: {response.text}", err=True)
        raise typer.Exit(1)
    typer.echo(response.json()["choices"][0]["message"]["content"])


@app.command()
def doctor(
    router_url: str = typer.Option(
        "http://127.0.0.1:8000", "--router", envvar="RESIDENCY_ROUTER", help="The router's base URL."
    ),
    namespace: str = typer.Option(
        "default",
        "--lease-namespace",
        envvar="RESIDENCY_NAMESPACE",
        help="Namespace of the operator's Lease (the chart's release namespace).",
    ),
) -> None:
    """One screen: are the API server, CRDs, operator, router and each worker reachable and healthy?"""
    from residency.doctor import gather, render

    checks = gather(router_url, namespace)
    typer.echo(render(checks))
    failed = [c for c in checks if not c.ok and not c.warning]
    if failed:
        typer.echo(f"\n{len(failed)} problem(s): see the hints above.")
        raise typer.Exit(1)
    typer.echo("\nall good.")


def _register_contributed() -> None:
    """Commands contributed by the worker (worker, make-model, profile) and the planner (simulate)."""
    from residency_operator.simulator.command import register as register_simulator
    from residency_worker.cli import register as register_worker

    register_worker(app)
    register_simulator(app)


_register_contributed()
