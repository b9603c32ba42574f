"""Request traces: a seeded generator (Poisson, bursty, diurnal mixes) and a simple CSV format.

CSV columns: ``arrival_seconds,model,prompt_tokens,output_tokens`` (a header line is required).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from residency_operator.simulator.cluster import SimModel
from residency_operator.simulator.validation import check_workload, number, whole_number

CSV_COLUMNS = ("arrival_seconds", "model", "prompt_tokens", "output_tokens")


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request of a trace."""

    arrival_seconds: float
    model: str
    prompt_tokens: int
    output_tokens: int


def popularity_weights(
    models: Sequence[SimModel], popularity: Any, zipf_exponent: float = 1.1
) -> list[float]:
    """Share of the traffic each model gets: ``uniform``, ``zipf`` (by listed order) or {name: weight}."""
    if isinstance(popularity, dict):
        raw = [float(popularity.get(m.name, 0.0)) for m in models]
    elif popularity == "zipf":
        raw = [1.0 / (rank + 1) ** zipf_exponent for rank in range(len(models))]
    else:
        raw = [1.0] * len(models)
    total = sum(raw)
    if total <= 0:
        raise ValueError("popularity weights sum to zero")
    return [w / total for w in raw]


def _rate_multiplier(
    pattern: str, t: float, model_index: int, workload: dict[str, Any], phase: float
) -> float:
    if pattern == "diurnal":
        period = float(workload.get("period_seconds", 600.0))
        amplitude = float(workload.get("amplitude", 0.8))
        return 1.0 + amplitude * math.sin(2 * math.pi * t / period + phase)
    return 1.0


def shifted_popularity(weights: Sequence[float], epochs: int, seed: int) -> list[list[float]]:
    """The popularity of each epoch: epoch 0 as given, each later one the same Zipf shares dealt to the
    models in a new seeded order (yesterday's favourite may be idle today)."""
    shares = [list(weights)]
    for epoch in range(1, epochs):
        order = np.random.default_rng([seed, 2_000_000 + epoch]).permutation(len(weights))
        shares.append([weights[i] for i in order])
    return shares


def generate_trace(
    models: Sequence[SimModel], workload: dict[str, Any], duration_seconds: float, seed: int
) -> list[Request]:
    """Generate a trace. The same arguments always give the same trace.

    ``workload`` keys: ``pattern`` (poisson | bursty | diurnal), ``total_rate_per_second``,
    ``popularity`` (uniform | zipf | {name: weight}), ``zipf_exponent``, ``prompt_tokens_mean``,
    ``output_tokens_mean``, ``burst_factor``, ``burst_on_seconds``, ``burst_off_seconds``,
    ``period_seconds``, ``amplitude``, ``diurnal_phase`` (per-model | shared), ``popularity_shift_seconds``
    (Zipf only: the ranking is dealt anew every so many seconds), and ``events``: extra traffic
    ``[{model, start_seconds, end_seconds, rate_per_second}]`` (``model`` may be a name prefix).
    """
    # Checked here too (not only where scenarios are parsed): numpy turns a negative duration or rate into
    # an error about ``lam`` that says nothing of the workload, and an empty model list into no traffic.
    if not models:
        raise ValueError("no models to generate traffic for")
    number(duration_seconds, "duration_seconds", above=0)
    whole_number(seed, "seed", minimum=0)
    check_workload(workload, [m.name for m in models])
    pattern = str(workload.get("pattern", "poisson"))
    total_rate = float(workload.get("total_rate_per_second", 1.0))
    weights = popularity_weights(
        models, workload.get("popularity", "uniform"), float(workload.get("zipf_exponent", 1.1))
    )
    shuffle_seed = workload.get("popularity_shuffle_seed")
    if shuffle_seed is not None:
        # Popularity should not follow the order models are listed in (which groups them by size).
        weights = [weights[i] for i in np.random.default_rng(int(shuffle_seed)).permutation(len(weights))]
    prompt_mean = float(workload.get("prompt_tokens_mean", 512))
    output_mean = float(workload.get("output_tokens_mean", 128))
    shift = workload.get("popularity_shift_seconds")
    shift_seconds = float(shift) if shift is not None else duration_seconds
    epoch_weights = (
        shifted_popularity(weights, max(1, math.ceil(duration_seconds / shift_seconds)), seed)
        if shift is not None
        else None
    )
    shared_phase = workload.get("diurnal_phase", "per-model") == "shared"
    requests: list[Request] = []
    for index, model in enumerate(models):
        rng = np.random.default_rng([seed, index])
        base_rate = total_rate * weights[index]
        phase = float(rng.uniform(0, 2 * math.pi))
        if shared_phase:
            phase = -math.pi / 2  # the fleet's day starts at its trough
        if epoch_weights is not None:
            rates = [total_rate * epoch[index] for epoch in epoch_weights]
            arrivals = _shifting_arrivals(
                rng, pattern, rates, shift_seconds, duration_seconds, workload, index, phase
            )
        else:
            arrivals = _arrivals(rng, pattern, base_rate, duration_seconds, workload, index, phase)
        requests.extend(_requests_at(rng, arrivals, model, prompt_mean, output_mean))
    for event_index, event in enumerate(workload.get("events", [])):
        targets = [m for m in models if m.name == event["model"] or m.name.startswith(str(event["model"]))]
        for target_index, model in enumerate(targets):
            rng = np.random.default_rng([seed, 1_000_000 + event_index, target_index])
            start, end = float(event["start_seconds"]), float(event.get("end_seconds", duration_seconds))
            count = rng.poisson(float(event["rate_per_second"]) * max(0.0, end - start))
            event_arrivals = np.sort(rng.uniform(start, end, size=count))
            requests.extend(
                _requests_at(
                    rng,
                    event_arrivals.tolist(),
                    model,
                    float(event.get("prompt_tokens_mean", prompt_mean)),
                    float(event.get("output_tokens_mean", output_mean)),
                )
            )
    requests.sort(key=lambda r: (r.arrival_seconds, r.model))
    return requests


