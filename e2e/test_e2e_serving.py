"""Operator + real workers end to end: placement, partial residency, preemption and resume, changes."""

from __future__ import annotations

import collections
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx

import harness
from conftest import NodePool, model_status
from harness import SMALL_LIMITS, Process, apply, get_json, kubectl, wait_for, wait_for_node_event
from residency.names import placement_name
from residency_operator.state import IDLE_AFTER_SECONDS


def llm(name: str, path: Path, **spec: Any) -> dict[str, Any]:
    return harness.llm(name, path, **{**SMALL_LIMITS, **spec})


def phase(namespace: str, name: str, wanted: str) -> dict[str, Any] | None:
    status = model_status(namespace, name)
    return status if status.get("phase") == wanted else None  # type: ignore[return-value]


def complete(router: str, model: str, prompt: str, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(
        f"{router}/v1/completions",
        timeout=120,
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    )


def events_of(namespace: str, name: str) -> str:
    """REASON and MESSAGE of every Event on a model, one per line."""
    return kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name}",
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
    ).stdout


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_apply_ready_and_a_completion_through_the_router(
    namespace: str, operator: Process, gpu_nodes: NodePool, router: str, models_root: Path
) -> None:
    gpu_nodes.add("gpu-serve-1", "64MiB")
    apply(llm("chat", models_root / "tiny-llama", slo={"minDecodeTokensPerSecond": 1}), namespace)
    status = wait_for(lambda: phase(namespace, "chat", "Ready"), 120, what="Ready")
    timings = status["timings"]
    assert status["node"] == "gpu-serve-1" and status["residentPercent"] == 100
    assert timings["emulated"] is True and timings["loadSeconds"] > 0 and timings["weightBytes"] > 0
    moved, seconds, gbps = (
        timings["hostToDeviceBytes"],
        timings["hostToDeviceSeconds"],
        timings["hostToDeviceGBps"],
    )
    assert moved > 0 and seconds > 0
    assert abs(moved / seconds / 1e9 - gbps) <= 0.01 * gbps + 1e-3, timings
    assert status["endpoint"].startswith(gpu_nodes.nodes[0].url)
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Scheduled"] == conditions["Loaded"] == conditions["Ready"] == "True"
    response = complete(router, f"{namespace}/chat", "The scheduler places", 12)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 12 and body["choices"][0]["text"]
    # a bare name is looked up in the caller's namespace only (this open router's callers have none: the
    # default namespace), never across namespaces (test_e2e_tenancy.py resolves one for a ServiceAccount)
    by_name = complete(router, "chat", "The scheduler places", 12)
    assert by_name.status_code == 404 and "default/chat" in by_name.json()["error"]["message"]
    again = complete(router, f"{namespace}/chat", "The scheduler places", 12)
    assert again.json()["choices"][0]["text"] == body["choices"][0]["text"]
    assert complete(router, "no-such-model", "x").status_code == 404
    # the worker paces the model to its SLO while a model beside it has requests waiting: the placement
    # carries the SLO, and the worker exports the seconds it held the model back (none: it is alone)
    assert (
        get_json("modelplacement", placement_name(f"{namespace}/chat"))["spec"]["minDecodeTokensPerSecond"]
        == 1
    )
    metrics = httpx.get(f"{gpu_nodes.nodes[0].url}/metrics", timeout=10).text
    assert f'residency_paced_seconds{{model="{namespace}/chat"}} 0.0' in metrics
    row = kubectl("get", "llm", "chat", "-n", namespace).stdout.splitlines()[1].split()
    assert row[:4] == ["chat", "Ready", "gpu-serve-1", "100"]
    wait_for(
        lambda: (model_status(namespace, "chat").get("observed") or {}).get("decodeTokensPerSecond"),
        30,
        what="observed decode rate",
    )

    # the traffic the worker saw is the planner's demand for the model: two requests of 12 tokens (a
    # changed demand is written at most every 10 s, so the second one may show a report later)
    def demand() -> dict[str, Any] | None:
        placement = get_json("modelplacement", placement_name(f"{namespace}/chat"))
        seen: dict[str, Any] = placement.get("status", {}).get("demand") or {}
        tokens = seen.get("decodeTokensPerSecond", 0) * seen.get("windowSeconds", 0)
        return seen if abs(tokens - 24) < 0.1 else None

    seen = wait_for(demand, 40, what="a demand of 24 tokens over the window")
    assert 30 <= seen["windowSeconds"] <= 60, seen
    assert seen["promptTokensPerSecond"] > 0 and seen["typicalPromptTokens"] >= 1, seen


