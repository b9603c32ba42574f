"""The baselines the simulator compares residency against, each as strong as users run it today.

Every baseline is served by the same simulated worker as residency (decode paced to the SLO while a
neighbour has requests waiting, see :class:`~residency_operator.simulator.engine.Policy`) and may keep
weights in the same pinned host memory, so that what differs is the placement policy alone.

- ``lru-evict``: whole models, loaded on first request; when a model does not fit, the least recently
  used idle models on a node are evicted (ModelMesh / Ollama behaviour). ``preemptible: false`` models are
  never evicted; an evicted model keeps its weights in the node's host memory while it fits (least
  recently used host copies go first), so its next load is a resume at link speed, not a cold load.
- ``sleep-swap``: every model has a home node and starts asleep in its pinned host memory; a request
  wakes it whole at link speed, putting the least recently used idle awake models of that node to sleep
  to make room (vLLM sleep mode level 1, AIBrix, Ollama's keep-alive with a host cache).
- ``uniform-offload``: every model that fits is loaded once, each node's models at one resident fraction,
  the highest their node's memory allows (what a static per-server offload setting gives); models are
  spread so each fits at its smallest allowed residency, the highest priorities first.
- ``binpack``: whole models, placed once first-fit in priority order; the rest queue forever.
"""

from __future__ import annotations

from residency_operator.planner.options import (
    cached_host_bytes,
    gpu_bytes_needed,
    host_bytes_needed,
    usable_gpu_bytes,
    usable_host_bytes,
)
from residency_operator.planner.types import NodeCapacity
from residency_operator.simulator.engine import Simulation
from residency_operator.simulator.runtime import ModelRuntime


def waiting_models(sim: Simulation) -> list[ModelRuntime]:
    """Models with requests waiting that do not run, oldest request first."""
    return sorted(
        (r for r in sim.models.values() if r.queue and r.node is None),
        key=lambda r: (r.queue[0].arrival_seconds, r.spec.name),
    )


def idle_on(sim: Simulation, node_name: str) -> list[ModelRuntime]:
    """Running models on a node with nothing queued or in flight that may be stopped, least recently used
    first (``preemptible: false`` ones never are)."""
    return sorted(
        (
            r
            for r in sim.models.values()
            if r.node == node_name and not r.active and not r.queue and r.spec.preemptible
        ),
        key=lambda r: (r.last_used_seconds, r.spec.name),
    )


def release_to_host(sim: Simulation, runtime: ModelRuntime) -> None:
    """Stop a running model, keeping its weights in its node's host memory if they fit there, after
    dropping the least recently used host copies of models that do not run; else evict it."""
    node_name = runtime.node
    assert node_name is not None
    need = cached_host_bytes(runtime.demand, 0)
    # Its own offloaded bytes are already in host memory; stopping frees them for the copy.
    free_host = sim.free_bytes(node_name)[1] + host_bytes_needed(runtime.demand, runtime.resident_fraction)
    if free_host < need:
        cached = sorted(
            (r for r in sim.models.values() if r.node is None and r.cached_node == node_name and not r.queue),
            key=lambda r: (r.last_used_seconds, r.spec.name),
        )
        for other in cached:
            if free_host >= need:
                break
            free_host += cached_host_bytes(other.demand, 0)
            sim.preempt(other.spec.name, keep_cache=False)
    sim.preempt(runtime.spec.name, keep_cache=free_host >= need)


