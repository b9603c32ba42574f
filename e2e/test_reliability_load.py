"""Reliability under load (issue #9): many concurrent clients against the router and two real workers on
loopback. Measures throughput, latency percentiles, memory (RSS) and backpressure, and checks that the
workers' KV and committed GPU bytes return to their baseline afterwards (no leak)."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import httpx
import pytest

from conftest import NodePool
from harness import Process, apply, wait_for
from reliability_helpers import (
    Api,
    Recorder,
    RssWatch,
    all_ready,
    mib,
    percentile,
    pid_of,
    queue_depth,
    small_llm,
    start_router,
    worker_node,
)

pytestmark = pytest.mark.reliability

CLIENTS = int(os.environ.get("RESIDENCY_LOAD_CLIENTS", "200"))
SECONDS = float(os.environ.get("RESIDENCY_LOAD_SECONDS", "60"))
BACKOFF_CAP_SECONDS = 1.0  # a client honours Retry-After, capped so that the offered load stays high
ADMISSION = os.environ.get("RESIDENCY_LOAD_ADMISSION", "1") != "0"  # 0: the router admits everything
errors: list[str] = []
served_tokens: list[int] = []
refusals_without_retry_after: list[str] = []


async def _client(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    index: int,
    until: float,
    results: list[tuple[str, float]],
) -> None:
    """One client: a completion, then the next; on 429/503 it waits Retry-After (capped) and goes on."""
    sequence = 0
    while time.monotonic() < until:
        sequence += 1
        body = {
            "model": model,
            "prompt": f"Client {index} asks {sequence}",
            "max_tokens": 8,
            "temperature": 0,
        }
        started = time.monotonic()
        try:
            response = await client.post(f"{url}/v1/completions", json=body)
            seconds = time.monotonic() - started
            if response.status_code == 200 and response.json()["usage"]["completion_tokens"] > 0:
                results.append(("200", seconds))
                served_tokens.append(response.json()["usage"]["completion_tokens"])
                continue
            results.append((str(response.status_code), seconds))
            retry_after = response.headers.get("retry-after")
            if response.status_code == 429 and retry_after is None:
                refusals_without_retry_after.append(response.text)
            if response.status_code in (429, 503) and retry_after is not None:
                await asyncio.sleep(min(float(retry_after), BACKOFF_CAP_SECONDS))
            else:
                await asyncio.sleep(BACKOFF_CAP_SECONDS)
        except httpx.HTTPError as exc:
            results.append((exc.__class__.__name__, time.monotonic() - started))
            errors.append(
                f"started at {started - until + SECONDS:.1f} s, "
                f"failed after {time.monotonic() - started:.2f} s: {exc!r} "
                f"(from {exc.__cause__ or exc.__context__!r})"
            )
            await asyncio.sleep(BACKOFF_CAP_SECONDS)


async def _load(
    url: str, models: list[str], clients: int, seconds: float
) -> tuple[list[tuple[str, float]], float]:
    results: list[tuple[str, float]] = []
    # idle connections expire on the client well before the server's 5 s keep-alive timeout closes them, as
    # a well-behaved HTTP/1.1 client does: otherwise reusing one at the instant it closes reads a reset. A
    # client backing off after a 429 (1 s) leaves its connection idle: under 0.5 s it is never reused after
    # one, however late a starved event loop wakes up
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=0.5)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(
            *(_client(client, url, models[i % len(models)], i, until, results) for i in range(clients))
        )
        return results, time.monotonic() - started


@pytest.mark.slow_reliability
def test_200_clients_for_60_s_through_the_router_and_two_workers(
    reliability: Recorder,
    namespace: str,
    operator: Process,
    gpu_nodes: NodePool,
    models_root: Path,
    cluster: str,
    tmp_path: Path,
) -> None:
    reliability.record(
        injected=f"{CLIENTS} concurrent clients for {SECONDS:.0f} s via the router on 2 workers (httpx async)"
    )
    api = Api(cluster)
    router, url = start_router(
        cluster, tmp_path / "router.log", extra_args=() if ADMISSION else ("--no-admission",)
    )
    try:
        # budgets that hold one model each at full residency: the two models land on two workers
        nodes = [gpu_nodes.add(f"gpu-load-{i}", "1200000", wait=False) for i in range(2)]
        wait_for(lambda: all(n.profile() for n in nodes), 120, what="2 NodeProfiles")
        names = ["load-a", "load-b"]
        for name, source in zip(names, ["tiny-llama", "tiny-qwen"], strict=True):
            apply(
                small_llm(name, models_root / source, maxBatchSize=8, offload={"maxFraction": 0.0}), namespace
            )
        wait_for(lambda: all_ready(api, namespace, names), 120, what="both models Ready")
        assert {api.status(namespace, n)["node"] for n in names} == {n.name for n in nodes}
        models = [f"{namespace}/{n}" for n in names]
        for model in models:  # warm up: first requests pay one-time costs
            assert httpx.post(
                f"{url}/v1/completions", json={"model": model, "prompt": "hi"}, timeout=60
            ).is_success
        time.sleep(1)
        baseline = {n.name: worker_node(n) for n in nodes}
        pids = {"router": pid_of(router), **{n.name: pid_of(n.process) for n in nodes}}
        with RssWatch(pids) as rss:
            results, elapsed = asyncio.run(_load(url, models, CLIENTS, SECONDS))

        def drained() -> bool:
            return all(queue_depth(httpx.get(f"{n.url}/metrics", timeout=10)) == 0 for n in nodes)

        wait_for(drained, 30, what="queues drained")
        after: dict[str, dict[str, object]] = {}

        def back_to_baseline() -> bool:
            after.update({n.name: worker_node(n) for n in nodes})
            return all(
                after[name]["allocated_bytes"] == b["allocated_bytes"]
                and after[name]["reserved_bytes"] == b["reserved_bytes"]
                for name, b in baseline.items()
            )

        leak_free = True
        try:
            wait_for(back_to_baseline, 15, what="KV and committed bytes back to the baseline")
        except AssertionError:
            leak_free = False
        still_ready = all_ready(api, namespace, names)
    finally:
        router.stop()
    counts = collections.Counter(outcome for outcome, _ in results)
    ok = [seconds for outcome, seconds in results if outcome == "200"]
    backpressure = counts["429"] + counts["503"]
    failures = {k: v for k, v in counts.items() if k not in ("200", "429", "503")}
    reliability.record(
        measured=f"{len(results)} requests in {elapsed:.0f} s: {len(ok)} ok ({len(ok) / elapsed:.1f}/s), "
        f"{counts['429']} x 429, {counts['503']} x 503, other {failures or 0}"
    )
    refused = [seconds for outcome, seconds in results if outcome == "429"]
    reliability.record(
        measured=f"latency of ok requests p50 {percentile(ok, 50) * 1000:.0f} ms, "
        f"p99 {percentile(ok, 99) * 1000:.0f} ms; served {sum(served_tokens) / elapsed:.0f} tokens/s; "
        f"admission {'on' if ADMISSION else 'off'}"
        + (f"; 429 answered in p99 {percentile(refused, 99) * 1000:.0f} ms" if refused else "")
    )
    reliability.record(
        measured="max RSS "
        + ", ".join(f"{name} {mib(rss.peak[name])} (start {mib(rss.first[name])})" for name in pids)
    )
    reliability.record(
        measured="GPU bytes allocated (weights+KV) / reserved before -> after: "
        + "; ".join(
            f"{name} {b['allocated_bytes']}/{b['reserved_bytes']} -> "
            f"{after[name]['allocated_bytes']}/{after[name]['reserved_bytes']}"
            for name, b in baseline.items()
        )
    )
    assert not failures, (failures, errors[:5])
    assert not refusals_without_retry_after, refusals_without_retry_after[:3]
    assert len(ok) >= CLIENTS, counts  # every client got answers, not only backpressure
    assert backpressure < len(results)
    assert leak_free, (baseline, after)
    assert still_ready
    # bounded memory: no process grew by more than 512 MiB over its start (tiny models; it would be a leak)
    growth = {name: rss.peak[name] - rss.first[name] for name in pids}
    assert max(growth.values()) < 512 * 2**20, {k: mib(v) for k, v in growth.items()}