def test_memory_pressure_gives_partial_residency_within_budget(
    namespace: str, operator: Process, gpu_nodes: NodePool, models_root: Path
) -> None:
    # the 4-layer model whole takes about 0.6 MB, the 16-layer one 1.6 MB whole and 0.86 MB a quarter
    # resident (with the staging buffers its offloaded layers stream through): both fit only partly
    node = gpu_nodes.add("gpu-pressure-1", "1700000")
    budget = 1_700_000
    apply(llm("first", models_root / "tiny-llama", offload={"maxFraction": 0.75}), namespace)
    apply(llm("second", models_root / "tiny-deep", offload={"maxFraction": 0.75}), namespace)
    peak = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        profile = node.profile() or {}
        peak = max(peak, int((profile.get("status") or {}).get("residentBytes") or 0))
        if phase(namespace, "first", "Ready") and phase(namespace, "second", "Ready"):
            break
        time.sleep(0.3)
    fractions = sorted(model_status(namespace, n)["residentFraction"] for n in ("first", "second"))  # type: ignore[type-var]
    assert fractions[0] < 1.0, fractions
    assert peak <= budget
    for name in ("first", "second"):
        placement = get_json("modelplacement", f"{namespace}.{name}")
        assert placement["status"]["residentBytes"] <= budget
    listing = kubectl("get", "llm", "-n", namespace).stdout
    assert "Ready" in listing


def test_priority_preemption_and_resume_keep_the_text(
    namespace: str, operator: Process, gpu_nodes: NodePool, router: str, models_root: Path
) -> None:
    gpu_nodes.add("gpu-preempt-1", "700000")
    apply(llm("low", models_root / "tiny-llama", priority=1, offload={"maxFraction": 0.0}), namespace)
    wait_for(lambda: phase(namespace, "low", "Ready"), 120, what="low Ready")
    prompts = [f"Request number {i} asks the model" for i in range(6)]
    baseline = {p: text_of(complete(router, f"{namespace}/low", p, 24)) for p in prompts}

    results: dict[str, list[str]] = {p: [] for p in prompts}
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            for prompt in prompts:
                response = complete(router, f"{namespace}/low", prompt, 24)
                if response.status_code == 200:
                    results[prompt].append(response.json()["choices"][0]["text"])
                else:
                    failures.append(f"{response.status_code} {response.text}")

    worker = threading.Thread(target=client)
    worker.start()
    try:
        apply(llm("high", models_root / "tiny-qwen", priority=100, offload={"maxFraction": 0.0}), namespace)
        preempted = wait_for(lambda: phase(namespace, "low", "Preempted"), 120, what="low Preempted")
        assert f"{namespace}/high" in preempted["message"]
        wait_for(lambda: phase(namespace, "high", "Ready"), 120, what="high Ready")
        wait_for(
            lambda: "Preempted"
            in kubectl(
                "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=low"
            ).stdout,
            30,
            what="a Preempted Event on low",
        )
        kubectl("delete", "llm", "high", "-n", namespace, "--timeout=120s")
        resumed = wait_for(lambda: phase(namespace, "low", "Ready"), 120, what="low resumed")
        # each step is an Event with the seconds the worker measured
        measured = wait_for(
            lambda: out if "ModelResumed" in (out := events_of(namespace, "low")) else None,
            60,
            what="ModelResumed Event",
        )
        assert re.search(r"ModelPreempted\s+preempted on gpu-preempt-1 in \d+\.\d{3} s", measured), measured
        assert re.search(r"ModelResumed\s+resumed on gpu-preempt-1 in \d+\.\d{3} s", measured), measured
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=180)
    timings = resumed["timings"]
    assert timings["reloadSeconds"] > 0 and timings["hostToDeviceGBps"] > 0
    assert timings.get("kvTransferSeconds", 0) >= 0 and "kvBytes" in timings
    assert not failures, failures[:3]
    for prompt, texts in results.items():
        assert texts and all(text == baseline[prompt] for text in texts), prompt


