"""Simulated hardware and models: GPU node presets, model families, and the scenario file format.

Numbers are public datasheet figures rounded down to what a serving process sees in practice
(e.g. ~50 GB/s pinned H2D on PCIe Gen5 x16, ~25 GB/s on Gen4 x16).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from residency_operator.planner.types import (
    GIB,
    ExecutionMode,
    GpuCapacity,
    HostLinkCapacity,
    ModelDemand,
    NodeCapacity,
)
from residency_operator.simulator.validation import (
    check_workload,
    flag,
    known_keys,
    load_yaml,
    mapping,
    number,
    sequence,
    text,
    whole_number,
)

GPU_PRESETS: dict[str, dict[str, Any]] = {
    "h100-pcie5": {
        "gpu_type": "H100-PCIe",
        "gpu_memory_gib": 80,
        "hbm_gbps": 2000,
        "host_to_device_gbps": 50,
        "host_memory_gib": 512,
        "host_memory_gbps": 120,
        "gpu_tflops": 750,
        "storage_read_gbps": 6,
    },
    "a100-40-pcie4": {
        "gpu_type": "A100-40GB",
        "gpu_memory_gib": 40,
        "hbm_gbps": 1555,
        "host_to_device_gbps": 25,
        "host_memory_gib": 256,
        "host_memory_gbps": 100,
        "gpu_tflops": 312,
        "storage_read_gbps": 4,
    },
    "a6000-pcie4": {
        "gpu_type": "A6000",
        "gpu_memory_gib": 48,
        "hbm_gbps": 768,
        "host_to_device_gbps": 25,
        "host_memory_gib": 256,
        "host_memory_gbps": 80,
        "gpu_tflops": 155,
        "storage_read_gbps": 3,
    },
    "l4": {
        "gpu_type": "L4",
        "gpu_memory_gib": 24,
        "hbm_gbps": 300,
        "host_to_device_gbps": 25,
        "host_memory_gib": 128,
        "host_memory_gbps": 60,
        "gpu_tflops": 121,
        "storage_read_gbps": 2,
    },
    "a6000-pcie3x8": {
        # A bandwidth-starved node: the card sits in an x8 Gen3 slot on an old host.
        "gpu_type": "A6000-x8",
        "gpu_memory_gib": 48,
        "hbm_gbps": 768,
        "host_to_device_gbps": 6,
        "host_memory_gib": 128,
        "host_memory_gbps": 25,
        "gpu_tflops": 155,
        "storage_read_gbps": 1,
    },
    # Multi-GPU nodes: ``gpu_memory_gib`` and the bandwidths are each GPU's; ``gpus_per_host_link`` GPUs copy
    # through one host link that carries ``host_link_concurrent_gbps`` when all of them copy at once.
    "h100-sxm-8x": {
        # An HGX H100 node: 8 SXM GPUs on NVLink; each pair sits behind one PCIe Gen5 switch.
        "gpu_type": "H100-SXM",
        "gpu_count": 8,
        "gpu_memory_gib": 80,
        "hbm_gbps": 3350,
        "host_to_device_gbps": 50,
        "gpus_per_host_link": 2,
        "host_link_concurrent_gbps": 64,
        "device_to_device_gbps": 300,
        "host_memory_gib": 2048,
        "host_memory_gbps": 200,
        "gpu_tflops": 989,
        "storage_read_gbps": 10,
    },
    "l4-4x": {
        # Four L4s on PCIe Gen4, two behind each host switch; GPU-to-GPU copies cross the host bridge.
        "gpu_type": "L4",
        "gpu_count": 4,
        "gpu_memory_gib": 24,
        "hbm_gbps": 300,
        "host_to_device_gbps": 25,
        "gpus_per_host_link": 2,
        "host_link_concurrent_gbps": 26,
        "device_to_device_gbps": 20,
        "host_memory_gib": 512,
        "host_memory_gbps": 80,
        "gpu_tflops": 121,
        "storage_read_gbps": 3,
    },
}

MODEL_FAMILIES: dict[str, dict[str, Any]] = {
    # parameters (billions), layers, KV bytes per token (bf16, grouped-query attention)
    "qwen-0.5b": {"parameters_billion": 0.5, "layers": 24, "kv_bytes_per_token": 12288},
    "llama-1b": {"parameters_billion": 1.2, "layers": 16, "kv_bytes_per_token": 32768},
    "llama-3b": {"parameters_billion": 3.2, "layers": 28, "kv_bytes_per_token": 114688},
    "mistral-7b": {"parameters_billion": 7.2, "layers": 32, "kv_bytes_per_token": 131072},
    "llama-8b": {"parameters_billion": 8.0, "layers": 32, "kv_bytes_per_token": 131072},
    "llama-13b": {"parameters_billion": 13.0, "layers": 40, "kv_bytes_per_token": 819200},
    "codellama-34b": {"parameters_billion": 34.0, "layers": 48, "kv_bytes_per_token": 196608},
    "llama-70b": {"parameters_billion": 70.0, "layers": 80, "kv_bytes_per_token": 327680},
    "qwen-32b": {"parameters_billion": 32.8, "layers": 64, "kv_bytes_per_token": 262144},
}


POSITIVE_NODE_FIELDS = (
    "gpu_memory_gib",
    "hbm_gbps",
    "host_to_device_gbps",
    "host_memory_gib",
    "host_memory_gbps",
    "gpu_tflops",
    "storage_read_gbps",
)
"""Node numbers that must be > 0: memory sizes, and rates the predictor divides by."""

MULTI_GPU_FIELDS = ("gpu_count", "gpus_per_host_link", "host_link_concurrent_gbps", "device_to_device_gbps")
"""Fields of a multi-GPU preset (``gpu_count`` > 1); the memory and bandwidth fields are then each GPU's."""

