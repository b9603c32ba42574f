"""The operator's pure translation: cluster objects → planner inputs → placements and model status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import LLAMA_CONFIG, MakeDir
from residency.names import placement_name
from residency_operator.inputs import planner_inputs
from residency_operator.placements import desired_placements, placement_needs_update, write_phase
from residency_operator.planner import plan
from residency_operator.state import (
    NODE_LABEL,
    WAITING_ANNOTATION,
    WAKE_ANNOTATION,
    ClusterState,
    OperatorKnobs,
    node_accepts,
    waiting_requests,
)
from residency_operator.verdicts import model_verdict

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def llm(name: str, path: Path, namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
        "spec": {"source": {"path": str(path)}, "maxSequenceLength": 16, "maxBatchSize": 1, **spec},
    }


def profile(node: str, gpu_bytes: int, heartbeat: datetime = NOW) -> dict[str, Any]:
    return {
        "metadata": {"name": node},
        "spec": {
            "nodeName": node,
            "gpuType": "emulated-cpu",
            "gpuMemoryBytes": gpu_bytes,
            "hostMemoryBytes": 10**9,
            "hostToDeviceGbps": 10.0,
            "hbmGbps": 100.0,
            "emulated": True,
        },
        "status": {"heartbeatTime": stamp(heartbeat)},
    }


def node(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": spec,
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def knobs(root: Path) -> OperatorKnobs:
    return OperatorKnobs(allowed_model_roots=[root], workspace_bytes=1024, heartbeat_grace_seconds=30)


def run(state: ClusterState, root: Path) -> tuple[Any, Any, dict[str, dict[str, Any]]]:
    inputs = planner_inputs(state, NOW, knobs(root))
    result = plan(inputs.demands, inputs.nodes, inputs.current, inputs.profiles, 0.0)
    return inputs, result, desired_placements(result, inputs)


def loaded(manifest: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {
        **manifest,
        "metadata": {**manifest["metadata"], "generation": 1},
        "status": {
            "state": "Loaded",
            "residentFraction": manifest["spec"]["residentFraction"],
            "endpoint": "http://127.0.0.1:9000/v1",
            **status,
        },
    }


def test_node_flags() -> None:
    assert node_accepts(node("a")) == (True, False, False)
    assert node_accepts(node("a", unschedulable=True))[1]
    tainted = node("a", taints=[{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}])
    assert node_accepts(tainted)[2]
    assert node_accepts(None) == (False, False, False)
    for status, ready in (("True", True), ("Unknown", True), ("False", False)):
        condition = {"type": "Ready", "status": status}
        assert node_accepts({**node("a"), "status": {"conditions": [condition]}})[0] is ready


def test_no_profiles_means_no_nodes(tmp_path: Path, make_model_dir: MakeDir) -> None:
    state = ClusterState([llm("a", make_model_dir("a"))], [], [], [])
    inputs, result, desired = run(state, tmp_path)
    assert desired == {}
    verdict = model_verdict("team-a/a", inputs, result, None)
    assert (verdict.phase, verdict.reason) == ("Pending", "NoNodes")


def test_invalid_model_is_failed_and_not_placed(tmp_path: Path) -> None:
    state = ClusterState([llm("ghost", tmp_path / "ghost")], [profile("n1", 10**7)], [node("n1")], [])
    inputs, result, desired = run(state, tmp_path)
    assert desired == {}
    assert model_verdict("team-a/ghost", inputs, result, None).reason == "ModelNotFound"


def test_placement_lands_on_a_ready_uncordoned_node(tmp_path: Path, make_model_dir: MakeDir) -> None:
    state = ClusterState(
        [llm("a", make_model_dir("a", params=20_000))],
        [profile("n1", 10**7), profile("n2", 10**7)],
        [node("n1", unschedulable=True), node("n2")],
        [],
    )
    inputs, result, desired = run(state, tmp_path)
    manifest = desired[placement_name("team-a/a")]
    assert manifest["spec"]["nodeName"] == "n2"
    assert manifest["metadata"]["labels"][NODE_LABEL] == "n2"
    assert manifest["spec"]["desiredState"] == "Loaded" and manifest["spec"]["residentFraction"] == 1.0
    verdict = model_verdict("team-a/a", inputs, result, None)
    assert verdict.phase == "Scheduled"
    assert dict(verdict.extra)["node"] == "n2"


def test_the_placement_carries_the_models_slo_for_the_worker_to_pace_to(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    """The worker paces a model to its SLO while a neighbour has requests waiting: the placement says it."""
    state = ClusterState(
        [
            llm("a", make_model_dir("a", params=20_000), slo={"minDecodeTokensPerSecond": 12}),
            llm("b", make_model_dir("b", params=20_000)),
        ],
        [profile("n1", 10**7)],
        [node("n1")],
        [],
    )
    _, _, desired = run(state, tmp_path)
    assert desired[placement_name("team-a/a")]["spec"]["minDecodeTokensPerSecond"] == 12.0
    assert "minDecodeTokensPerSecond" not in desired[placement_name("team-a/b")]["spec"]


def test_stale_heartbeat_node_takes_no_work(tmp_path: Path, make_model_dir: MakeDir) -> None:
    state = ClusterState(
        [llm("a", make_model_dir("a"))],
        [profile("n1", 10**7, heartbeat=NOW - timedelta(minutes=5))],
        [node("n1")],
        [],
    )
    inputs, result, desired = run(state, tmp_path)
    assert desired == {}
    verdict = model_verdict("team-a/a", inputs, result, None)
    assert (verdict.phase, verdict.reason) == ("Pending", "NoNodes")
    assert "1 registered" in verdict.message


def test_loaded_placement_makes_the_model_ready_and_replanning_is_stable(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    models = [llm("a", make_model_dir("a", params=20_000), slo={"minDecodeTokensPerSecond": 1})]
    state = ClusterState(models, [profile("n1", 10**7)], [node("n1")], [])
    _, _, desired = run(state, tmp_path)
    existing = [
        loaded(m, timings={"loadSeconds": 0.5, "weightBytes": 40_000}, observedDecodeTokensPerSecond=50.0)
        for m in desired.values()
    ]
    state = ClusterState(models, [profile("n1", 10**7)], [node("n1")], existing)
    inputs, result, again = run(state, tmp_path)
    assert not any(placement_needs_update(e, again[e["metadata"]["name"]]) for e in existing)
    verdict = model_verdict("team-a/a", inputs, result, existing[0])
    extra = dict(verdict.extra)
    assert (verdict.phase, extra["residentPercent"], extra["endpoint"]) == (
        "Ready",
        100,
        "http://127.0.0.1:9000/v1",
    )
    assert extra["timings"]["loadSeconds"] == 0.5
    assert {c[0]: c[1] for c in verdict.conditions}["Degraded"] == "False"


def test_memory_pressure_gives_partial_residency(tmp_path: Path, make_model_dir: MakeDir) -> None:
    # two models of 400 kB (bf16) on a node of 700 kB: both cannot be fully resident (8 layers of 50 kB:
    # a partial placement also holds two staging buffers and up to one layer more than its fraction)
    config = {**LLAMA_CONFIG, "num_hidden_layers": 8}
    models = [
        llm(n, make_model_dir(n, config=config, params=200_000), offload={"maxFraction": 0.75})
        for n in ("a", "b")
    ]
    state = ClusterState(models, [profile("n1", 700_000)], [node("n1")], [])
    _, result, desired = run(state, tmp_path)
    fractions = sorted(m["spec"]["residentFraction"] for m in desired.values())
    assert len(fractions) == 2 and fractions[0] < 1.0
    total = sum(p.gpu_bytes for p in result.placements.values())
    assert total <= 700_000


def test_preempted_placement_reports_who_displaced_it(tmp_path: Path, make_model_dir: MakeDir) -> None:
    low = llm("low", make_model_dir("low", params=200_000), priority=1, offload={"maxFraction": 0.0})
    state = ClusterState([low], [profile("n1", 500_000)], [node("n1")], [])
    _, _, desired = run(state, tmp_path)
    existing = [loaded(m, timings={"kvBytes": 128}) for m in desired.values()]
    high = llm("high", make_model_dir("high", params=200_000), priority=100, offload={"maxFraction": 0.0})
    state = ClusterState([low, high], [profile("n1", 500_000)], [node("n1")], existing)
    inputs, result, desired = run(state, tmp_path)
    assert desired[placement_name("team-a/high")]["spec"]["desiredState"] == "Loaded"
    low_placement = desired[placement_name("team-a/low")]
    assert low_placement["spec"]["desiredState"] == "Preempted"
    assert "team-a/high" in low_placement["spec"]["reason"]
    verdict = model_verdict("team-a/low", inputs, result, low_placement)
    assert verdict.phase == "Preempted" and "team-a/high" in verdict.message


def test_metrics_expose_waiting_capacity_and_reclaimable_bytes(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    from residency_operator.capacity import (
        CapacityConfig,
        capacity_pod,
        full_residency_gpu_bytes,
        needs_capacity,
        waiting_verdict,
    )
    from residency_operator.metrics import OperatorMetrics

    models = [
        llm("small", make_model_dir("small", params=20_000), priority=5),
        llm("huge", make_model_dir("huge", params=2_000_000), offload={"maxFraction": 0.0}),
    ]
    state = ClusterState(models, [profile("n1", 2_000_000)], [node("n1")], [])
    inputs, result, _ = run(state, tmp_path)
    unschedulable = {u.model: u for u in result.unschedulable}
    assert needs_capacity(unschedulable["team-a/huge"].reason)
    info = inputs.infos["team-a/huge"]
    gpu_bytes = full_residency_gpu_bytes(info, 16, 1)
    assert gpu_bytes > 4_000_000
    pod = capacity_pod(inputs.bodies["team-a/huge"], gpu_bytes, info.weight_bytes, CapacityConfig())
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-huge"
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    verdict = waiting_verdict(
        model_verdict("team-a/huge", inputs, result, None), pod, gpu_bytes, CapacityConfig()
    )
    assert verdict.phase == "WaitingForCapacity" and "capacity-huge" in verdict.message
    metrics = OperatorMetrics()
    metrics.observe_round(
        0.01, {"Ready": 1, "WaitingForCapacity": 1}, {"team-a/huge": (pod, gpu_bytes)}, result, inputs
    )
    sample = metrics.registry.get_sample_value
    assert sample("residency_models_waiting_for_capacity") == 1
    assert sample("residency_unplaceable_gpu_bytes") == gpu_bytes
    small_bytes = result.placements["team-a/small"].gpu_bytes
    assert sample("residency_node_reclaimable_gpu_bytes", {"node": "n1"}) == small_bytes
    assert sample("residency_models", {"phase": "WaitingForCapacity"}) == 1


def test_a_refusal_for_room_shows_pending_and_other_load_failures_failed(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    models = [llm("a", make_model_dir("a", params=20_000))]
    state = ClusterState(models, [profile("n1", 10**7)], [node("n1")], [])
    _, _, desired = run(state, tmp_path)
    (manifest,) = desired.values()
    for reason, phase in (("PlacementDoesNotFit", "Pending"), ("WeightsCorrupt", "Failed")):
        failed = {
            **manifest,
            "metadata": {**manifest["metadata"], "generation": 1},
            "status": {"state": "Failed", "reason": reason, "message": "the worker said why"},
        }
        state = ClusterState(models, [profile("n1", 10**7)], [node("n1")], [failed])
        inputs, result, _ = run(state, tmp_path)
        verdict = model_verdict("team-a/a", inputs, result, failed)
        assert (verdict.phase, verdict.reason) == (phase, reason)
        assert verdict.message.startswith("the worker said why")
        assert ("waiting for room on n1" in verdict.message) is (phase == "Pending")


def test_writes_that_free_memory_go_first() -> None:
    def placement(node_name: str, fraction: float, state: str = "Loaded", **spec: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": "p"},
            "spec": {
                "nodeName": node_name,
                "residentFraction": fraction,
                "desiredState": state,
                "executionMode": "stream",
                "sourcePath": "/m",
                "maxSequenceLength": 16,
                **spec,
            },
        }

    have = placement("n1", 0.8)
    assert write_phase(None, have) == "grow"
    assert write_phase(have, placement("n1", 0.5)) == "shrink"
    assert write_phase(have, placement("n1", 0.8, "Preempted")) == "shrink"
    assert write_phase(have, placement("n1", 0.8, "Idle")) == "shrink"
    assert write_phase(have, placement("n2", 0.5)) == "move"
    assert write_phase(have, placement("n1", 1.0)) == "grow"
    assert write_phase(placement("n1", 0.8, "Preempted"), placement("n1", 0.8)) == "grow"  # a resume
    # a lower fraction that reloads (another KV size) or adds staging buffers takes memory too
    assert write_phase(have, placement("n1", 0.5, maxSequenceLength=4096)) == "grow"
    assert write_phase(placement("n1", 1.0, executionMode="cpu"), placement("n1", 0.9)) == "grow"


def test_an_idle_model_gives_way_to_one_the_router_holds_requests_for(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    # two models of 400 kB on a node of 500 kB: one at a time
    old = llm("old", make_model_dir("old", params=200_000), offload={"maxFraction": 0.0})
    state = ClusterState([old], [profile("n1", 500_000)], [node("n1")], [])
    _, _, desired = run(state, tmp_path)
    quiet = stamp(NOW - timedelta(seconds=60))
    idle = [loaded(m, lastActiveTime=quiet, queuedRequests=0) for m in desired.values()]
    new = llm("new", make_model_dir("new", params=200_000), offload={"maxFraction": 0.0})
    # nobody asked for the new one: the old one stays
    inputs, result, desired = run(
        ClusterState([old, new], [profile("n1", 500_000)], [node("n1")], idle), tmp_path
    )
    assert set(result.placements) == {"team-a/old"}
    assert [c.state for c in inputs.current] == ["idle"]
    # the router holds a request for it (wake annotation 5 s ago): the idle one gives way, weights kept
    asked = {
        **new,
        "metadata": {**new["metadata"], "annotations": {WAKE_ANNOTATION: stamp(NOW - timedelta(seconds=5))}},
    }
    inputs, result, desired = run(
        ClusterState([old, asked], [profile("n1", 500_000)], [node("n1")], idle), tmp_path
    )
    assert [d.waiting_requests for d in inputs.demands] == [1, 0]
    assert set(result.placements) == {"team-a/new"}
    old_placement = desired[placement_name("team-a/old")]
    assert old_placement["spec"]["desiredState"] == "Preempted"
    verdict = model_verdict("team-a/old", inputs, result, old_placement)
    assert verdict.phase == "Preempted" and "team-a/new" in verdict.message
    # a request 40 s ago is no longer waiting; a busy (or recently busy) old model never gives way
    stale = {
        **new,
        "metadata": {**new["metadata"], "annotations": {WAKE_ANNOTATION: stamp(NOW - timedelta(seconds=40))}},
    }
    _, result, _ = run(ClusterState([old, stale], [profile("n1", 500_000)], [node("n1")], idle), tmp_path)
    assert set(result.placements) == {"team-a/old"}
    for busy in (
        [loaded(m, lastActiveTime=stamp(NOW - timedelta(seconds=3)), queuedRequests=0) for m in idle],
        [loaded(m, lastActiveTime=quiet, queuedRequests=2) for m in idle],
    ):
        inputs, result, _ = run(
            ClusterState([old, asked], [profile("n1", 500_000)], [node("n1")], busy), tmp_path
        )
        assert [c.state for c in inputs.current] == ["loaded"]
        assert set(result.placements) == {"team-a/old"}


def test_a_swap_in_holds_while_the_worker_carries_it_out_and_a_served_request_stops_waiting(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    old = llm("old", make_model_dir("old", params=200_000), offload={"maxFraction": 0.0})
    new = llm("new", make_model_dir("new", params=200_000), offload={"maxFraction": 0.0})
    nodes = ([profile("n1", 500_000)], [node("n1")])
    _, _, desired = run(ClusterState([old], *nodes, []), tmp_path)
    quiet = stamp(NOW - timedelta(seconds=60))
    idle = [loaded(m, lastActiveTime=quiet, queuedRequests=0) for m in desired.values()]

    def asked(seconds_ago: float) -> dict[str, Any]:
        when = stamp(NOW - timedelta(seconds=seconds_ago))
        return {**new, "metadata": {**new["metadata"], "annotations": {WAKE_ANNOTATION: when}}}

    _, _, swapped = run(ClusterState([old, asked(5)], *nodes, idle), tmp_path)
    # the next round comes before the worker acted: the old one still holds its memory, the new one
    # has not loaded yet; the decision stands (it flipped back and forth before)
    in_flight = [
        {**idle[0], "spec": swapped[placement_name("team-a/old")]["spec"]},
        {**swapped[placement_name("team-a/new")], "status": {"state": "Pending"}},
    ]
    _, result, _ = run(ClusterState([old, asked(4)], *nodes, in_flight), tmp_path)
    assert set(result.placements) == {"team-a/new"}
    # the new one served its request (active after the wake): no longer waiting; and the old one, asked
    # for now, is held by the router (a wake newer than its last activity)
    served = stamp(NOW - timedelta(seconds=2))
    done = [
        {**swapped[placement_name("team-a/old")], "status": {"state": "Preempted", "lastActiveTime": quiet}},
        loaded(swapped[placement_name("team-a/new")], lastActiveTime=served, queuedRequests=0),
    ]
    inputs, result, _ = run(ClusterState([old, asked(8)], *nodes, done), tmp_path)
    assert {d.name: d.waiting_requests for d in inputs.demands} == {"team-a/new": 0, "team-a/old": 0}
    assert set(result.placements) == {"team-a/new"}
    old_asked = {**old, "metadata": {**old["metadata"], "annotations": {WAKE_ANNOTATION: stamp(NOW)}}}
    inputs, result, _ = run(ClusterState([old_asked, asked(8)], *nodes, done), tmp_path)
    assert {d.name: d.waiting_requests for d in inputs.demands} == {"team-a/new": 0, "team-a/old": 1}
    assert set(result.placements) == {"team-a/new"}, "the new one was busy 2 s ago: not idle yet"


def test_a_model_that_is_not_running_waits_with_as_many_requests_as_the_router_holds() -> None:
    """The router tells how many requests it holds with each wake; the planner values a model that is not
    running by them (at its SLO, at most a full batch). A count that is not a whole number is one request
    (the wake itself); an absurd one is capped."""

    def body(**annotations: str) -> dict[str, Any]:
        return {"metadata": {"name": "m", "namespace": "team-a", "annotations": annotations}}

    woken = stamp(NOW - timedelta(seconds=3))
    assert waiting_requests(body(**{WAKE_ANNOTATION: woken, WAITING_ANNOTATION: "5"}), None, NOW) == 5
    for odd in ("", "-3", "2.5", "many", "0", "²"):
        assert waiting_requests(body(**{WAKE_ANNOTATION: woken, WAITING_ANNOTATION: odd}), None, NOW) == 1
    assert (
        waiting_requests(body(**{WAKE_ANNOTATION: woken, WAITING_ANNOTATION: "9" * 30}), None, NOW) == 10_000
    )
    # the count goes stale with its wake: none waits 40 s after it
    stale = stamp(NOW - timedelta(seconds=40))
    assert waiting_requests(body(**{WAKE_ANNOTATION: stale, WAITING_ANNOTATION: "5"}), None, NOW) == 0
    assert waiting_requests(body(**{WAITING_ANNOTATION: "5"}), None, NOW) == 0


def test_a_wake_annotation_that_is_not_a_time_is_ignored(tmp_path: Path, make_model_dir: MakeDir) -> None:
    models = [
        {
            **llm(name, make_model_dir(name, params=20_000)),
            "metadata": {
                **llm(name, tmp_path)["metadata"],
                "annotations": {WAKE_ANNOTATION: value},
            },
        }
        for name, value in (("bad", "yesterday"), ("naive", "2026-11-27T11:59:58"), ("list", "[1]"))
    ]
    inputs, result, _ = run(ClusterState(models, [profile("n1", 10**7)], [node("n1")], []), tmp_path)
    # a time without a zone counts as UTC (2 s before NOW: waiting); the others count as no request
    assert {d.name: d.waiting_requests for d in inputs.demands} == {
        "team-a/bad": 0,
        "team-a/list": 0,
        "team-a/naive": 1,
    }
    assert set(result.placements) == {"team-a/bad", "team-a/list", "team-a/naive"}


def test_a_model_still_loading_keeps_waiting_past_the_window() -> None:
    body = {"metadata": {"annotations": {WAKE_ANNOTATION: stamp(NOW - timedelta(seconds=45))}}}
    loading = {"spec": {"desiredState": "Loaded"}, "status": {"state": "Loading"}}
    assert waiting_requests(body, loading, NOW) == 1
    assert waiting_requests(body, None, NOW) == 0, "no placement: the 30 s window applies"
    served = {"spec": {"desiredState": "Loaded"}, "status": {"state": "Loaded", "queuedRequests": 3}}
    assert waiting_requests(body, served, NOW) == 3, "running: its engine queue"


def test_reported_traffic_becomes_the_planner_s_demand(tmp_path: Path, make_model_dir: MakeDir) -> None:
    """status.demand of a running model is its demand; once any model reports one, a model without a
    report counts as having no traffic (an unknown demand would be valued as unbounded and outbid every
    measured one); a report of a model no longer running, or a malformed one, is not trusted."""
    models = [llm(n, make_model_dir(n, params=20_000)) for n in ("a", "b", "c")]
    state = ClusterState(models, [profile("n1", 10**8)], [node("n1")], [])
    _, _, desired = run(state, tmp_path)
    placements = {m["spec"]["model"]["name"]: m for m in desired.values()}
    assert set(placements) == {"a", "b", "c"}

    def demands(existing: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = planner_inputs(
            ClusterState(models, [profile("n1", 10**8)], [node("n1")], existing), NOW, knobs(tmp_path)
        )
        return {d.name: d for d in inputs.demands}

    # nobody reports: demand stays unknown for all (a cold start plans as before)
    cold = demands([loaded(p) for p in placements.values()])
    assert all(d.demand_decode_tokens_per_second is None for d in cold.values())

    seen = {
        "decodeTokensPerSecond": 12.5,
        "promptTokensPerSecond": 40.0,
        "typicalPromptTokens": 8,
        "windowSeconds": 60.0,
    }
    preempted = loaded(placements["c"], demand=seen)
    preempted["spec"] = {**preempted["spec"], "desiredState": "Preempted"}
    warm = demands([loaded(placements["a"], demand=seen), loaded(placements["b"]), preempted])
    a, b, c = warm["team-a/a"], warm["team-a/b"], warm["team-a/c"]
    assert (a.demand_decode_tokens_per_second, a.prompt_tokens_per_second, a.typical_prompt_tokens) == (
        12.5,
        40.0,
        8,
    )
    assert b.demand_decode_tokens_per_second == 0.0 and b.prompt_tokens_per_second is None
    assert c.demand_decode_tokens_per_second == 0.0  # its report is from before it was preempted
    # a model not running that the router holds a request for: that request at its SLO
    asked = {**models[2], "metadata": {**models[2]["metadata"], "annotations": {WAKE_ANNOTATION: stamp(NOW)}}}
    slo = {**asked, "spec": {**asked["spec"], "slo": {"minDecodeTokensPerSecond": 4}}}
    inputs = planner_inputs(
        ClusterState(
            [models[0], models[1], slo],
            [profile("n1", 10**8)],
            [node("n1")],
            [loaded(placements["a"], demand=seen), preempted],
        ),
        NOW,
        knobs(tmp_path),
    )
    woken = {d.name: d for d in inputs.demands}["team-a/c"]
    assert (woken.waiting_requests, woken.demand_decode_tokens_per_second) == (1, 4.0)

    # moving or reloading (state Loading, still desired Loaded) keeps the last report
    moving = loaded(placements["a"], demand=seen)
    moving["status"] = {**moving["status"], "state": "Loading"}
    assert demands([moving])["team-a/a"].demand_decode_tokens_per_second == 12.5

    for broken in (
        {"decodeTokensPerSecond": -1},
        {"decodeTokensPerSecond": "lots"},
        {"promptTokensPerSecond": 3},
    ):
        odd = demands([loaded(placements["a"], demand=broken), loaded(placements["b"], demand=seen)])
        assert odd["team-a/a"].demand_decode_tokens_per_second == 0.0  # not trusted: as if none
        assert odd["team-a/b"].demand_decode_tokens_per_second == 12.5
        alone = demands([loaded(placements["a"], demand=broken)])
        assert alone["team-a/a"].demand_decode_tokens_per_second is None

    # the planner sizes GPU time by it: the reported model keeps the GPU busy, the others do not
    existing = [loaded(placements["a"], demand=seen), loaded(placements["b"]), loaded(placements["c"])]
    _, result, _ = run(ClusterState(models, [profile("n1", 10**8)], [node("n1")], existing), tmp_path)
    busy = {name: p.gpu_busy_fraction for name, p in result.placements.items()}
    assert busy["team-a/a"] > 0 and busy["team-a/b"] == busy["team-a/c"] == 0


def test_a_model_scaled_to_zero_keeps_its_host_memory_until_asked_for_again(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    # spec.idle releases the GPU, and the worker keeps the weights pinned in host memory for a fast resume:
    # the plan must not hand that host memory to another model's offloaded weights
    sleepy = llm(
        "sleepy",
        make_model_dir("sleepy", params=200_000),
        idle={"afterSeconds": 60},
        offload={"maxFraction": 0.0},
    )
    host_bytes = 700_000
    # GPU memory for a quarter of "big" below and the staging buffers its offloaded layers stream through
    tight = {
        **profile("n1", 700_000),
        "spec": {**profile("n1", 700_000)["spec"], "hostMemoryBytes": host_bytes},
    }
    _, _, desired = run(ClusterState([sleepy], [tight], [node("n1")], []), tmp_path)
    quiet = [
        loaded(m, lastActiveTime=stamp(NOW - timedelta(seconds=120)), timings={"kvBytes": 128})
        for m in desired.values()
    ]
    # 800 kB that may offload 75 %: fits only by putting most of its weights in host memory
    config = {**LLAMA_CONFIG, "num_hidden_layers": 8}
    big = llm("big", make_model_dir("big", config=config, params=400_000), offload={"maxFraction": 0.75})
    inputs, result, desired = run(ClusterState([sleepy, big], [tight], [node("n1")], quiet), tmp_path)
    assert set(inputs.idle) == {"team-a/sleepy"}
    assert desired[placement_name("team-a/sleepy")]["spec"]["desiredState"] == "Idle"
    cache_bytes = inputs.infos["team-a/sleepy"].weight_bytes + 128
    assert [n.reserved_host_bytes for n in inputs.nodes] == [cache_bytes]
    assert "team-a/big" not in result.placements
    assert "host memory" in result.unschedulable[0].message
    # without the cache the host memory would have been enough
    free = planner_inputs(ClusterState([big], [tight], [node("n1")], []), NOW, knobs(tmp_path))
    assert "team-a/big" in plan(free.demands, free.nodes, free.current, free.profiles, 0.0).placements
    # a request for it wakes it: it is planned again, as a cached model, and nothing is set aside
    woken = {
        **sleepy,
        "metadata": {
            **sleepy["metadata"],
            "annotations": {WAKE_ANNOTATION: stamp(NOW - timedelta(seconds=1))},
        },
    }
    idle_now = [
        {
            **q,
            "spec": desired[placement_name("team-a/sleepy")]["spec"],
            "status": {**q["status"], "state": "Idle"},
        }
        for q in quiet
    ]
    inputs, result, _ = run(ClusterState([woken, big], [tight], [node("n1")], idle_now), tmp_path)
    assert inputs.idle == {} and [n.reserved_host_bytes for n in inputs.nodes] == [0]
    assert [(c.model, c.state) for c in inputs.current] == [("team-a/sleepy", "preempted")]
    assert "team-a/sleepy" in result.placements


def test_a_sensitivity_profile_applies_only_to_models_of_its_namespace(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    """Two tenants serve the same directory; a profile one of them measured (or wrote) shapes only
    its own model's placement."""
    shared = make_model_dir("shared", params=20_000)
    models = [llm("chat", shared, namespace="team-a"), llm("chat", shared, namespace="team-b")]
    measured = {
        "metadata": {"name": "chat-l4", "namespace": "team-b"},
        "spec": {
            "modelPath": str(shared),
            "gpuType": "emulated-cpu",
            "points": [
                {
                    "residentFraction": 1.0,
                    "decodeTokensPerSecond": 0.01,
                    "executionMode": "stream",
                    "sequenceLength": 512,
                }
            ],
        },
    }
    state = ClusterState(models, [profile("gpu-1", 10**9)], [node("gpu-1")], [], [measured])
    inputs = planner_inputs(state, NOW, knobs(tmp_path))
    assert {p.model for p in inputs.profiles} == {"team-b/chat"}


