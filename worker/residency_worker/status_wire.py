"""The node agent's status in the API's shapes: measured timings, one lifecycle operation, observed demand,
and when a changed demand is worth a status write (each one wakes the planner)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from residency_worker.engine.types import (
    LoadReport,
    ModelTimings,
    ObservedDemand,
    PreemptReport,
    ResidencyReport,
    ResumeReport,
    TransferTiming,
)

DEMAND_REPORT_SECONDS = 10.0  # a changed demand is reported at most this often (unless it starts or stops)
DEMAND_CHANGE_SHARE = 0.2  # ...and only when it moved by this share of what was last reported


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def timings_wire(timings: ModelTimings) -> dict[str, Any]:
    """The engine's measured timings in the API's Timings shape."""
    wire: dict[str, Any] = {"weightBytes": timings.weight_bytes, "emulated": timings.emulated}
    if timings.load_seconds is not None:
        wire["loadSeconds"] = round(timings.load_seconds, 6)
    if timings.reload_seconds is not None:
        wire["reloadSeconds"] = round(timings.reload_seconds, 6)
    if timings.kv_save_seconds is not None:
        wire["kvTransferSeconds"] = round(timings.kv_save_seconds, 6)
    if timings.kv_save_seconds is not None or timings.kv_bytes:
        wire["kvBytes"] = timings.kv_bytes  # 0 is a measurement too: nothing was in flight
    transfer = timings.reload_transfer or timings.load_transfer
    if transfer is not None:
        # bytes, seconds and GB/s of one and the same measured weight transfer
        wire["hostToDeviceBytes"] = transfer.moved_bytes
        wire["hostToDeviceSeconds"] = round(transfer.seconds, 9)
        wire["hostToDeviceGBps"] = round(transfer.gbps, 4)
        wire["transferPath"] = transfer.path
    elif timings.host_to_device_gbps is not None:
        wire["hostToDeviceGBps"] = round(timings.host_to_device_gbps, 4)
    return wire


def operation_wire(
    action: str, seconds: float, node: str, before: float | None, report: object
) -> dict[str, Any]:
    """One lifecycle operation in the API's Operation shape: what it moved and how long it took.

    Every key is always there (0 where nothing was moved): a status is merge-patched, so a key left out
    would keep the previous operation's value."""
    wire: dict[str, Any] = {
        "action": action.capitalize(),
        "seconds": round(seconds, 6),
        "node": node,
        "time": now_rfc3339(),
        "fromFraction": round(before or 0.0, 6),
        "toFraction": 0.0,
        "movedBytes": 0,
        "gbps": 0.0,
        "requests": 0,
    }
    transfer: TransferTiming | None = None
    if isinstance(report, LoadReport):
        wire["toFraction"] = round(report.residency.resident_fraction, 6)
        transfer = report.host_to_device
    elif isinstance(report, ResidencyReport):
        wire["toFraction"] = round(report.resident_fraction, 6)
    elif isinstance(report, PreemptReport):
        transfer = report.kv_save
        wire["requests"] = report.sequences_parked
    elif isinstance(report, ResumeReport):
        transfer = report.reload
        wire["requests"] = report.sequences_resumed
    if transfer is not None and transfer.moved_bytes:
        wire["movedBytes"] = transfer.moved_bytes
        wire["gbps"] = round(transfer.gbps, 4)
    return wire


def demand_wire(demand: ObservedDemand) -> dict[str, Any]:
    """The engine's observed demand in the API's ObservedDemand shape (a ``None`` field, merge-patched, is
    removed from the status)."""
    return {
        "decodeTokensPerSecond": round(demand.decode_tokens_per_second, 3),
        "promptTokensPerSecond": round(demand.prompt_tokens_per_second, 3),
        "typicalPromptTokens": demand.typical_prompt_tokens,
        "windowSeconds": round(demand.window_seconds, 3),
    }


def demand_report_due(
    reported: dict[str, Any] | None,
    observed: dict[str, Any],
    seconds_since_report: float | None,
    young: bool = False,
) -> bool:
    """Whether to write a newly observed demand: when none was reported, when traffic starts or stops,
    and otherwise when it moved by :data:`DEMAND_CHANGE_SHARE` at most every :data:`DEMAND_REPORT_SECONDS`
    (each status write wakes the planner; a noisy rate must not re-plan the cluster every second).

    ``young``: the model has served here for less than half the window, so its rate undercounts (after a
    move, resume or reload the window starts empty): it may raise what was reported, never lower it."""
    if not reported:
        return True
    before = float(reported.get("decodeTokensPerSecond") or 0.0)
    now = float(observed["decodeTokensPerSecond"])
    prompt_before = float(reported.get("promptTokensPerSecond") or 0.0)
    prompt_now = float(observed["promptTokensPerSecond"])
    if young and (now < before or prompt_now < prompt_before):
        return False
    if (before > 0) != (now > 0):
        return True
    if seconds_since_report is not None and seconds_since_report < DEMAND_REPORT_SECONDS:
        return False
    return abs(now - before) > DEMAND_CHANGE_SHARE * max(before, 1.0) or abs(
        prompt_now - prompt_before
    ) > DEMAND_CHANGE_SHARE * max(prompt_before, 1.0)