NODE_OVERRIDES = (*POSITIVE_NODE_FIELDS, "gpu_type", "reserved_gpu_gib", "cordoned", *MULTI_GPU_FIELDS)
"""Preset fields a cluster entry may override."""

DEFAULT_CLUSTER = "h100-pcie5:1,a6000-pcie4:1,l4:2"
CLUSTER_FILE_SUFFIXES = (".yaml", ".yml", ".json")

EXECUTION_MODES: tuple[ExecutionMode, ...] = ("stream", "cpu")


def make_node(name: str, preset: str, **overrides: Any) -> NodeCapacity:
    """A simulated node from a preset, with optional field overrides (GiB fields in GiB)."""
    if preset not in GPU_PRESETS:
        raise ValueError(f"unknown GPU preset {preset!r}; known: {', '.join(sorted(GPU_PRESETS))}")
    known_keys(overrides, NODE_OVERRIDES, f"node {name}")
    spec = {**GPU_PRESETS[preset], **overrides}
    value = {key: number(spec[key], f"node {name}: {key}", above=0) for key in POSITIVE_NODE_FIELDS}
    reserved_gpu_gib = number(spec.get("reserved_gpu_gib", 1.0), f"node {name}: reserved_gpu_gib", minimum=0)
    if reserved_gpu_gib >= value["gpu_memory_gib"]:
        raise ValueError(
            f"node {name}: reserved_gpu_gib ({reserved_gpu_gib:g}) leaves nothing of "
            f"gpu_memory_gib ({value['gpu_memory_gib']:g})"
        )
    node = NodeCapacity(
        name=name,
        gpu_type=text(spec["gpu_type"], f"node {name}: gpu_type"),
        gpu_memory_bytes=int(value["gpu_memory_gib"] * GIB),
        host_memory_bytes=int(value["host_memory_gib"] * GIB),
        host_to_device_gbps=value["host_to_device_gbps"],
        hbm_gbps=value["hbm_gbps"],
        host_memory_gbps=value["host_memory_gbps"],
        gpu_tflops=value["gpu_tflops"],
        storage_read_gbps=value["storage_read_gbps"],
        reserved_gpu_bytes=int(reserved_gpu_gib * GIB),
        cordoned=flag(spec.get("cordoned", False), f"node {name}: cordoned"),
    )
    gpu_count = whole_number(spec.get("gpu_count", 1), f"node {name}: gpu_count", minimum=1)
    return node if gpu_count == 1 else with_gpus(node, gpu_count, spec)