class LruEvictPolicy:
    """Whole models on demand; evict least recently used idle models to make room, weights kept in host
    memory while it fits."""

    name = "lru-evict"
    paces_decode = True

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Load every model with waiting requests, oldest request first, evicting LRU idle models."""
        for runtime in waiting_models(sim):
            need_gpu = gpu_bytes_needed(runtime.demand, 1.0, "stream")
            target = self._node_with_room(sim, runtime, need_gpu)
            if target is None:
                target = self._evict_for(sim, runtime, need_gpu)
            if target is not None:
                sim.place(runtime.spec.name, target, 1.0, "stream")

    @staticmethod
    def _node_with_room(sim: Simulation, runtime: ModelRuntime, need_gpu: int) -> str | None:
        # The node holding its host copy first: waking it there is a resume, not a cold load.
        nodes = sorted(sim.nodes, key=lambda n: n.name != runtime.cached_node)
        for node in nodes:
            if node.accepts_work and sim.free_bytes(node.name)[0] >= need_gpu:
                return node.name
        return None

    @staticmethod
    def _evict_for(sim: Simulation, runtime: ModelRuntime, need_gpu: int) -> str | None:
        best: tuple[bool, float, str, list[ModelRuntime]] | None = None
        for node in sim.nodes:
            if not node.accepts_work or usable_gpu_bytes(node) < need_gpu:
                continue
            free_gpu = sim.free_bytes(node.name)[0]
            victims: list[ModelRuntime] = []
            for victim in idle_on(sim, node.name):
                if free_gpu >= need_gpu:
                    break
                victims.append(victim)
                free_gpu += gpu_bytes_needed(victim.demand, victim.resident_fraction, victim.mode)
            if free_gpu < need_gpu:
                continue
            newest_victim_use = max((v.last_used_seconds for v in victims), default=-1.0)
            key = (node.name != runtime.cached_node, newest_victim_use, node.name)
            if best is None or key < best[:3]:
                best = (*key, victims)
        if best is None:
            return None
        for victim in best[3]:
            release_to_host(sim, victim)
        return best[2]


class SleepSwapPolicy:
    """Each model lives on a home node, asleep in pinned host memory until a request wakes it whole."""

    name = "sleep-swap"
    paces_decode = True

    def __init__(self) -> None:
        self.home: dict[str, str] = {}

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Wake models with requests waiting, oldest request first, putting LRU idle ones to sleep."""
        if not self.home:
            self.home = assign_homes(sim)
        for runtime in waiting_models(sim):
            home = self.home.get(runtime.spec.name)
            if home is None or not sim.node_by_name[home].accepts_work:
                continue
            need_gpu = gpu_bytes_needed(runtime.demand, 1.0, "stream")
            free_gpu = sim.free_bytes(home)[0]
            sleepers: list[ModelRuntime] = []
            for other in idle_on(sim, home):
                if free_gpu >= need_gpu:
                    break
                sleepers.append(other)
                free_gpu += gpu_bytes_needed(other.demand, other.resident_fraction, other.mode)
            if free_gpu < need_gpu:
                continue
            for other in sleepers:
                sim.preempt(other.spec.name, keep_cache=True)
            sim.place(runtime.spec.name, home, 1.0, "stream")


def assign_homes(sim: Simulation) -> dict[str, str]:
    """A home node for every model whose weights fit some node's GPU whole, largest first, each onto the
    node whose GPU memory is least claimed so far (per byte) and whose host memory still holds its copy;
    the models start asleep there. A model that fits no node has no home and never runs."""
    nodes = [n for n in sim.nodes if n.accepts_work]
    claimed = {n.name: 0 for n in nodes}
    host_left = {n.name: usable_host_bytes(n) for n in nodes}
    homes: dict[str, str] = {}
    runtimes = sorted(sim.models.values(), key=lambda r: (-r.demand.weight_bytes, r.spec.name))
    for runtime in runtimes:
        need_gpu = gpu_bytes_needed(runtime.demand, 1.0, "stream")
        need_host = cached_host_bytes(runtime.demand, 0)
        fitting = [n for n in nodes if usable_gpu_bytes(n) >= need_gpu and host_left[n.name] >= need_host]
        if not fitting:
            continue
        node = min(fitting, key=lambda n: ((claimed[n.name] + need_gpu) / usable_gpu_bytes(n), n.name))
        claimed[node.name] += need_gpu
        host_left[node.name] -= need_host
        homes[runtime.spec.name] = node.name
        sim.stage_in_host(runtime.spec.name, node.name)
    return homes


