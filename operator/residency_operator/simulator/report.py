"""Per-policy metrics of a simulation run, as a table, JSON and matplotlib plots (PNG)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from residency_operator.simulator.runtime import Counters, RequestOutcome


@dataclass(frozen=True, slots=True)
class PolicyReport:
    """What one policy achieved on one scenario."""

    policy: str
    scenario: str
    duration_seconds: float
    requests: int
    completed: int
    met_slo: int
    dropped: int
    unfinished: int
    goodput_tokens_per_second: float
    """Output tokens/s of requests that completed within both their TTFT and per-token SLOs."""
    throughput_tokens_per_second: float
    ttft_p50_seconds: float | None
    ttft_p99_seconds: float | None
    tpot_p50_seconds: float | None
    tpot_p99_seconds: float | None
    preemptions: int
    evictions: int
    demotions: int
    promotions: int
    loads: int
    migrations: int
    reload_seconds: float
    restarted_requests: int
    gpu_memory_utilisation: float
    plan_seconds_mean: float | None = None
    goodput_by_priority_tokens_per_second: dict[int, float] = field(default_factory=dict)
    """SLO-met goodput split by model priority (what a priority-respecting policy trades)."""
    slo_attainment_by_priority: dict[int, float] = field(default_factory=dict)
    """Share of each priority tier's requests that completed within their SLOs."""
    requests_by_priority: dict[int, int] = field(default_factory=dict)
    resumes: int = 0
    """Models brought back from host memory at link speed (``loads`` counts cold loads from storage)."""
    refused: int = 0
    """Requests the router's admission refused at once (429; counted in ``dropped`` too)."""


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.array(values), q)) if values else None


def summarise(
    policy: str,
    scenario: str,
    duration_seconds: float,
    outcomes: Sequence[RequestOutcome],
    counters: Counters,
    gpu_memory_utilisation: float,
    plan_seconds_mean: float | None = None,
    priorities: Mapping[str, int] | None = None,
) -> PolicyReport:
    """Reduce request outcomes and counters to one report (``priorities``: model name → priority)."""
    completed = [o for o in outcomes if o.completed]
    ttfts = [o.ttft_seconds for o in completed if o.ttft_seconds is not None]
    tpots = [o.tpot_seconds for o in completed if o.tpot_seconds is not None]
    good_tokens = sum(o.output_tokens for o in completed if o.met_slo)
    all_tokens = sum(o.output_tokens for o in completed)
    asked: dict[int, int] = {}
    met: dict[int, int] = {}
    for outcome in outcomes:
        tier = (priorities or {}).get(outcome.model, 0)
        asked[tier] = asked.get(tier, 0) + 1
        met[tier] = met.get(tier, 0) + int(outcome.met_slo)
    asked = {tier: asked[tier] for tier in sorted(asked, reverse=True)}
    attainment = {tier: met[tier] / count for tier, count in asked.items()}
    return PolicyReport(
        policy=policy,
        scenario=scenario,
        duration_seconds=duration_seconds,
        requests=len(outcomes),
        completed=len(completed),
        met_slo=sum(1 for o in completed if o.met_slo),
        dropped=sum(1 for o in outcomes if o.dropped),
        refused=sum(1 for o in outcomes if o.refused),
        unfinished=sum(1 for o in outcomes if not o.completed and not o.dropped),
        goodput_tokens_per_second=good_tokens / duration_seconds,
        throughput_tokens_per_second=all_tokens / duration_seconds,
        ttft_p50_seconds=_percentile(ttfts, 50),
        ttft_p99_seconds=_percentile(ttfts, 99),
        tpot_p50_seconds=_percentile(tpots, 50),
        tpot_p99_seconds=_percentile(tpots, 99),
        preemptions=counters.preemptions,
        evictions=counters.evictions,
        demotions=counters.demotions,
        promotions=counters.promotions,
        loads=counters.loads,
        migrations=counters.migrations,
        reload_seconds=counters.reload_seconds,
        restarted_requests=counters.restarted_requests,
        gpu_memory_utilisation=gpu_memory_utilisation,
        plan_seconds_mean=plan_seconds_mean,
        goodput_by_priority_tokens_per_second=_by_priority(completed, priorities or {}, duration_seconds),
        slo_attainment_by_priority=attainment,
        requests_by_priority=asked,
        resumes=counters.resumes,
    )