def with_gpus(node: NodeCapacity, gpu_count: int, spec: dict[str, Any]) -> NodeCapacity:
    """A node of ``gpu_count`` GPUs like ``node``'s one (memory, reserve and bandwidths each GPU's), sharing
    host links ``gpus_per_host_link`` at a time, with GPU-to-GPU copies at ``device_to_device_gbps``."""
    where = f"node {node.name}"
    per_link = whole_number(spec.get("gpus_per_host_link", 1), f"{where}: gpus_per_host_link", minimum=1)
    concurrent = number(
        spec.get("host_link_concurrent_gbps", node.host_to_device_gbps * per_link),
        f"{where}: host_link_concurrent_gbps",
        above=0,
    )
    d2d = spec.get("device_to_device_gbps")
    gpus = tuple(
        GpuCapacity(
            index=i,
            memory_bytes=node.gpu_memory_bytes,
            hbm_gbps=node.hbm_gbps,
            host_to_device_gbps=node.host_to_device_gbps,
            host_link=i // per_link,
            reserved_bytes=node.reserved_gpu_bytes,
        )
        for i in range(gpu_count)
    )
    links = tuple(
        HostLinkCapacity(link, tuple(g.index for g in gpus if g.host_link == link), concurrent)
        for link in sorted({g.host_link for g in gpus})
    )
    return dataclasses.replace(
        node,
        gpu_memory_bytes=node.gpu_memory_bytes * gpu_count,
        reserved_gpu_bytes=node.reserved_gpu_bytes * gpu_count,
        gpus=gpus,
        host_links=tuple(link for link in links if len(link.gpus) > 1),
        device_to_device_gbps=None
        if d2d is None
        else number(d2d, f"{where}: device_to_device_gbps", above=0),
    )


