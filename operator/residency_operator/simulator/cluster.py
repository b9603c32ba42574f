"""Simulated hardware and models: GPU node presets, model families, and the scenario file format.

Numbers are public datasheet figures rounded down to what a serving process sees in practice
(e.g. ~50 GB/s pinned H2D on PCIe Gen5 x16, ~25 GB/s on Gen4 x16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from residency_operator.planner.types import GIB, ExecutionMode, ModelDemand, NodeCapacity

GPU_PRESETS: dict[str, dict[str, Any]] = {
    "h100-pcie5": {
        "gpu_type": "H100-PCIe",
        "gpu_memory_gib": 80,
        "hbm_gbps": 2000,
        "host_to_device_gbps": 50,
        "host_memory_gib": 512,
        "host_memory_gbps": 120,
        "gpu_tflops": 750,
        "cpu_tflops": 3,
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
        "cpu_tflops": 2,
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
        "cpu_tflops": 1.5,
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
        "cpu_tflops": 1,
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
        "cpu_tflops": 0.5,
        "storage_read_gbps": 1,
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
}


def make_node(name: str, preset: str, **overrides: Any) -> NodeCapacity:
    """A simulated node from a preset, with optional field overrides (GiB fields in GiB)."""
    if preset not in GPU_PRESETS:
        raise ValueError(f"unknown GPU preset {preset!r}; known: {', '.join(sorted(GPU_PRESETS))}")
    spec = {**GPU_PRESETS[preset], **overrides}
    return NodeCapacity(
        name=name,
        gpu_type=str(spec["gpu_type"]),
        gpu_memory_bytes=int(float(spec["gpu_memory_gib"]) * GIB),
        host_memory_bytes=int(float(spec["host_memory_gib"]) * GIB),
        host_to_device_gbps=float(spec["host_to_device_gbps"]),
        hbm_gbps=float(spec["hbm_gbps"]),
        host_memory_gbps=float(spec["host_memory_gbps"]),
        gpu_tflops=float(spec["gpu_tflops"]),
        cpu_tflops=float(spec["cpu_tflops"]),
        storage_read_gbps=float(spec["storage_read_gbps"]),
        reserved_gpu_bytes=int(float(spec.get("reserved_gpu_gib", 1.0)) * GIB),
        cordoned=bool(spec.get("cordoned", False)),
    )


def parse_cluster(spec: str | list[dict[str, Any]]) -> list[NodeCapacity]:
    """Nodes from ``"h100-pcie5:2,l4:1"``, a YAML file path, or a list of ``{preset, count, name, ...}``."""
    if isinstance(spec, str):
        path = Path(spec)
        if path.suffix in (".yaml", ".yml", ".json") and path.exists():
            loaded = yaml.safe_load(path.read_text())
            entries = loaded["cluster"] if isinstance(loaded, dict) and "cluster" in loaded else loaded
            return parse_cluster(entries)
        entries = []
        for part in spec.split(","):
            preset_name, _, count_text = part.strip().partition(":")
            entries.append({"preset": preset_name, "count": int(count_text or 1)})
        return parse_cluster(entries)
    nodes: list[NodeCapacity] = []
    for entry in spec:
        entry = dict(entry)
        preset = entry.pop("preset")
        count = int(entry.pop("count", 1))
        base_name = entry.pop("name", preset)
        for i in range(count):
            nodes.append(make_node(f"{base_name}-{i}" if count > 1 else base_name, preset, **entry))
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError("cluster has duplicate node names")
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
        if self.idle_after_seconds is not None and not self.idle_after_seconds > 0:
            raise ValueError(f"{self.name}: idle_after_seconds must be > 0, got {self.idle_after_seconds}")

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


def family_for_name(name: str) -> str:
    """The model family a bare trace name refers to (``team/llama-8b-chat`` → ``llama-8b``)."""
    lowered = name.lower()
    for family in sorted(MODEL_FAMILIES, key=len, reverse=True):
        if family in lowered:
            return family
    return "llama-8b"


def parse_models(entries: list[dict[str, Any]]) -> list[SimModel]:
    """Models from scenario entries ``{name, family, priority, slo, max_offload_fraction, count, ...}``."""
    models: list[SimModel] = []
    for raw in entries:
        entry = dict(raw)
        count = int(entry.pop("count", 1))
        base_name = str(entry.pop("name"))
        family = str(entry.pop("family", family_for_name(base_name)))
        if family not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(MODEL_FAMILIES))}")
        if "allowed_modes" in entry:
            entry["allowed_modes"] = tuple(entry["allowed_modes"])
        for i in range(count):
            name = f"{base_name}-{i}" if count > 1 else base_name
            models.append(SimModel(name=name, family=family, **entry))
    return models


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


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML file (see ``simulator/scenarios/``)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    return scenario_from_dict(data, default_name=path.stem)


def scenario_from_dict(data: dict[str, Any], default_name: str = "scenario") -> Scenario:
    """Build a scenario from its parsed YAML."""
    return Scenario(
        name=str(data.get("name", default_name)),
        description=str(data.get("description", "")),
        nodes=parse_cluster(data["cluster"]),
        models=parse_models(data["models"]),
        workload=dict(data.get("workload", {})),
        trace_path=data.get("trace"),
        duration_seconds=float(data.get("duration_seconds", 600.0)),
        seed=int(data.get("seed", 0)),
        ttft_slo_seconds=float(data.get("ttft_slo_seconds", 10.0)),
        queue_timeout_seconds=float(data.get("queue_timeout_seconds", 30.0)),
        extra=bool(data.get("extra", False)),
    )
