"""Checks for what people write for the simulator: scenario files, ``--cluster``, ``--generate``, traces.

A bad value should be refused where it is read, with a message that names it and where it is, rather
than surface as a traceback deep inside the simulation (``nan`` arrivals, a zero SLO), or, worse, run on
a silent misreading (a misspelled key ignored, a negative token count that completes instantly).
Every check raises :class:`ValueError`, which ``residency simulate`` reports as a one-line error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

WORKLOAD_PATTERNS = ("poisson", "bursty", "diurnal")
DIURNAL_PHASES = ("per-model", "shared")
"""``per-model``: each model's day starts at a random phase; ``shared``: the whole fleet's load rises and
falls together (a real day: the peak is when every model is busy at once)."""

WORKLOAD_KEYS = (
    "pattern",
    "total_rate_per_second",
    "popularity",
    "zipf_exponent",
    "popularity_shuffle_seed",
    "prompt_tokens_mean",
    "output_tokens_mean",
    "burst_factor",
    "burst_on_seconds",
    "burst_off_seconds",
    "period_seconds",
    "amplitude",
    "diurnal_phase",
    "popularity_shift_seconds",
    "events",
)
"""What :func:`residency_operator.simulator.trace.generate_trace` reads from a workload."""

EVENT_KEYS = (
    "model",
    "start_seconds",
    "end_seconds",
    "rate_per_second",
    "prompt_tokens_mean",
    "output_tokens_mean",
)

POSITIVE_WORKLOAD_FIELDS = (
    "prompt_tokens_mean",
    "output_tokens_mean",
    "burst_factor",
    "burst_on_seconds",
    "burst_off_seconds",
    "period_seconds",
    "popularity_shift_seconds",
)
"""Workload numbers that must be > 0: token means feed a log-normal, the rest are periods and factors."""


def number(value: Any, where: str, *, minimum: float | None = None, above: float | None = None) -> float:
    """``value`` as a finite float, at least ``minimum`` / greater than ``above`` when given.

    Strings are accepted (CSV cells, ``--generate`` options); booleans are not: YAML reads ``yes`` as one.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        result = float(value)
    except ValueError:
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if minimum is not None and result < minimum:
        raise ValueError(f"{where} must be >= {minimum:g}, got {value!r}")
    if above is not None and result <= above:
        raise ValueError(f"{where} must be > {above:g}, got {value!r}")
    return result


def whole_number(value: Any, where: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (``2``, ``"2"`` or ``2.0``; not ``2.5``, not a boolean), at least ``minimum``."""
    result: int
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a whole number, got {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str):
        try:
            result = int(value.strip())
        except ValueError:
            raise ValueError(f"{where} must be a whole number, got {value!r}") from None
    else:
        raise ValueError(f"{where} must be a whole number, got {value!r}")
    if minimum is not None and result < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value!r}")
    return result


def flag(value: Any, where: str) -> bool:
    """A YAML boolean; ``bool("no")`` would be true, so strings and numbers are refused."""
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def text(value: Any, where: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value.strip()


def mapping(value: Any, where: str) -> dict[str, Any]:
    """A YAML mapping, copied."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of key: value, got {value!r}")
    return dict(value)


def sequence(value: Any, where: str) -> list[Any]:
    """A YAML list (a string or a mapping is not one, though both iterate)."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where} must be a list, got {value!r}")
    return list(value)


def known_keys(entry: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Refuse keys nobody reads: a misspelled key would otherwise be ignored and its default used."""
    allowed = set(known)
    unknown = [str(key) for key in entry if key not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(allowed))}")


def load_yaml(path: Path) -> Any:
    """A YAML file's content; unreadable files and YAML syntax errors become one-line ValueErrors."""
    try:
        content = path.read_text()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text file ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise ValueError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        return yaml.safe_load(content)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        place = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}{place}: invalid YAML: {error.problem or error.context}") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from error


def check_workload(workload: Any, model_names: Iterable[str], where: str = "workload") -> dict[str, Any]:
    """A workload mapping (see ``generate_trace``), checked: known keys, known pattern, usable numbers,
    popularity and events that name models of the scenario."""
    result = mapping(workload, where)
    known_keys(result, WORKLOAD_KEYS, where)
    names = list(model_names)
    pattern = result.get("pattern", "poisson")
    if pattern not in WORKLOAD_PATTERNS:
        raise ValueError(f"unknown workload pattern {pattern!r}; use {', '.join(WORKLOAD_PATTERNS)}")
    number(result.get("total_rate_per_second", 1.0), f"{where}.total_rate_per_second", minimum=0)
    number(result.get("zipf_exponent", 1.1), f"{where}.zipf_exponent", minimum=0)
    number(result.get("amplitude", 0.8), f"{where}.amplitude", minimum=0)
    for key in POSITIVE_WORKLOAD_FIELDS:
        if key in result:
            number(result[key], f"{where}.{key}", above=0)
    phase = result.get("diurnal_phase", "per-model")
    if phase not in DIURNAL_PHASES:
        raise ValueError(f"{where}.diurnal_phase must be one of {', '.join(DIURNAL_PHASES)}, got {phase!r}")
    if "popularity_shift_seconds" in result and result.get("popularity", "uniform") != "zipf":
        raise ValueError(f"{where}.popularity_shift_seconds reshuffles a Zipf ranking: set popularity: zipf")
    if "popularity_shift_seconds" in result and pattern == "bursty":
        raise ValueError(
            f"{where}.popularity_shift_seconds works with poisson or diurnal; add bursts as events"
        )
    if result.get("popularity_shuffle_seed") is not None:
        whole_number(result["popularity_shuffle_seed"], f"{where}.popularity_shuffle_seed", minimum=0)
    popularity = result.get("popularity", "uniform")
    if isinstance(popularity, Mapping):
        for name, weight in popularity.items():
            if name not in names:
                raise ValueError(f"{where}.popularity names {name!r}, which is not a model of the scenario")
            number(weight, f"{where}.popularity[{name!r}]", minimum=0)
    elif popularity not in ("uniform", "zipf"):
        raise ValueError(f"{where}.popularity must be uniform, zipf or {{model: weight}}, got {popularity!r}")
    for index, raw in enumerate(sequence(result.get("events", []), f"{where}.events"), start=1):
        event_where = f"{where}.events[{index}]"
        event = mapping(raw, event_where)
        known_keys(event, EVENT_KEYS, event_where)
        target = text(event.get("model"), f"{event_where}.model")
        if not any(name == target or name.startswith(target) for name in names):
            raise ValueError(f"{event_where}.model {target!r} matches no model of the scenario")
        start = number(event.get("start_seconds"), f"{event_where}.start_seconds", minimum=0)
        if "end_seconds" in event:
            number(event["end_seconds"], f"{event_where}.end_seconds", minimum=start)
        number(event.get("rate_per_second"), f"{event_where}.rate_per_second", minimum=0)
        for key in ("prompt_tokens_mean", "output_tokens_mean"):
            if key in event:
                number(event[key], f"{event_where}.{key}", above=0)
    return result