def parse_cluster(spec: str | list[dict[str, Any]], base_dir: Path | None = None) -> list[NodeCapacity]:
    """Nodes from ``"h100-pcie5:2,l4:1"``, a YAML file path, or a list of ``{preset, count, name, ...}``.

    A relative file path is read from ``base_dir`` when given (the directory of the scenario naming it).
    Refused: unknown presets and keys, counts below 0, values a node cannot have, and a cluster that ends
    up with no node at all (the planner has nothing to place on, and no policy anything to compare).
    """
    if isinstance(spec, str):
        if spec.strip().endswith(CLUSTER_FILE_SUFFIXES):
            return _parse_cluster_file(Path(spec.strip()), base_dir)
        entries: list[dict[str, Any]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            preset_name, _, count_text = part.partition(":")
            count = whole_number(count_text or "1", f"cluster {part!r}: node count", minimum=0)
            entries.append({"preset": preset_name.strip(), "count": count})
        return _nodes_from_entries(entries, f"cluster {spec!r}")
    return _nodes_from_entries(spec, "cluster")


def _parse_cluster_file(path: Path, base_dir: Path | None) -> list[NodeCapacity]:
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ValueError(f"cluster file {path} not found")
    loaded = load_yaml(path)
    if isinstance(loaded, dict) and "cluster" in loaded:  # a cluster file, or a scenario's cluster
        loaded = loaded["cluster"]
    elif not isinstance(loaded, list):
        raise ValueError(f"{path}: expected a list of nodes, or a mapping with a `cluster:` list of nodes")
    return _nodes_from_entries(loaded, str(path))


def _nodes_from_entries(spec: Any, source: str) -> list[NodeCapacity]:
    nodes: list[NodeCapacity] = []
    for index, raw in enumerate(sequence(spec, f"{source}: the node list"), start=1):
        where = f"{source}: node entry {index}"
        entry = mapping(raw, where)
        known_keys(entry, ("preset", "count", "name", *NODE_OVERRIDES), where)
        if "preset" not in entry:
            raise ValueError(f"{where}: missing `preset` (one of {', '.join(sorted(GPU_PRESETS))})")
        preset = text(entry.pop("preset"), f"{where}: preset")
        count = whole_number(entry.pop("count", 1), f"{where} ({preset}): count", minimum=0)
        base_name = text(entry.pop("name", preset), f"{where}: name")
        for i in range(count):
            try:
                nodes.append(make_node(f"{base_name}-{i}" if count > 1 else base_name, preset, **entry))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
    if not nodes:
        raise ValueError(f"the cluster has no nodes ({source})")
    refuse_duplicates(
        [n.name for n in nodes], f"{source}: duplicate node name", "give the entries distinct names"
    )
    return nodes


@dataclass(frozen=True, slots=True)
class SimModel:
    """A model of a scenario: its family and the LLMModel spec fields the planner reads."""

    name: str
    family: str
    priority: int = 0
    preemptible: bool = True
    min_decode_tokens_per_second: float = 10.0
    max_offload_fraction: float = 0.75
    max_sequence_length: int = 4096
    max_batch: int = 8
    allowed_modes: tuple[ExecutionMode, ...] = ("stream", "cpu")
    idle_after_seconds: float | None = None
    """``spec.idle.afterSeconds``: released after this long without a request, weights kept in host memory
    until the next one; ``None``: never."""

    def __post_init__(self) -> None:
        # Checked here, not only where scenario files are read, so that a model built in code cannot
        # carry a value the simulation divides by (a zero SLO) or cannot place (no execution mode).
        if self.family not in MODEL_FAMILIES:
            known = ", ".join(sorted(MODEL_FAMILIES))
            raise ValueError(f"{self.name}: unknown model family {self.family!r}; known: {known}")
        if self.idle_after_seconds is not None and not self.idle_after_seconds > 0:
            raise ValueError(f"{self.name}: idle_after_seconds must be > 0, got {self.idle_after_seconds}")
        slo = self.min_decode_tokens_per_second
        if not (math.isfinite(slo) and slo > 0):
            raise ValueError(f"{self.name}: min_decode_tokens_per_second (the SLO) must be > 0, got {slo}")
        if not 0.0 <= self.max_offload_fraction <= 1.0:
            raise ValueError(
                f"{self.name}: max_offload_fraction must be in [0, 1], got {self.max_offload_fraction}"
            )
        if self.max_sequence_length < 1 or self.max_batch < 1:
            raise ValueError(f"{self.name}: max_sequence_length and max_batch must be >= 1")
        if not self.allowed_modes or not set(self.allowed_modes) <= set(EXECUTION_MODES):
            modes = ", ".join(EXECUTION_MODES)
            raise ValueError(f"{self.name}: allowed_modes must be some of {modes}, got {self.allowed_modes}")

    def demand(
        self,
        demand_decode_tokens_per_second: float | None = None,
        prompt_tokens_per_second: float | None = None,
        typical_prompt_tokens: int | None = None,
    ) -> ModelDemand:
        """The planner's view of this model, with the observed demand (decode and prefill) filled in."""
        family = MODEL_FAMILIES[self.family]
        weight_bytes = int(float(family["parameters_billion"]) * 2e9)
        layers = int(family["layers"])
        return ModelDemand(
            name=self.name,
            weight_bytes=weight_bytes,
            kv_bytes_per_token=int(family["kv_bytes_per_token"]),
            max_sequence_length=self.max_sequence_length,
            max_batch=self.max_batch,
            priority=self.priority,
            preemptible=self.preemptible,
            min_decode_tokens_per_second=self.min_decode_tokens_per_second,
            max_offload_fraction=self.max_offload_fraction,
            layer_count=layers,
            bytes_per_layer=weight_bytes // layers,
            parameter_count=int(float(family["parameters_billion"]) * 1e9),
            demand_decode_tokens_per_second=demand_decode_tokens_per_second,
            typical_sequence_length=min(self.max_sequence_length, 1024),
            prompt_tokens_per_second=prompt_tokens_per_second,
            typical_prompt_tokens=typical_prompt_tokens,
            allowed_modes=self.allowed_modes,
        )


def family_for_name(name: str) -> str | None:
    """The model family a bare trace name refers to (``team/llama-8b-chat`` → ``llama-8b``); ``None``
    when it names none (never guessed: a wrong family would simulate another model's size and speed)."""
    lowered = name.lower()
    for family in sorted(MODEL_FAMILIES, key=len, reverse=True):
        if family in lowered:
            return family
    return None


MODEL_KEYS = (*(f.name for f in fields(SimModel)), "count", "slo")
"""Keys of a scenario's model entry: the :class:`SimModel` fields, ``count``, and ``slo``, an alias of
``min_decode_tokens_per_second`` (the LLMModel's ``spec.slo``: a number, or ``{minDecodeTokensPerSecond: n}``
as the LLMModel writes it)."""


def parse_models(entries: Any, source: str = "models") -> list[SimModel]:
    """Models from scenario entries ``{name, family, priority, slo, max_offload_fraction, count, ...}``.

    Refused, naming the entry: unknown keys, unknown families, values of the wrong kind or range,
    duplicate names, and a list that gives no model at all.
    """
    models: list[SimModel] = []
    for index, raw in enumerate(sequence(entries, f"{source}: the model list"), start=1):
        entry = mapping(raw, f"{source}: model entry {index}")
        known_keys(entry, MODEL_KEYS, f"{source}: model entry {index}")
        if "name" not in entry:
            raise ValueError(f"{source}: model entry {index}: missing `name`")
        base_name = text(entry.pop("name"), f"{source}: model entry {index}: name")
        where = f"{source}: model {base_name}"
        count = whole_number(entry.pop("count", 1), f"{where}: count", minimum=0)
        if "family" not in entry and family_for_name(base_name) is None:
            raise ValueError(
                f"{where}: no `family`, and the name names none; known: {', '.join(sorted(MODEL_FAMILIES))}"
            )
        family = text(entry.pop("family", family_for_name(base_name)), f"{where}: family")
        if family not in MODEL_FAMILIES:
            raise ValueError(
                f"{where}: unknown model family {family!r}; known: {', '.join(sorted(MODEL_FAMILIES))}"
            )
        if "slo" in entry:
            if "min_decode_tokens_per_second" in entry:
                raise ValueError(f"{where}: give `slo` or `min_decode_tokens_per_second`, not both")
            entry["min_decode_tokens_per_second"] = _slo_tokens_per_second(entry.pop("slo"), f"{where}: slo")
        values = _model_values(entry, where)
        for i in range(count):
            name = f"{base_name}-{i}" if count > 1 else base_name
            models.append(SimModel(name=name, family=family, **values))
    if not models:
        raise ValueError(f"{source}: the scenario has no models")
    refuse_duplicates([m.name for m in models], f"{source}: duplicate model name")
    return models


def _slo_tokens_per_second(value: Any, where: str) -> float:
    if isinstance(value, dict):
        known_keys(value, ("minDecodeTokensPerSecond",), where)
        value = value.get("minDecodeTokensPerSecond")
    return number(value, f"{where} (decode tokens/s)", above=0)


def _model_values(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """A model entry's SimModel fields, converted and checked (YAML may give ``"8"`` or ``yes``)."""
    values: dict[str, Any] = {}
    for key, value in entry.items():
        at = f"{where}: {key}"
        if key == "priority":
            values[key] = whole_number(value, at)
        elif key == "preemptible":
            values[key] = flag(value, at)
        elif key == "min_decode_tokens_per_second":
            values[key] = number(value, at, above=0)
        elif key == "max_offload_fraction":
            fraction = number(value, at, minimum=0)
            if fraction > 1:
                raise ValueError(f"{at} must be <= 1, got {value!r}")
            values[key] = fraction
        elif key in ("max_sequence_length", "max_batch"):
            values[key] = whole_number(value, at, minimum=1)
        elif key == "allowed_modes":
            modes = sequence(value, at)
            unknown = [m for m in modes if m not in EXECUTION_MODES]
            if unknown or not modes:
                raise ValueError(
                    f"{at} must be a non-empty list of {', '.join(EXECUTION_MODES)}, got {value!r}"
                )
            values[key] = tuple(modes)
        elif key == "idle_after_seconds":
            values[key] = None if value is None else number(value, at, above=0)
    return values


@dataclass(slots=True)
class Scenario:
    """A complete simulation input: cluster, models, workload (generated or a trace file)."""

    name: str
    description: str
    nodes: list[NodeCapacity]
    models: list[SimModel]
    workload: dict[str, Any] = field(default_factory=dict)
    trace_path: str | None = None
    duration_seconds: float = 600.0
    seed: int = 0
    ttft_slo_seconds: float = 10.0
    queue_timeout_seconds: float = 30.0
    extra: bool = False
    """Not one of the standard scenarios the issue names: an added case, reported separately."""
    router_admission: bool = True
    """Requests pass the router's admission (429 past what a model serves within the TTFT target), for every
    policy alike; off: every request queues until it is served or times out (the simulator before it)."""


SCENARIO_KEYS = (
    "name",
    "description",
    "cluster",
    "models",
    "workload",
    "trace",
    "duration_seconds",
    "seed",
    "ttft_slo_seconds",
    "queue_timeout_seconds",
    "extra",
    "router_admission",
)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML file (see ``simulator/scenarios/``); files it names are relative to it."""
    path = Path(path)
    return scenario_from_dict(load_yaml(path), default_name=path.stem, base_dir=path.parent, source=str(path))


def scenario_from_dict(
    data: Any, default_name: str = "scenario", base_dir: Path | None = None, source: str = "scenario"
) -> Scenario:
    """Build a scenario from its parsed YAML, checking every field (messages start with ``source``).

    ``base_dir``: where relative ``cluster`` and ``trace`` file paths are read from (the scenario file's
    directory, so that a scenario and the files next to it work from any working directory).
    """
    data = mapping(data, source)
    known_keys(data, SCENARIO_KEYS, source)
    for key in ("cluster", "models"):
        if key not in data:
            raise ValueError(f"{source}: missing `{key}`")
    models = parse_models(data["models"], f"{source}: models")
    trace_path = data.get("trace")
    if trace_path is not None:
        trace_path = text(trace_path, f"{source}: trace")
        if base_dir is not None and not Path(trace_path).is_absolute():
            trace_path = str(base_dir / trace_path)
    return Scenario(
        name=text(data.get("name", default_name), f"{source}: name"),
        description=str(data.get("description", "")),
        nodes=parse_cluster(data["cluster"], base_dir),
        models=models,
        workload=check_workload(data.get("workload", {}), [m.name for m in models], f"{source}: workload"),
        trace_path=trace_path,
        duration_seconds=number(data.get("duration_seconds", 600.0), f"{source}: duration_seconds", above=0),
        seed=whole_number(data.get("seed", 0), f"{source}: seed", minimum=0),
        ttft_slo_seconds=number(data.get("ttft_slo_seconds", 10.0), f"{source}: ttft_slo_seconds", above=0),
        queue_timeout_seconds=number(
            data.get("queue_timeout_seconds", 30.0), f"{source}: queue_timeout_seconds", above=0
        ),
        extra=flag(data.get("extra", False), f"{source}: extra"),
        router_admission=flag(data.get("router_admission", True), f"{source}: router_admission"),
    )


def refuse_duplicates(names: list[str], problem: str, advice: str = "") -> None:
    """A clear error naming the first name given twice (entries are told apart by name)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{problem} {name!r}" + (f"; {advice}" if advice else ""))
        seen.add(name)