def _by_priority(
    completed: Sequence[RequestOutcome], priorities: Mapping[str, int], duration_seconds: float
) -> dict[int, float]:
    tokens: dict[int, float] = {}
    for outcome in completed:
        priority = priorities.get(outcome.model, 0)
        tokens[priority] = tokens.get(priority, 0.0) + (outcome.output_tokens if outcome.met_slo else 0)
    return {p: tokens[p] / duration_seconds for p in sorted(tokens, reverse=True)}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(reports: Sequence[PolicyReport]) -> str:
    """A fixed-width text table, one row per policy."""
    header = (
        f"{'policy':<16}{'goodput tok/s':>14}{'tput tok/s':>11}{'SLO met':>9}{'dropped':>8}"
        f"{'TTFT p50':>9}{'TTFT p99':>9}{'TPOT p99':>9}{'loads':>7}{'resumes':>8}{'preempt':>8}"
        f"{'evict':>7}{'demote':>7}{'migrate':>8}{'reload s':>9}{'GPU mem':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        slo_share = r.met_slo / r.requests if r.requests else 0.0
        lines.append(
            f"{r.policy:<16}{r.goodput_tokens_per_second:>14.1f}{r.throughput_tokens_per_second:>11.1f}"
            f"{slo_share:>9.1%}{r.dropped:>8d}{_fmt(r.ttft_p50_seconds):>9}{_fmt(r.ttft_p99_seconds):>9}"
            f"{_fmt(r.tpot_p99_seconds, 3):>9}{r.loads:>7d}{r.resumes:>8d}{r.preemptions:>8d}"
            f"{r.evictions:>7d}{r.demotions:>7d}{r.migrations:>8d}{r.reload_seconds:>9.1f}"
            f"{r.gpu_memory_utilisation:>8.1%}"
        )
    return "\n".join(lines)


def format_tiers(reports: Sequence[PolicyReport]) -> str:
    """Per priority tier: each policy's SLO attainment and SLO-met goodput (tok/s)."""
    tiers = sorted({tier for r in reports for tier in r.requests_by_priority}, reverse=True)
    header = f"{'priority':>8}{'requests':>9}" + "".join(f"{r.policy:>22}" for r in reports)
    lines = [
        "SLO attainment (share of the tier's requests that met their SLOs) and SLO-met goodput, by tier",
        header,
        "-" * len(header),
    ]
    for tier in tiers:
        asked = max(r.requests_by_priority.get(tier, 0) for r in reports)
        cells = "".join(
            f"{r.slo_attainment_by_priority.get(tier, 0.0):>11.1%}"
            f"{r.goodput_by_priority_tokens_per_second.get(tier, 0.0):>7.1f} tok/s"
            for r in reports
        )
        lines.append(f"{tier:>8}{asked:>9}{cells}")
    return "\n".join(lines)


def ceiling_line(reports: Sequence[PolicyReport], offered_tokens_per_second: float) -> str:
    """What was asked against what the best baseline served: the most any policy could gain over it."""
    baselines = [r for r in reports if r.policy != "residency"]
    if not baselines:
        return f"offered {offered_tokens_per_second:.1f} tok/s (every request served within its SLO)"
    best = max(baselines, key=lambda r: r.goodput_tokens_per_second)
    served = best.goodput_tokens_per_second
    ceiling = f"{offered_tokens_per_second / served:.2f}x" if served > 0 else "unbounded"
    return (
        f"offered {offered_tokens_per_second:.1f} tok/s; best baseline {best.policy} served "
        f"{served:.1f} tok/s within SLO: ceiling (offered / best baseline) {ceiling}"
    )


def write_json(
    reports: Mapping[str, Sequence[PolicyReport]], path: Path, extra: Mapping[str, object] | None = None
) -> None:
    """Write reports (by scenario) as JSON."""
    payload: dict[str, object] = {
        "scenarios": {name: [asdict(r) for r in rows] for name, rows in reports.items()},
    }
    if extra:
        payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_plot(reports: Sequence[PolicyReport], path: Path, title: str) -> None:
    """Bar charts of goodput, p99 TTFT and reload seconds per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [r.policy for r in reports]
    colours = ["#2a9d8f" if p == "residency" else "#8d99ae" for p in policies]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("SLO-met goodput (tok/s)", [r.goodput_tokens_per_second for r in reports]),
        ("TTFT p99 (s)", [r.ttft_p99_seconds or 0.0 for r in reports]),
        ("seconds spent reloading", [r.reload_seconds for r in reports]),
    ]
    for axis, (label, values) in zip(axes, panels, strict=True):
        axis.bar(policies, values, color=colours)
        axis.set_title(label, fontsize=10)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
