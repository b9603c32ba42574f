"""Reliability under load (issues #9, #27): many concurrent streaming clients, in processes of their own
(load_client.py), against the router and two real workers on loopback. Measures throughput, each admitted
request's time to first token, each 429's latency, memory (RSS), CPU and backpressure, and checks that the
workers' KV and committed GPU bytes return to their baseline afterwards (no leak)."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import NodePool
from harness import Process, Sampler, apply, wait_for
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
LOAD_CLIENT = Path(__file__).with_name("load_client.py")

CLIENTS = int(os.environ.get("RESIDENCY_LOAD_CLIENTS", "200"))
SECONDS = float(os.environ.get("RESIDENCY_LOAD_SECONDS", "60"))
CLIENT_PROCESSES = int(os.environ.get("RESIDENCY_LOAD_PROCESSES", "2"))
ADMISSION = os.environ.get("RESIDENCY_LOAD_ADMISSION", "1") != "0"  # 0: the router admits everything
SHORT_CLIENTS, SHORT_SECONDS = 60, 15.0  # `make test`'s run (without --reliability-full)
TTFT_GOAL_SECONDS = 2.0
REFUSAL_GOAL_SECONDS = 0.1
REFUSAL_BOUND_SECONDS = 1.0
"""What the long run asserts for a 429's p99 (the goal, REFUSAL_GOAL_SECONDS, printed beside it): on the
shared 2-core machine the router's event loop waits for a CPU; see docs/serving.md, Under load."""
MIN_TOKENS_PER_SECOND = 228.0
"""Served tokens/s of the same test before admission bounded TTFT (main, 2026-12-07): not to fall below."""


@dataclass
class Load:
    """What the client processes measured (load_client.py), all of them together."""

    outcomes: list[dict[str, Any]]
    elapsed_seconds: float
    loop_lag_seconds: list[float]
    cpu_seconds: float  # of the client processes together
    probe_seconds: list[float]  # `GET /healthz` under the load: what any answer costs here and now

    def of(self, status: str) -> list[dict[str, Any]]:
        return [o for o in self.outcomes if o["status"] == status]


def run_load(url: str, models: list[str], clients: int, seconds: float, workdir: Path) -> Load:
    """`clients` streaming clients for `seconds`, split over CLIENT_PROCESSES processes of their own (apart
    from pytest and its samplers, so a starved generator does not pass for a slow router)."""
    processes = max(1, min(CLIENT_PROCESSES, clients))
    start_at = time.time() + 3.0  # every process imported httpx by then
    running = []
    for p in range(processes):
        first, count = p * clients // processes, (p + 1) * clients // processes - p * clients // processes
        out = workdir / f"load-{p}.json"
        command = [sys.executable, str(LOAD_CLIENT), "--url", url, "--clients", str(count)]
        command += ["--first-index", str(first), "--seconds", str(seconds), "--start-at", str(start_at)]
        command += ["--out", str(out), *(arg for model in models for arg in ("--model", model))]
        running.append((subprocess.Popen(command), out))
    results = []
    for popen, out in running:
        assert popen.wait(timeout=seconds + 180) == 0, f"load client exited {popen.returncode}"
        results.append(json.loads(out.read_text()))
    return Load(
        [o for r in results for o in r["outcomes"]],
        max(r["elapsed_seconds"] for r in results),
        [lag for r in results for lag in r["loop_lag_seconds"]],
        sum(r["cpu_seconds"] for r in results),
        [seconds for r in results for seconds in r["probe_seconds"]],
    )


def histogram_quantile(metrics: str, name: str, q: float) -> float:
    """The least bucket bound under which share `q` of a Prometheus histogram's samples lie (inf: above)."""
    counts: dict[float, float] = collections.defaultdict(float)  # summed over labels (models)
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            counts[float(bound)] += float(line.rsplit(" ", 1)[1])
    buckets = sorted(counts.items())
    total = buckets[-1][1] if buckets else 0.0
    return next((bound for bound, count in buckets if count >= q * total), float("inf"))