def test_two_models_take_turns_on_a_gpu_that_holds_one(
    namespace: str, operator: Process, gpu_nodes: NodePool, router: str, models_root: Path
) -> None:
    """More model than GPU memory: a request for the model that is not running takes the room of the idle
    one (whose weights stay in host memory: a resume, not a read from disk), and back again."""
    gpu_nodes.add("gpu-turns", "700000")  # one tiny model whole, not two
    apply(llm("first", models_root / "tiny-llama", offload={"maxFraction": 0.0}), namespace)
    wait_for(lambda: phase(namespace, "first", "Ready"), 120, what="first Ready")
    first_text = text_of(complete(router, f"{namespace}/first", "Take turns", 8))
    apply(llm("second", models_root / "tiny-qwen", offload={"maxFraction": 0.0}), namespace)

    # nobody asked for the second one yet and the first one was busy lately: it waits for room (and asks
    # a cluster autoscaler for a node, where one runs)
    def decided() -> dict[str, Any] | None:
        status = model_status(namespace, "second")
        return status if status.get("reason") not in (None, "AwaitingPlacement") else None

    waiting = wait_for(decided, 60, what="second placed or refused")
    print("second before anyone asks:", waiting.get("phase"), waiting.get("reason"), waiting.get("message"))
    # it waits for room, or (when the first one's last demand report read 0: idle, it yields and a model
    # never loaded is never idle, planner/demand.py) it is placed at once; either way the turns follow
    decided_phases = ("Unschedulable", "WaitingForCapacity", "Scheduled", "Loading", "Ready")
    assert waiting["phase"] in decided_phases, waiting
    time.sleep(IDLE_AFTER_SECONDS + 2)  # the first one turns idle

    def until_answered(name: str) -> tuple[str, list[int], float]:
        started, statuses = time.monotonic(), []
        while time.monotonic() - started < 120:
            response = complete(router, f"{namespace}/{name}", "Take turns", 8)
            statuses.append(response.status_code)
            if response.status_code == 200:
                return text_of(response), statuses, time.monotonic() - started
            assert response.status_code == 503, response.text
            time.sleep(float(response.headers.get("retry-after", "1")))
        raise AssertionError(f"{name} never answered: {statuses}")

    second_text, statuses, seconds = until_answered("second")
    print(f"second answered after {seconds:.1f} s ({statuses})")
    gave_way = wait_for(lambda: phase(namespace, "first", "Preempted"), 30, what="first Preempted")
    # by the take-turns pass (it gave way, idle) or by the solver (the requests waiting for the second
    # one are worth more than the first one's measured traffic): either way for the second one
    message = gave_way["message"]
    assert ("gave way to" in message or "to make room for" in message) and f"{namespace}/second" in message
    assert phase(namespace, "second", "Ready")
    # the first one is asked for again: held by the router until the second one is idle, then resumed
    again, statuses, seconds = until_answered("first")
    print(f"first answered again after {seconds:.1f} s ({statuses})")
    assert seconds < IDLE_AFTER_SECONDS + 15, "waited for the second one to be idle, then a resume"
    assert again == first_text
    resumed = wait_for(lambda: phase(namespace, "first", "Ready"), 30, what="first Ready again")
    assert resumed["timings"]["reloadSeconds"] > 0
    assert phase(namespace, "second", "Preempted")
    assert text_of(complete(router, f"{namespace}/first", "Take turns", 8)) == first_text
    assert second_text
    time.sleep(4)  # and it stays so: the next planning rounds do not flip it back
    assert phase(namespace, "first", "Ready") and phase(namespace, "second", "Preempted")


def test_delete_unloads_first_and_spec_edit_replans(
    namespace: str, operator: Process, gpu_nodes: NodePool, models_root: Path
) -> None:
    node = gpu_nodes.add("gpu-delete-1", "64MiB")
    apply(llm("gone", models_root / "tiny-llama"), namespace)
    wait_for(lambda: phase(namespace, "gone", "Ready"), 120, what="Ready")
    kubectl(
        "patch", "llm", "gone", "-n", namespace, "--type=merge", "-p", '{"spec":{"maxSequenceLength":48}}'
    )
    wait_for(
        lambda: get_json("modelplacement", f"{namespace}.gone")["spec"]["maxSequenceLength"] == 48,
        60,
        what="placement re-planned",
    )
    generation = get_json("llm", "gone", "-n", namespace)["metadata"]["generation"]
    wait_for(
        lambda: model_status(namespace, "gone").get("observedGeneration") == generation
        and phase(namespace, "gone", "Ready"),
        120,
        what="Ready at the new generation",
    )
    # a new KV reservation reloads the model: an Event says so, with the seconds it took
    reloaded = wait_for(
        lambda: out if "ModelReloaded" in (out := events_of(namespace, "gone")) else None,
        60,
        what="ModelReloaded Event",
    )
    assert re.search(r"reloaded after its spec changed on gpu-delete-1 in \d+\.\d{3} s", reloaded), reloaded
    kubectl("delete", "llm", "gone", "-n", namespace, "--timeout=120s")
    # waiting for the unload is expected: not an error in the operator's log
    assert "failed temporarily" not in operator.log(), operator.log()[-2000:]
    assert kubectl("get", "modelplacement", f"{namespace}.gone", check=False).returncode != 0
    models = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"]
    assert all(m["id"] != f"{namespace}/gone" for m in models)
    wait_for(
        lambda: ((node.profile() or {}).get("status") or {}).get("residentBytes") == 0,
        30,
        what="memory freed on the worker",
    )


def test_cordon_migrates_models_without_failed_requests_and_reports_the_drain(
    namespace: str, operator: Process, gpu_nodes: NodePool, router: str, models_root: Path
) -> None:
    gpu_nodes.add("gpu-move-a", "64MiB")
    apply(llm("mover", models_root / "tiny-llama"), namespace)
    first = wait_for(lambda: phase(namespace, "mover", "Ready"), 120, what="Ready")["node"]
    gpu_nodes.add("gpu-move-b", "64MiB")
    outcomes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            outcomes.append(complete(router, f"{namespace}/mover", "Move along", 8).status_code)

    worker = threading.Thread(target=client)
    worker.start()
    kubectl("cordon", first)
    try:
        moved = wait_for(
            lambda: (s := phase(namespace, "mover", "Ready")) and s["node"] != first and s,
            120,
            what="migrated",
        )
        assert moved["node"] in {"gpu-move-a", "gpu-move-b"} - {first}
        events = wait_for_node_event(first, "Drained", 60)
        assert "moved every model off" in events
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=120)
        kubectl("uncordon", first, check=False)
    assert outcomes and all(code == 200 for code in outcomes), collections.Counter(outcomes)
