"""What the report ran on (GPU, driver, CUDA, torch, PCIe link, CPU, host memory) and its bandwidths."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from residency_worker.engine.tiers import GpuTier, measure_host_to_device_peak
from residency_worker.engine.types import TransferTiming


@dataclass(frozen=True)
class Environment:
    gpu_name: str
    emulated: bool
    driver: str | None
    cuda: str | None
    torch: str
    transformers: str
    pcie_generation: int | None
    pcie_max_generation: int | None
    pcie_width: int | None
    gpu_memory_bytes: int
    cpu: str
    cpu_count: int
    host_memory_bytes: int


def _nvml() -> dict[str, Any]:
    """Driver and PCIe link facts from NVML (empty when there is no NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        driver = pynvml.nvmlSystemGetDriverVersion()
        facts: dict[str, Any] = {"driver": driver.decode() if isinstance(driver, bytes) else str(driver)}
        for key, query in (
            ("pcie_generation", pynvml.nvmlDeviceGetCurrPcieLinkGeneration),
            ("pcie_max_generation", pynvml.nvmlDeviceGetMaxPcieLinkGeneration),
            ("pcie_width", pynvml.nvmlDeviceGetCurrPcieLinkWidth),
        ):
            try:
                facts[key] = int(query(handle))
            except pynvml.NVMLError:  # some virtualised GPUs hide the link
                facts[key] = None
        return facts
    except Exception:  # no NVML library or no GPU: the report says unknown
        return {}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(tier: GpuTier) -> Environment:
    import transformers

    nvml = _nvml() if tier.device.type == "cuda" else {}
    gpu_memory = (
        torch.cuda.get_device_properties(tier.device).total_memory
        if tier.device.type == "cuda"
        else tier.budget_bytes
    )
    return Environment(
        gpu_name=tier.gpu_name,
        emulated=tier.emulated,
        driver=nvml.get("driver"),
        cuda=torch.version.cuda if tier.device.type == "cuda" else None,
        torch=torch.__version__,
        transformers=transformers.__version__,
        pcie_generation=nvml.get("pcie_generation"),
        pcie_max_generation=nvml.get("pcie_max_generation"),
        pcie_width=nvml.get("pcie_width"),
        gpu_memory_bytes=int(gpu_memory),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count() or 1,
        host_memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    )


@dataclass(frozen=True)
class Bandwidths:
    """The node's measured ceilings, as a NodeProfile reports them (GB/s = 1e9 bytes/s)."""

    pinned_host_to_device: TransferTiming
    pageable_host_to_device: TransferTiming
    device_read_gbps: float
    host_read_gbps: float


def read_gbps(device: torch.device, size_bytes: int, trials: int = 3) -> float:
    """Memory read bandwidth of `device`: a reduction over a large buffer, best of a few."""
    data = torch.ones(max(size_bytes // 4, 1), dtype=torch.float32, device=device)
    data.sum()
    best = float("inf")
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        data.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del data
    return size_bytes / best / 1e9


def measure_bandwidths(tier: GpuTier, pageable_tier: GpuTier, size_bytes: int, trials: int) -> Bandwidths:
    """Pinned and pageable host→device peaks (one big copy each) and device/host memory read rates."""
    return Bandwidths(
        pinned_host_to_device=measure_host_to_device_peak(tier, size_bytes, trials=trials),
        pageable_host_to_device=measure_host_to_device_peak(pageable_tier, size_bytes, trials=trials),
        device_read_gbps=read_gbps(tier.device, size_bytes, trials),
        host_read_gbps=read_gbps(torch.device("cpu"), size_bytes, trials),
    )