UNIFORM_LEVELS = tuple(step / 20 for step in range(1, 21))
"""Resident fractions uniform-offload chooses among (5% steps)."""


class UniformOffloadPolicy:
    """Every model that fits loaded once, each node's models at one resident fraction, as high as its
    memory allows."""

    name = "uniform-offload"
    paces_decode = True

    def __init__(self, levels: tuple[float, ...] = UNIFORM_LEVELS) -> None:
        self.levels = levels
        self._placed = False

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Place everything once, at the start."""
        if self._placed:
            return
        self._placed = True
        for node_name, members in uniform_assignment(sim).items():
            fraction = self._uniform_fraction(sim.node_by_name[node_name], members)
            for runtime in members:
                sim.place(
                    runtime.spec.name,
                    node_name,
                    max(fraction, runtime.demand.min_resident_fraction),
                    "stream",
                )

    def _uniform_fraction(self, node: NodeCapacity, members: list[ModelRuntime]) -> float:
        """The highest level at which the node's models (none below its smallest allowed residency) fit."""
        for fraction in sorted(self.levels, reverse=True):
            levels = [max(fraction, r.demand.min_resident_fraction) for r in members]
            gpu = sum(gpu_bytes_needed(r.demand, f, "stream") for r, f in zip(members, levels, strict=True))
            host = sum(host_bytes_needed(r.demand, f) for r, f in zip(members, levels, strict=True))
            if gpu <= usable_gpu_bytes(node) and host <= usable_host_bytes(node):
                return fraction
        return 0.0  # unreachable: the assignment fits every member at its smallest residency


def uniform_assignment(sim: Simulation) -> dict[str, list[ModelRuntime]]:
    """Models onto nodes, highest priority first (then largest), each where it fits at its smallest allowed
    residency and the node's GPU memory is least claimed (per byte); a model that fits nowhere is left out,
    so the ones left out are the lowest priorities."""
    nodes = [n for n in sim.nodes if n.accepts_work]
    gpu_left = {n.name: usable_gpu_bytes(n) for n in nodes}
    host_left = {n.name: usable_host_bytes(n) for n in nodes}
    assignment: dict[str, list[ModelRuntime]] = {n.name: [] for n in nodes}
    for runtime in sorted(
        sim.models.values(), key=lambda r: (-r.spec.priority, -r.demand.weight_bytes, r.spec.name)
    ):
        level = runtime.demand.min_resident_fraction
        need_gpu = gpu_bytes_needed(runtime.demand, level, "stream")
        need_host = host_bytes_needed(runtime.demand, level)
        fitting = [n for n in nodes if gpu_left[n.name] >= need_gpu and host_left[n.name] >= need_host]
        if not fitting:
            continue
        node = max(fitting, key=lambda n: ((gpu_left[n.name] - need_gpu) / usable_gpu_bytes(n), n.name))
        gpu_left[node.name] -= need_gpu
        host_left[node.name] -= need_host
        assignment[node.name].append(runtime)
    return {name: members for name, members in assignment.items() if members}


class BinpackPolicy:
    """Whole models, first-fit once in priority order; the rest never run."""

    name = "binpack"
    paces_decode = True

    def __init__(self) -> None:
        self._placed = False

    def step(self, sim: Simulation, now_seconds: float) -> None:
        """Place once, at the start."""
        if self._placed:
            return
        self._placed = True
        for runtime in sorted(sim.models.values(), key=lambda r: (-r.spec.priority, r.spec.name)):
            need = gpu_bytes_needed(runtime.demand, 1.0, "stream")
            for node in sim.nodes:
                if node.accepts_work and sim.free_bytes(node.name)[0] >= need:
                    sim.place(runtime.spec.name, node.name, 1.0, "stream")
                    break
