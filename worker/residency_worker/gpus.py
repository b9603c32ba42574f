"""The GPUs a worker drives: which ones (``--gpus`` / ``--emulated-gpus``), and what its NodeProfile says
about each (memory budget, measured HBM and host→device GB/s), the host links they share (measured
concurrently) and GPU-to-GPU copies.

Host links: on CUDA, GPUs whose NUMA node pynvml reports alike are taken to share one host link (the CPU
socket's PCIe root complex: the link a host→device copy crosses). Without NUMA information each GPU has its
own link. Emulated GPUs all copy from one host memory: they share one link, and its concurrent bandwidth is
measured like a real one's (everything about them says emulated).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from residency.split import GpuShares
from residency_worker.engine.tiers import GpuTier, make_gpu_tier, make_gpu_tiers, parse_bytes, synchronize
from residency_worker.engine.types import EngineError, NodeReport, ResidencyReport

log = logging.getLogger(__name__)


def build_tiers(
    gpus: str | None, emulated_gpus: int | None, gpu_memory: str | None, *, emulate: bool = False
) -> list[GpuTier]:
    """The worker's GPU tiers from its flags (raises ValueError with a message naming what is wrong).

    ``gpus``: ``all`` or CUDA ordinals ``0,2`` (numbered 0..n-1 in that order); ``emulated_gpus``: that many
    CPU-emulated GPUs; neither: the current CUDA GPU, or one emulated GPU without CUDA (or with ``emulate``).
    ``gpu_memory``: one budget for each GPU, or a comma-separated budget per GPU.
    """
    budgets: list[int | None] = (
        [parse_bytes(part) for part in gpu_memory.split(",")] if gpu_memory else [None]
    )
    if gpus is not None and (emulated_gpus is not None or emulate):
        raise ValueError("--gpus names real GPUs: drop --emulated-gpus / --emulate, or drop --gpus")
    if emulated_gpus is not None:
        return make_gpu_tiers(budgets, emulated_count=emulated_gpus)
    if gpus is not None:
        devices = None if gpus.strip().lower() == "all" else _ordinals(gpus)
        return make_gpu_tiers(budgets, devices=devices)
    if len(budgets) > 1:
        raise ValueError(
            f"{len(budgets)} GPU memory budgets for one GPU: name the GPUs (--gpus/--emulated-gpus)"
        )
    return [make_gpu_tier(budgets[0], force_emulated=emulate)]


def _ordinals(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpus takes 'all' or CUDA indices like 0,2, not {text!r}") from None


def measure_copy_gbps(device: torch.device, size_bytes: int = 64 * 2**20, trials: int = 3) -> float:
    """Best of a few same-device copies (device memory bandwidth: read + write counted once each way)."""
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(trials):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best / 1e9


def host_link_groups(tiers: list[GpuTier]) -> dict[int, list[GpuTier]]:
    """Host link id → the GPUs behind it (see the module's docstring for how links are found)."""
    if not tiers or tiers[0].emulated:
        return {0: list(tiers)}
    numa = [_numa_node(tier) for tier in tiers]
    if any(node is None for node in numa):
        return {i: [tier] for i, tier in enumerate(tiers)}
    groups: dict[int, list[GpuTier]] = {}
    order = sorted(set(n for n in numa if n is not None))
    for tier, node in zip(tiers, numa, strict=True):
        groups.setdefault(order.index(node or 0), []).append(tier)
    return groups


def _numa_node(tier: GpuTier) -> int | None:
    """The NUMA node of a CUDA GPU's PCIe root as NVML reports it, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(tier.device.index or 0)
        node = int(pynvml.nvmlDeviceGetNumaNodeId(handle))
        return node if node >= 0 else None
    except Exception as exc:  # no pynvml, an old driver, or no NUMA id: one link per GPU
        log.debug("no NUMA node for GPU %d: %s", tier.index, exc)
        return None


def measure_concurrent_h2d_gbps(tiers: list[GpuTier], size_bytes: int = 64 * 2**20) -> float:
    """Aggregate host→device GB/s with every GPU of ``tiers`` copying at the same time (each its own buffer,
    from its own host buffer, on its own thread)."""
    free = [max(t.budget_bytes - t.reserved_bytes(), 0) // 4 for t in tiers]
    size_bytes = max(64 * 2**10, min([size_bytes, *free]))
    owner = "_calibration_link"
    pairs = []
    try:
        for tier in tiers:
            tier.reserve(owner, size_bytes)
            host = tier.host_empty((size_bytes,), torch.uint8)
            host.fill_(1)
            pairs.append((tier, tier.allocate(owner, "calibration", (size_bytes,), torch.uint8), host))
        for tier, device, host in pairs:  # warm-up
            device.copy_(host, non_blocking=True)
            tier.synchronize()
        best = float("inf")
        for _ in range(2):
            barrier = threading.Barrier(len(pairs) + 1)

            def copy(tier: GpuTier, device: torch.Tensor, host: torch.Tensor, go: threading.Barrier) -> None:
                go.wait()
                device.copy_(host, non_blocking=True)
                tier.synchronize()

            threads = [threading.Thread(target=copy, args=(*pair, barrier)) for pair in pairs]
            for thread in threads:
                thread.start()
            start = time.perf_counter()
            barrier.wait()
            for thread in threads:
                thread.join()
            best = min(best, time.perf_counter() - start)
        return len(pairs) * size_bytes / max(best, 1e-9) / 1e9
    finally:
        for tier, device, _ in pairs:
            tier.release(device)
        for tier in tiers:
            tier.unreserve(owner)


def measure_device_to_device_gbps(first: GpuTier, second: GpuTier, size_bytes: int = 64 * 2**20) -> float:
    """GB/s of one copy from ``first`` to ``second`` (what a split's activations cross between stages)."""
    size_bytes = max(64 * 2**10, min(size_bytes, first.budget_bytes // 4, second.budget_bytes // 4))
    source = torch.ones(size_bytes, dtype=torch.uint8, device=first.device)
    target = torch.empty(size_bytes, dtype=torch.uint8, device=second.device)
    best = float("inf")
    for _ in range(3):
        first.synchronize()
        second.synchronize()
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        first.synchronize()
        second.synchronize()
        best = min(best, time.perf_counter() - start)
    return size_bytes / max(best, 1e-9) / 1e9


def gpu_profile_fields(tiers: list[GpuTier], report: NodeReport, host_gbps: float) -> dict[str, Any]:
    """The NodeProfile fields of a worker's GPUs: ``gpus`` (each measured), ``hostLinks`` (shared links with
    their concurrent GB/s), ``deviceToDeviceGbps`` (with several GPUs), and the node-level sums and counts."""
    gpus: list[dict[str, Any]] = []
    links = host_link_groups(tiers)
    link_of = {tier.index: link for link, members in links.items() for tier in members}
    peaks = {gpu.index: gpu.host_to_device_peak for gpu in report.gpus}
    live = [tier for tier in tiers if tier.lost is None]
    for tier in live:
        peak = peaks.get(tier.index)
        # an emulated GPU's "HBM" is the same DRAM: one measurement, not one noisy one per GPU
        hbm = host_gbps if tier.emulated else measure_copy_gbps(tier.device)
        entry: dict[str, Any] = {
            "index": tier.index,
            "name": tier.gpu_name,
            "memoryBytes": tier.budget_bytes,
            "hbmGbps": round(hbm, 4),
            "hostToDeviceGbps": round(peak.gbps if peak else 1.0, 4),
            "hostLink": link_of[tier.index],
        }
        numa = None if tier.emulated else _numa_node(tier)
        if numa is not None:
            entry["numaNode"] = numa
        gpus.append(entry)
    fields: dict[str, Any] = {
        "gpuCount": max(1, len(live)),
        "gpuMemoryBytes": sum(tier.budget_bytes for tier in live),
        "gpus": gpus,
    }
    host_links = []
    for link, members in sorted(links.items()):
        alive = [tier for tier in members if tier.lost is None]
        if len(alive) > 1:
            try:
                gbps = measure_concurrent_h2d_gbps(alive)
            except EngineError as exc:  # no room left to measure with: the link is left out of hostLinks
                log.warning("cannot measure host link %d: %s", link, exc.message)
                continue
            host_links.append(
                {"id": link, "gpus": [t.index for t in alive], "concurrentHostToDeviceGbps": round(gbps, 4)}
            )
    if host_links:
        fields["hostLinks"] = host_links
    if len(live) > 1:
        fields["deviceToDeviceGbps"] = round(measure_device_to_device_gbps(live[0], live[1]), 4)
    return fields


def refresh_gpu_fields(spec: dict[str, Any], engine: Any) -> bool:
    """Brings a registered profile's GPU fields in line with the engine without measuring again: budgets
    changed at runtime, GPUs lost (they leave ``gpus``, ``hostLinks`` and the sums). True when it changed."""
    live = [tier for tier in engine.tiers if tier.lost is None]
    before = {key: spec.get(key) for key in ("gpuMemoryBytes", "gpuCount", "gpus", "hostLinks")}
    spec["gpuMemoryBytes"] = sum(tier.budget_bytes for tier in live)
    if "gpus" in spec:
        budgets = {tier.index: tier.budget_bytes for tier in live}
        spec["gpus"] = [
            {**gpu, "memoryBytes": budgets[gpu["index"]]} for gpu in spec["gpus"] if gpu["index"] in budgets
        ]
        spec["gpuCount"] = max(1, len(spec["gpus"]))
        links = []
        for link in spec.get("hostLinks", []):
            members = [index for index in link["gpus"] if index in budgets]
            if len(members) > 1:
                links.append({**link, "gpus": members})
        if links or "hostLinks" in spec:
            spec["hostLinks"] = links
        if len(spec["gpus"]) < 2:
            spec.pop("deviceToDeviceGbps", None)
    return before != {key: spec.get(key) for key in before}


# -- a placement's GPUs -------------------------------------------------------------------------------
def placement_gpus(spec: dict[str, Any]) -> GpuShares:
    """``spec.gpus`` of a ModelPlacement as (index, share) pairs in pipeline order (empty: GPU 0 alone)."""
    return tuple(
        (int(gpu["index"]), float(gpu.get("residentFraction", 0.0))) for gpu in spec.get("gpus") or []
    )


def gpus_changed(spec: dict[str, Any], held: ResidencyReport, tolerance: float) -> bool:
    """Whether the placement asks for other GPUs, another order, or (split) other shares than it has."""
    wanted = placement_gpus(spec) or ((0, float(spec["residentFraction"])),)
    have = [(gpu.index, gpu.requested_fraction) for gpu in held.gpus]
    have = have or [(0, held.requested_fraction)]
    if [index for index, _ in wanted] != [index for index, _ in have]:
        return True
    return len(wanted) > 1 and any(
        abs(a - b) > tolerance for (_, a), (_, b) in zip(wanted, have, strict=True)
    )


def gpus_wire(residency: ResidencyReport) -> list[dict[str, Any]]:
    """``status.gpus`` of a placement: what each GPU of its pipeline holds, measured."""
    return [
        {
            "index": gpu.index,
            "residentFraction": round(gpu.resident_fraction, 6),
            "residentBytes": gpu.resident_bytes,
        }
        for gpu in residency.gpus
    ]
