"""The GPUs of simulated nodes: what a model runs on, what it occupies, and what a split really costs.

A node of one GPU is one device, named as the node. A multi-GPU node (``NodeCapacity.gpus``) is one device
per GPU (``h100x8-0/3``); a model runs on a *unit*: one of them, or several of one node in pipeline order
(``h100x8-0/0,1``). Models whose units share a GPU take turns on it. The node's host memory is shared by
all its GPUs.

This is the simulator's own engine for splits, not the planner's (planner/gpus.py plans with a static
link share and a fixed hop): the stages of a split read their layers one after another (each at its GPU's
bandwidth), every stage boundary passes the batch's hidden states device to device (a per-hop latency plus
the bytes over the measured GPU-to-GPU bandwidth, the hidden size read off the model's layer size), and a
host link several GPUs share is divided among the models streaming through it *now* — one alone gets its
GPU's full link, two each get half the link's concurrent bandwidth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from residency_operator.planner.options import usable_gpu_bytes, usable_host_bytes
from residency_operator.planner.types import GB, GpuCapacity, ModelDemand, NodeCapacity

SIM_HOP_LATENCY_SECONDS = 30e-6
"""One activation send/receive between GPUs (NCCL-style point-to-point on NVLink or PCIe P2P)."""
SIM_STAGE_WORKSPACE_BYTES = 512 * 1024**2
"""Activations and allocator slack each further stage of a split holds on its GPU."""


@dataclass(frozen=True, slots=True)
class Unit:
    """A set of GPUs of one node a model runs on."""

    name: str
    machine: str
    gpus: tuple[int, ...]
    """GPU indices in pipeline order; ``()`` for a single-GPU node."""
    devices: tuple[str, ...]
    """Device names of its GPUs (the node's name for a single-GPU node)."""
    node: NodeCapacity
    """What the engine sees: the GPUs' memory together, the slowest stage's HBM, one GPU's link alone."""
    usable: tuple[int, ...]
    """Usable GPU bytes of each of its GPUs."""
    link: int | None
    """The host link the offloaded remainder streams over (its first GPU's); ``None`` on a single GPU."""


def hidden_size(model: ModelDemand) -> float:
    """Hidden size of a transformer whose layer holds ``bytes_per_layer`` bf16 weights (about 12 h²)."""
    return math.sqrt(max(1.0, model.effective_bytes_per_layer / 2 / 12))


class Topology:
    """Devices and units of a simulated fleet."""

    def __init__(self, machines: Sequence[NodeCapacity]) -> None:
        self.machines = list(machines)
        self.machine_by_name = {m.name: m for m in self.machines}
        self.devices: list[NodeCapacity] = []
        self._units: dict[str, Unit] = {}
        for machine in self.machines:
            if len(machine.gpus) > 1:
                for gpu in machine.gpus:
                    unit = self._make_unit(machine, (gpu.index,))
                    self.devices.append(unit.node)
            else:
                unit = Unit(
                    machine.name,
                    machine.name,
                    (),
                    (machine.name,),
                    machine,
                    (usable_gpu_bytes(machine),),
                    None,
                )
                self._units[machine.name] = unit
                self.devices.append(machine)
        self.multi_gpu = any(len(m.gpus) > 1 for m in self.machines)

    def unit(self, name: str) -> Unit:
        """The unit of a device or GPU-set name (``node``, ``node/2`` or ``node/0,1``)."""
        found = self._units.get(name)
        if found is not None:
            return found
        machine_name, _, indices = name.partition("/")
        machine = self.machine_by_name.get(machine_name)
        if machine is None or not indices:
            raise KeyError(name)
        return self._make_unit(machine, tuple(int(i) for i in indices.split(",")))

    def unit_name(self, machine: str, gpus: Sequence[int]) -> str:
        """The unit a placement names (a single-GPU node: the node itself)."""
        if not gpus or len(self.machine_by_name[machine].gpus) <= 1:
            return machine
        return f"{machine}/{','.join(str(g) for g in gpus)}"

    def _make_unit(self, machine: NodeCapacity, gpus: tuple[int, ...]) -> Unit:
        by_index: dict[int, GpuCapacity] = {g.index: g for g in machine.gpus}
        unknown = [i for i in gpus if i not in by_index]
        if unknown or len(set(gpus)) != len(gpus):
            raise KeyError(f"{machine.name} has no GPU(s) {unknown or gpus}")
        members = [by_index[i] for i in gpus]
        name = f"{machine.name}/{','.join(str(i) for i in gpus)}"
        node = dataclasses.replace(
            machine,
            name=name,
            gpu_memory_bytes=sum(g.memory_bytes for g in members),
            reserved_gpu_bytes=sum(g.reserved_bytes for g in members),
            hbm_gbps=min(g.hbm_gbps for g in members),
            host_to_device_gbps=members[0].host_to_device_gbps,
            # Its GPUs' part of the node's host memory, for a policy that budgets each device on its own
            # (the simulator itself counts host memory per node: see Simulation.free_bytes).
            host_memory_bytes=machine.host_memory_bytes * len(gpus) // len(machine.gpus),
            reserved_host_bytes=machine.reserved_host_bytes * len(gpus) // len(machine.gpus),
            gpus=(),
            host_links=(),
            pipeline_hop_seconds=0.0,
        )
        unit = Unit(
            name,
            machine.name,
            gpus,
            tuple(f"{machine.name}/{i}" for i in gpus),
            node,
            tuple(g.usable_bytes for g in members),
            members[0].host_link,
        )
        self._units[name] = unit
        return unit

    def footprint(self, unit: Unit, gpu_bytes: int) -> list[tuple[str, int]]:
        """Bytes on each GPU of a unit holding a model of ``gpu_bytes`` (one GPU's worth of footprint):
        spread in proportion to the GPUs' memory, each further stage with its own workspace."""
        if len(unit.devices) == 1:
            return [(unit.devices[0], gpu_bytes)]
        total_bytes = gpu_bytes + (len(unit.devices) - 1) * SIM_STAGE_WORKSPACE_BYTES
        total_usable = sum(unit.usable) or 1
        return [
            (d, round(total_bytes * u / total_usable)) for d, u in zip(unit.devices, unit.usable, strict=True)
        ]

    def usable_gpu(self, device: str) -> int:
        """Usable bytes of one device."""
        return self.unit(device).usable[0]

    def usable_host(self, machine: str) -> int:
        """Usable host bytes of a node (shared by its GPUs)."""
        return usable_host_bytes(self.machine_by_name[machine])

    def hop_seconds(self, unit: Unit, model: ModelDemand, batch: int) -> float:
        """Seconds one decode step of ``batch`` sequences spends passing activations between the stages."""
        hops = len(unit.gpus) - 1
        if hops <= 0:
            return 0.0
        machine = self.machine_by_name[unit.machine]
        gbps = machine.device_to_device_gbps or min(g.host_to_device_gbps for g in machine.gpus)
        activation_bytes = 2.0 * hidden_size(model) * max(1, batch)
        return hops * (SIM_HOP_LATENCY_SECONDS + activation_bytes / (gbps * GB))

    def streaming_node(self, unit: Unit, streamers_on_link: int) -> NodeCapacity:
        """The unit's node with the link bandwidth it gets while ``streamers_on_link`` models (itself
        included) stream through its host link at once."""
        if unit.link is None or streamers_on_link <= 1:
            return unit.node
        machine = self.machine_by_name[unit.machine]
        link = next((h for h in machine.host_links if h.id == unit.link), None)
        if link is None:
            return unit.node
        share = min(unit.node.host_to_device_gbps, link.concurrent_host_to_device_gbps / streamers_on_link)
        return dataclasses.replace(unit.node, host_to_device_gbps=share)

    def link_key(self, unit: Unit) -> tuple[str, int] | None:
        """The (node, host link) a unit streams through, where a link is shared; ``None`` otherwise."""
        if unit.link is None:
            return None
        machine = self.machine_by_name[unit.machine]
        shared = any(h.id == unit.link and len(h.gpus) > 1 for h in machine.host_links)
        return (unit.machine, unit.link) if shared else None

    def serving_groups(
        self, serving: Sequence[tuple[str, float]]
    ) -> list[tuple[list[int], list[NodeCapacity]]]:
        """Of the models served this tick (unit name, resident fraction each), the indices of those that take
        turns on one GPU or overlapping GPU sets, each with the node it is served at: with its part of a
        shared host link, divided among the models that stream through it now (not fully resident)."""
        units = [self.unit(name) for name, _ in serving]
        keys = [
            self.link_key(unit) if fraction < 1.0 else None
            for (_, fraction), unit in zip(serving, units, strict=True)
        ]
        streaming: dict[tuple[str, int], int] = {}
        for key in keys:
            if key is not None:
                streaming[key] = streaming.get(key, 0) + 1
        nodes = [
            self.streaming_node(unit, streaming.get(key, 1) if key is not None else 1)
            for unit, key in zip(units, keys, strict=True)
        ]
        return [(group, [nodes[i] for i in group]) for group in sharing_groups(enumerate(units))]


def sharing_groups(units: Iterable[tuple[int, Unit]]) -> list[list[int]]:
    """Indices of the runtimes that take turns on one GPU or one set of GPUs: units sharing any GPU are in
    one group (union of overlapping sets), in order of first appearance."""
    parent: dict[str, str] = {}

    def find(device: str) -> str:
        while parent.setdefault(device, device) != device:
            parent[device] = parent[parent[device]]
            device = parent[device]
        return device

    members: list[tuple[int, Unit]] = list(units)
    for _, unit in members:
        first = find(unit.devices[0])
        for device in unit.devices[1:]:
            parent[find(device)] = first
    groups: dict[str, list[int]] = {}
    for index, unit in members:
        groups.setdefault(find(unit.devices[0]), []).append(index)
    return list(groups.values())