@pytest.mark.parametrize("layer_error", [-0.03, 0.02])
def test_a_worker_s_whole_layer_residency_off_the_planner_grid_is_no_change(
    tmp_path: Path, make_model_dir: MakeDir, layer_error: float
) -> None:
    # The worker keeps whole layers, so it reports a fraction near, not at, the one placed. The next round
    # must neither "promote" to the fraction already asked for nor write the reported fraction back.
    config = {**LLAMA_CONFIG, "num_hidden_layers": 8}
    models = [
        llm(n, make_model_dir(n, config=config, params=200_000), offload={"maxFraction": 0.75})
        for n in ("a", "b")
    ]
    state = ClusterState(models, [profile("n1", 700_000)], [node("n1")], [])
    _, _, desired = run(state, tmp_path)
    existing = [
        loaded(m, residentFraction=round(m["spec"]["residentFraction"] + layer_error, 4))
        if m["spec"]["residentFraction"] < 1.0
        else loaded(m)
        for m in desired.values()
    ]
    assert any(e["status"]["residentFraction"] != e["spec"]["residentFraction"] for e in existing)
    state = ClusterState(models, [profile("n1", 700_000)], [node("n1")], existing)
    _, result, again = run(state, tmp_path)
    assert result.actions == ()
    assert {k: m["spec"] for k, m in again.items()} == {e["metadata"]["name"]: e["spec"] for e in existing}


def test_a_loaded_model_whose_last_change_failed_is_ready_and_degraded(
    tmp_path: Path, make_model_dir: MakeDir
) -> None:
    state = ClusterState(
        [llm("a", make_model_dir("a", params=20_000))], [profile("n1", 10**7)], [node("n1")], []
    )
    _, _, desired = run(state, tmp_path)
    manifest = desired[placement_name("team-a/a")]
    failed = loaded(
        manifest,
        residentFraction=0.4,
        reason="PlacementDoesNotFit",
        message="could not change to 100% resident (stream): no room; still serving at 40%",
    )
    state = ClusterState(state.models, state.node_profiles, state.nodes, [failed])
    inputs, result, _ = run(state, tmp_path)
    verdict = model_verdict("team-a/a", inputs, result, failed)
    assert verdict.phase == "Ready"
    conditions = {c[0]: c[1:] for c in verdict.conditions}
    assert conditions["Degraded"][:2] == ("True", "PlacementDoesNotFit")
    assert "still serving at 40%" in conditions["Degraded"][2]
    assert dict(verdict.extra)["residentPercent"] == 40