def _arrivals(
    rng: np.random.Generator,
    pattern: str,
    base_rate: float,
    duration_seconds: float,
    workload: dict[str, Any],
    model_index: int,
    phase: float,
) -> list[float]:
    if base_rate <= 0:
        return []
    if pattern == "bursty":
        # On/off modulated Poisson: bursts at burst_factor x the rate, quiet periods at a tenth of it,
        # scaled so the long-run mean stays base_rate.
        factor = float(workload.get("burst_factor", 5.0))
        on_seconds = float(workload.get("burst_on_seconds", 30.0))
        off_seconds = float(workload.get("burst_off_seconds", 120.0))
        quiet = 0.1
        mean_multiplier = (factor * on_seconds + quiet * off_seconds) / (on_seconds + off_seconds)
        times: list[float] = []
        on = bool(rng.integers(0, 2))  # desynchronise models
        start = 0.0
        while start < duration_seconds:
            length = float(rng.exponential(on_seconds if on else off_seconds))
            rate = base_rate * (factor if on else quiet) / mean_multiplier
            end = min(duration_seconds, start + length)
            count = int(rng.poisson(rate * (end - start)))
            times.extend(float(x) for x in rng.uniform(start, end, size=count))
            start, on = end, not on
        return sorted(times)
    peak = base_rate * (1.0 + float(workload.get("amplitude", 0.8)) if pattern == "diurnal" else 1.0)
    count = int(rng.poisson(peak * duration_seconds))
    candidates = np.sort(rng.uniform(0, duration_seconds, size=count))
    keep = rng.uniform(0, 1, size=count)
    return [
        float(t)
        for t, u in zip(candidates, keep, strict=True)
        if u * peak <= base_rate * _rate_multiplier(pattern, float(t), model_index, workload, phase)
    ]


def _shifting_arrivals(
    rng: np.random.Generator,
    pattern: str,
    epoch_rates: Sequence[float],
    shift_seconds: float,
    duration_seconds: float,
    workload: dict[str, Any],
    model_index: int,
    phase: float,
) -> list[float]:
    """Poisson arrivals whose rate is ``epoch_rates[epoch]`` (times the diurnal curve), by thinning."""
    peak = max(epoch_rates) * (1.0 + float(workload.get("amplitude", 0.8)) if pattern == "diurnal" else 1.0)
    if peak <= 0:
        return []
    count = int(rng.poisson(peak * duration_seconds))
    candidates = np.sort(rng.uniform(0, duration_seconds, size=count))
    keep = rng.uniform(0, 1, size=count)
    last = len(epoch_rates) - 1
    return [
        float(t)
        for t, u in zip(candidates, keep, strict=True)
        if u * peak
        <= epoch_rates[min(last, int(t // shift_seconds))]
        * _rate_multiplier(pattern, float(t), model_index, workload, phase)
    ]


def _requests_at(
    rng: np.random.Generator,
    arrivals: Iterable[float],
    model: SimModel,
    prompt_mean: float,
    output_mean: float,
) -> list[Request]:
    arrival_list = list(arrivals)
    sigma = 0.5
    prompts = rng.lognormal(math.log(prompt_mean) - sigma**2 / 2, sigma, size=len(arrival_list))
    outputs = rng.lognormal(math.log(output_mean) - sigma**2 / 2, sigma, size=len(arrival_list))
    limit = model.max_sequence_length // 2
    return [
        Request(
            arrival_seconds=round(t, 6),
            model=model.name,
            prompt_tokens=int(min(limit, max(8, round(p)))),
            output_tokens=int(min(limit, max(8, round(o)))),
        )
        for t, p, o in zip(arrival_list, prompts, outputs, strict=True)
    ]


def read_trace_csv(path: str | Path) -> list[Request]:
    """Read a CSV trace (header required); rows are sorted by arrival.

    Refused, naming the file and line: missing columns or cells, an empty model name, an arrival that is
    not a finite number >= 0 (``nan`` and ``inf`` parse as floats, and would break the simulation clock),
    and token counts below 1 (a request has a prompt and yields at least one token; a negative count would
    complete at once and a zero one never produce a first token).
    """
    requests: list[Request] = []
    try:
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: trace CSV lacks columns {', '.join(missing)}")
            for row in reader:
                requests.append(_request_from_row(row, f"{path}:{reader.line_num}"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text CSV file ({error.reason} at byte {error.start})") from error
    requests.sort(key=lambda r: (r.arrival_seconds, r.model))
    return requests


def _request_from_row(row: dict[str, str | None], where: str) -> Request:
    empty = [c for c in CSV_COLUMNS if not (row.get(c) or "").strip()]
    if empty:
        raise ValueError(f"{where}: bad trace row: no value for {', '.join(empty)}")
    return Request(
        arrival_seconds=number(row["arrival_seconds"], f"{where}: arrival_seconds", minimum=0),
        model=str(row["model"]).strip(),
        prompt_tokens=whole_number(row["prompt_tokens"], f"{where}: prompt_tokens", minimum=1),
        output_tokens=whole_number(row["output_tokens"], f"{where}: output_tokens", minimum=1),
    )


def write_trace_csv(requests: Iterable[Request], path: str | Path) -> None:
    """Write a trace in the CSV format :func:`read_trace_csv` reads."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in requests:
            writer.writerow([f"{r.arrival_seconds:.6f}", r.model, r.prompt_tokens, r.output_tokens])
