"""When a worker tries again a placement it refused."""

from __future__ import annotations

from residency_worker.agent import _Failure
from residency_worker.engine.types import ObservedDemand
from residency_worker.status_wire import DEMAND_REPORT_SECONDS, demand_report_due, demand_wire


def test_a_refusal_for_room_is_retried_once_room_frees() -> None:
    failure = _Failure(3, "PlacementDoesNotFit", "no room", 1000, 4000)
    assert not failure.retry_now(1000, 4000)  # nothing changed: a retry would read the weights for nothing
    assert not failure.retry_now(1500, 4000)  # others took more
    assert failure.retry_now(900, 4000)  # another model shrank or left
    assert failure.retry_now(1000, 5000)  # the node's budget grew


def test_other_failures_wait_for_a_new_spec() -> None:
    failure = _Failure(3, "WeightsCorrupt", "bad shard", 1000, 4000)
    assert not failure.retry_now(0, 10**9)


def test_demand_is_reported_when_it_starts_stops_or_moves_and_not_more_often() -> None:
    """Each status write wakes the planner: a demand is written when there was none, when traffic starts
    or stops (at once), and otherwise only when it moved by a fifth, at most every 10 s."""

    def wire(decode: float, prompt: float = 0.0) -> dict[str, object]:
        return demand_wire(ObservedDemand(decode, prompt, 7 if decode else None, 60.0, 120.0))

    assert wire(12.34567) == {
        "decodeTokensPerSecond": 12.346,
        "promptTokensPerSecond": 0.0,
        "typicalPromptTokens": 7,
        "windowSeconds": 60.0,
    }
    assert demand_report_due(None, wire(0.0), None)
    assert demand_report_due(wire(0.0), wire(5.0), 0.5)  # traffic starts: at once
    assert demand_report_due(wire(5.0), wire(0.0), 0.5)  # and stops
    later = DEMAND_REPORT_SECONDS + 1
    assert not demand_report_due(wire(10.0), wire(30.0), DEMAND_REPORT_SECONDS - 1)  # too soon
    assert demand_report_due(wire(10.0), wire(12.5), later)  # moved by a quarter
    assert not demand_report_due(wire(10.0), wire(11.0), later)  # by a tenth: noise
    assert demand_report_due(wire(10.0, 100.0), wire(10.0, 150.0), later)  # prompts count too
    assert not demand_report_due(wire(0.2), wire(0.35), later)  # tiny rates: under a fifth of 1 tok/s
    # a model that has just (re)started here counts an empty window: it may raise the last report (moved
    # here, or resumed, with the traffic it had), never lower it
    assert not demand_report_due(wire(10.0), wire(0.0), later, young=True)
    assert not demand_report_due(wire(10.0, 50.0), wire(20.0, 5.0), later, young=True)
    assert demand_report_due(wire(10.0), wire(20.0), later, young=True)
    assert demand_report_due(None, wire(0.0), None, young=True)


def test_every_operation_names_every_field() -> None:
    """A status is merge-patched: an operation that left a field out would keep the previous one's value
    (a preemption showing the bytes of the resume before it), and the operator would announce it again on
    every round because the copies never compare equal."""
    from residency_worker.engine.types import PreemptReport, ResumeReport, TransferTiming
    from residency_worker.status_wire import operation_wire

    def timing(moved_bytes: int) -> TransferTiming:
        return TransferTiming.of(
            "weights", "host_to_device", moved_bytes, 0.01, path="pinned", copies=1, streams=1, emulated=True
        )

    resume = operation_wire("resume", 0.02, "gpu-a", 0.0, ResumeReport("m", timing(4096), timing(0), 1, 0.02))
    preempt = operation_wire("preempt", 0.01, "gpu-a", 0.6, PreemptReport("m", timing(0), 0, 1024, 0.01))
    load = operation_wire("load", 0.5, "gpu-a", None, None)
    assert set(resume) == set(preempt) == set(load)
    assert all(value is not None for op in (resume, preempt, load) for value in op.values())
    assert (resume["action"], resume["movedBytes"], resume["requests"]) == ("Resume", 4096, 1)
    assert (preempt["action"], preempt["movedBytes"], preempt["fromFraction"]) == ("Preempt", 0, 0.6)