class GateWatch(Sampler):
    """Samples the router's admission limit and the TTFT p99 its feedback holds, per model, every second of
    the load (from its /metrics: one small request a second, beside hundreds)."""

    def __init__(self, url: str) -> None:
        super().__init__(1.0, "gate-watch")
        self.url = url
        self.samples: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)

    def sample(self) -> None:
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return
        values: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for line in text.splitlines():
            for name in ("admission_limit", "admission_ttft_quantile_seconds"):
                if line.startswith(f"residency_router_{name}{{"):
                    model = line.split('model="', 1)[1].split('"', 1)[0]
                    values[model][name] = float(line.rsplit(" ", 1)[1])
        for model, seen in values.items():
            self.samples[model].append(
                (
                    seen.get("admission_limit", math.nan),
                    seen.get("admission_ttft_quantile_seconds", math.nan),
                )
            )

    def summary(self) -> str:
        parts = []
        for model, seen in sorted(self.samples.items()):
            limits = sorted(limit for limit, _ in seen)
            held = sorted(q for _, q in seen if not math.isnan(q))
            held_median = ms(held[len(held) // 2]) if held else "-"
            parts.append(
                f"{model.split('/')[-1]} limit {limits[0]:.0f}-{limits[-1]:.0f} (median "
                f"{limits[len(limits) // 2]:.0f}), held p99 median {held_median}"
            )
        return "; ".join(parts) or "no samples"


def full_collection_buckets(metrics: str) -> dict[float, float]:
    """A process's full garbage collections (generation 2) so far, from its /metrics: bound -> count."""
    buckets = {}
    for line in metrics.splitlines():
        if line.startswith("residency_gc_pause_seconds_bucket{") and 'generation="2"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def full_collections(before: str, after: str) -> str:
    """The full garbage collections between two /metrics of one process: how many, and the longest (as its
    histogram bucket's bound). Each one stalls every request the process holds."""
    first, last = full_collection_buckets(before), full_collection_buckets(after)
    during = {bound: count - first.get(bound, 0.0) for bound, count in last.items()}
    total = during.get(float("inf"), 0.0)
    if not total:
        return "none"
    longest = min(bound for bound, count in during.items() if count >= total)
    return f"{total:.0f}, longest <= {ms(longest)}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (its /proc stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


@dataclass
class Measured:
    """What a load run through the router showed, in seconds (the structural checks passed already)."""

    ttft_seconds: list[float]
    refusal_seconds: list[float]
    tokens_per_second: float
    refusals: int
    probe_seconds: list[float]


def load_through_router(
    reliability: Recorder,
    namespace: str,
    gpu_nodes: NodePool,
    models_root: Path,
    cluster: str,
    tmp_path: Path,
    clients: int,
    seconds: float,
) -> Measured:
    """`clients` streaming clients for `seconds` through the router against two workers (a tiny model
    each, a batch of 8): records the figures, checks what must hold on any machine, returns the times."""
    reliability.record(
        injected=f"{clients} concurrent streaming clients for {seconds:.0f} s via the router on 2 workers"
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
        metrics_before = {"router": httpx.get(f"{url}/metrics", timeout=10).text}
        metrics_before.update({n.name: httpx.get(f"{n.url}/metrics", timeout=10).text for n in nodes})
        pids = {"router": pid_of(router), **{n.name: pid_of(n.process) for n in nodes}}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        with RssWatch(pids) as rss, GateWatch(url) as gates:
            load = run_load(url, models, clients, seconds, tmp_path)
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        if os.environ.get("RESIDENCY_LOAD_OUT"):  # every request's times, for a closer look
            Path(os.environ["RESIDENCY_LOAD_OUT"]).write_text(json.dumps(load.outcomes))

        def drained() -> bool:
            return all(queue_depth(httpx.get(f"{n.url}/metrics", timeout=10)) == 0 for n in nodes)

        wait_for(drained, 30, what="queues drained")
        router_metrics = httpx.get(f"{url}/metrics", timeout=10).text
        worker_metrics = {n.name: httpx.get(f"{n.url}/metrics", timeout=10).text for n in nodes}
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
    counts = collections.Counter(o["status"] for o in load.outcomes)
    ok = [o for o in load.of("200") if o["tokens"] > 0]
    refused = load.of("429")
    elapsed = load.elapsed_seconds
    ttft = [o["ttft_seconds"] for o in ok]
    refusal_seconds = [o["headers_seconds"] for o in refused]
    tokens_per_second = sum(o["tokens"] for o in ok) / elapsed
    backpressure = counts["429"] + counts["503"]
    failures = {k: v for k, v in counts.items() if k not in ("200", "429", "503")}
    reliability.record(
        measured=f"{len(load.outcomes)} streamed requests in {elapsed:.0f} s: {len(ok)} ok "
        f"({len(ok) / elapsed:.1f}/s), {counts['429']} x 429, {counts['503']} x 503, other {failures or 0}; "
        f"admission {'on' if ADMISSION else 'off'}; {len({o['client'] for o in ok})} of {clients} clients "
        "served at least once"
    )
    reliability.record(
        measured=f"TTFT of ok requests p50 {ms(percentile(ttft, 50))}, p99 {ms(percentile(ttft, 99))} "
        f"(goal <= {ms(TTFT_GOAL_SECONDS)}; the router's own view p99 <= "
        f"{ms(histogram_quantile(router_metrics, 'residency_router_time_to_first_token_seconds', 0.99))}); "
        "whole answer p99 "
        f"{ms(percentile([o['total_seconds'] for o in ok], 99))}; served {tokens_per_second:.0f} tokens/s"
    )
    reliability.record(
        measured=f"429 answered in p50 {ms(percentile(refusal_seconds, 50))}, "
        f"p99 {ms(percentile(refusal_seconds, 99))} (goal <= {ms(REFUSAL_GOAL_SECONDS)}); "
        f"client event-loop lag p99 {ms(percentile(load.loop_lag_seconds, 99))}, "
        f"max {ms(max(load.loop_lag_seconds, default=0.0))} ({CLIENT_PROCESSES} client processes); router's "
        f"p99 <= {ms(histogram_quantile(router_metrics, 'residency_router_event_loop_lag_seconds', 0.99))}, "
        f"max <= {ms(histogram_quantile(router_metrics, 'residency_router_event_loop_lag_seconds', 1.0))}; "
        f"router's refusals p99 <= "
        f"{ms(histogram_quantile(router_metrics, 'residency_router_refusal_seconds', 0.99))}"
    )
    reliability.record(
        measured="floor: GET /healthz (no auth, no work) under the same load, "
        f"{len(load.probe_seconds)} probes, p50 {ms(percentile(load.probe_seconds, 50))}, "
        f"p99 {ms(percentile(load.probe_seconds, 99))}"
    )
    reliability.record(
        measured=f"CPU seconds used in the {elapsed:.0f} s of the 2 cores' {2 * elapsed:.0f}: "
        + ", ".join(f"{name} {used:.1f}" for name, used in cpu.items())
        + f", clients {load.cpu_seconds:.1f}"
    )
    reliability.record(measured=f"admission, sampled each second: {gates.summary()}")
    reliability.record(
        measured="full garbage collections during the load: "
        + "; ".join(
            f"{name} {full_collections(metrics_before[name], text)}"
            for name, text in {"router": router_metrics, **worker_metrics}.items()
        )
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
    errors = [o["error"] for o in load.outcomes if o["status"] in failures]
    assert not failures, (failures, errors[:5])
    without_retry_after = [o["error"] for o in refused if o["retry_after"] is None]
    assert not without_retry_after, without_retry_after[:3]
    assert len(ok) >= clients, counts  # answers, not only backpressure
    assert backpressure < len(load.outcomes)
    assert leak_free, (baseline, after)
    assert still_ready
    # bounded memory: no process grew by more than 512 MiB over its start (tiny models; it would be a leak)
    growth = {name: rss.peak[name] - rss.first[name] for name in pids}
    assert max(growth.values()) < 512 * 2**20, {k: mib(v) for k, v in growth.items()}
    return Measured(ttft, refusal_seconds, tokens_per_second, len(refused), load.probe_seconds)


def test_a_burst_of_clients_is_admitted_or_refused_at_once(
    reliability: Recorder,
    namespace: str,
    operator: Process,
    gpu_nodes: NodePool,
    models_root: Path,
    cluster: str,
    tmp_path: Path,
) -> None:
    """The short run of `make test`: more clients than two batches per model, so that admission refuses some
    (a new model admits two batches until its rate is measured). On a busy CI machine only what holds
    whatever the CPU does is asserted: every refusal is a 429 with Retry-After, every client is served, no
    other error, nothing leaks, and a refusal, which does no work, comes back before the admitted requests'
    first tokens do (medians)."""
    measured = load_through_router(
        reliability, namespace, gpu_nodes, models_root, cluster, tmp_path, SHORT_CLIENTS, SHORT_SECONDS
    )
    if ADMISSION:
        assert measured.refusals > 0, "more clients than the models admit, and none refused"
        assert percentile(measured.refusal_seconds, 50) < percentile(measured.ttft_seconds, 50)


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
    """The goal of issue 27, measured: admitted requests' TTFT p99 within 2 s, refusals 429 with
    Retry-After, answered quickly (see REFUSAL_BOUND_SECONDS), served tokens/s not below the run before."""
    measured = load_through_router(
        reliability, namespace, gpu_nodes, models_root, cluster, tmp_path, CLIENTS, SECONDS
    )
    if not ADMISSION:  # the comparison run without admission: figures only
        return
    assert percentile(measured.ttft_seconds, 99) <= TTFT_GOAL_SECONDS
    assert percentile(measured.refusal_seconds, 99) <= REFUSAL_BOUND_SECONDS
    assert measured.tokens_per_second >= MIN_TOKENS_PER_SECOND
