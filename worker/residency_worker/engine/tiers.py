"""The GPU tier (real CUDA, or an emulated CPU memory pool with a declared budget) and pinned host memory.

Every GPU allocation of the engine goes through `GpuTier.allocate` and is charged to an owner's
reservation, so a placement that does not fit is refused up front instead of failing with OOM later.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

import torch

from residency_worker.engine.pacing import GpuPacer
from residency_worker.engine.types import EngineError, TransferPath, TransferTiming

log = logging.getLogger(__name__)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
    "t": 10**12,
    "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    """'8GiB' → 8589934592; accepts Kubernetes quantities (Gi, Mi) and plain byte counts."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8GiB, 512Mi, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def synchronize(device: torch.device) -> None:
    """Waits for all queued device work, so a clock read after it measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Allocation:
    owner: str
    kind: str
    nbytes: int
    tensor: torch.Tensor


class GpuTier:
    """The fast tier of one node: a byte budget, per-owner reservations and tracked allocations."""

    def __init__(
        self,
        device: torch.device,
        budget_bytes: int,
        *,
        emulated: bool,
        gpu_name: str,
        pin_host_memory: bool = True,
        index: int = 0,
    ) -> None:
        self.device = device
        self.index = index  # the worker's number for this GPU (position in --gpus / --emulated-gpus)
        self.lost: str | None = None  # why the GPU is gone (a CUDA error, a driver reset): nothing is placed
        self.fault: str | None = None  # fault injection (admin): the next probe fails with this
        # pinned host memory is what makes copies DMA at link speed; False measures the pageable path
        self._pin_host_memory = pin_host_memory
        self.budget_bytes = budget_bytes
        self.emulated = emulated
        self.gpu_name = gpu_name
        self._lock = threading.Lock()
        self._reservations: dict[str, int] = {}
        self._allocations: dict[int, _Allocation] = {}
        # emulated tier only: released blocks kept for reuse, as CUDA's caching allocator does, so
        # that a reload measures copies rather than the first-touch page faults of fresh CPU memory
        self._free_blocks: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._free_bytes = 0
        self.host_to_device_peak: TransferTiming | None = None
        self.pacer = GpuPacer()  # shares the GPU's time between the models on it, by their SLOs

    # -- reservations -------------------------------------------------------------------------------
    def reserved_bytes(self, owner: str | None = None) -> int:
        with self._lock:
            if owner is not None:
                return self._reservations.get(owner, 0)
            return sum(self._reservations.values())

    def reserve(self, owner: str, nbytes: int) -> None:
        """Sets `owner`'s reservation to `nbytes`, refusing if the node budget would be exceeded."""
        if self.lost is not None and nbytes > 0:
            raise EngineError(
                "GpuLost", f"GPU {self.index} is lost ({self.lost}): nothing can be placed on it"
            )
        with self._lock:
            others = sum(v for k, v in self._reservations.items() if k != owner)
            allocated = sum(a.nbytes for a in self._allocations.values() if a.owner == owner)
            if others + nbytes > self.budget_bytes:
                raise EngineError(
                    "PlacementDoesNotFit",
                    f"{owner} needs {nbytes} bytes of GPU memory but only {self.budget_bytes - others} of "
                    f"{self.label}'s {self.budget_bytes}-byte budget are free ({others} reserved by others)",
                )
            if allocated > nbytes:
                raise EngineError(
                    "PlacementDoesNotFit",
                    f"{owner} has {allocated} bytes allocated, more than the requested reservation {nbytes}",
                )
            if self.device.type == "cuda":
                driver_free_bytes, _ = torch.cuda.mem_get_info(self.device)
                # blocks torch's caching allocator holds but no tensor uses are free to us as well
                cached_bytes = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
                    self.device
                )
                free_bytes = driver_free_bytes + cached_bytes
                growth = nbytes - self._reservations.get(owner, 0)
                if growth > free_bytes:
                    raise EngineError(
                        "PlacementDoesNotFit",
                        f"{owner} needs {growth} more bytes but the GPU reports only {free_bytes} free",
                    )
            self._reservations[owner] = nbytes

    def unreserve(self, owner: str) -> None:
        with self._lock:
            leftover = [k for k, a in self._allocations.items() if a.owner == owner]
            for key in leftover:
                del self._allocations[key]
            self._reservations.pop(owner, None)

    def probe(self, *, deep: bool = False) -> str | None:
        """Why the GPU is unusable, or None when it works: a fault was injected, NVML reports the GPU lost
        (fallen off the bus, reset), or — ``deep``, after a CUDA error in a step — its CUDA context fails.
        The light probe makes no CUDA call, so it never disturbs a CUDA graph another thread is capturing."""
        if self.fault is not None:
            return self.fault
        if self.device.type != "cuda":
            return None
        lost = _nvml_lost(self.device)
        if lost is not None or not deep:
            return lost
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.mem_get_info(self.device)
        except RuntimeError as exc:  # a sticky CUDA error: this device's context in this process is gone
            return f"CUDA error: {exc}"
        return None

    @property
    def label(self) -> str:
        """How messages name this GPU: ``GPU 1`` (``the node`` would hide which one refused)."""
        return f"GPU {self.index}"

    # -- allocations --------------------------------------------------------------------------------
    def allocate(self, owner: str, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor on the fast tier, charged to `owner`'s reservation."""
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            used = sum(a.nbytes for a in self._allocations.values() if a.owner == owner)
            reserved = self._reservations.get(owner, 0)
            if used + nbytes > reserved:
                raise EngineError(
                    "PlacementDoesNotFit",
                    f"{owner}: allocating {nbytes} bytes of {kind} would exceed its GPU reservation "
                    f"({used} of {reserved} bytes in use)",
                )
        with self._lock:
            blocks = self._free_blocks.get((numel, dtype))
            block = blocks.pop() if blocks else None
            if block is not None:
                self._free_bytes -= nbytes
        tensor = (
            block.view(shape) if block is not None else torch.empty(shape, dtype=dtype, device=self.device)
        )
        with self._lock:
            self._allocations[tensor.data_ptr()] = _Allocation(owner, kind, nbytes, tensor)
        return tensor

    def release(self, tensor: torch.Tensor) -> None:
        """Returns an allocation to the pool; the caller must hold no views of it any more."""
        with self._lock:
            allocation = self._allocations.pop(tensor.data_ptr(), None)
            if allocation is None or not self.emulated or allocation.nbytes > self.budget_bytes // 4:
                return
            key = (allocation.tensor.numel(), allocation.tensor.dtype)
            self._free_blocks.setdefault(key, []).append(allocation.tensor.view(-1))
            self._free_bytes += allocation.nbytes
            while self._free_bytes > self.budget_bytes:  # bounded: drop the oldest kept blocks
                oldest = next(k for k, v in self._free_blocks.items() if v)
                dropped = self._free_blocks[oldest].pop(0)
                self._free_bytes -= dropped.numel() * dropped.element_size()

    def allocated_bytes(self, owner: str | None = None, kind: str | None = None) -> int:
        with self._lock:
            return sum(
                a.nbytes
                for a in self._allocations.values()
                if (owner is None or a.owner == owner) and (kind is None or a.kind == kind)
            )

    def tensors(self, owner: str, kind: str | None = None) -> list[torch.Tensor]:
        """The tensors that live in the pool for `owner` (what a residency report must agree with)."""
        with self._lock:
            return [
                a.tensor
                for a in self._allocations.values()
                if a.owner == owner and (kind is None or a.kind == kind)
            ]

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is (a view into) a pool allocation."""
        pointer = tensor.data_ptr()
        with self._lock:
            for allocation in self._allocations.values():
                start = allocation.tensor.data_ptr()
                if start <= pointer < start + allocation.nbytes:
                    return True
        return False

    # -- host side ----------------------------------------------------------------------------------
    @property
    def pins_host_memory(self) -> bool:
        return self.device.type == "cuda" and self._pin_host_memory

    @property
    def host_path(self) -> TransferPath:
        return "pinned" if self.pins_host_memory else "pageable"

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory for the weight/KV cache: pinned when a real GPU is there to DMA from it."""
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=self.pins_host_memory)

    def synchronize(self) -> None:
        synchronize(self.device)

    def empty_cache(self) -> None:
        """Hands cached, unused device memory back to the driver (other processes may need it)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def copy_streams(self, count: int) -> list[torch.cuda.Stream] | None:
        if self.device.type != "cuda":
            return None
        return [torch.cuda.Stream(self.device) for _ in range(count)]  # type: ignore[no-untyped-call]


def reserve_on(owner: str, needs: dict[GpuTier, int], *, grow_only: bool = False) -> None:
    """Sets ``owner``'s reservation on each tier, all or none: a refusal on one GPU restores what was set on
    the others. ``grow_only`` keeps a larger reservation already held (the middle of a live change)."""
    done: list[tuple[GpuTier, int]] = []
    try:
        for tier, nbytes in needs.items():
            held = tier.reserved_bytes(owner)
            tier.reserve(owner, max(nbytes, held) if grow_only else nbytes)
            done.append((tier, held))
    except Exception:
        for tier, held in done:
            if held:
                tier.reserve(owner, held)
            else:
                tier.unreserve(owner)
        raise


def make_gpu_tiers(
    budgets: list[int | None],
    *,
    devices: list[int] | None = None,
    emulated_count: int | None = None,
    pin_host_memory: bool = True,
) -> list[GpuTier]:
    """One tier per GPU the worker drives, numbered 0..n-1 in the order given.

    On CUDA, ``devices`` are the CUDA ordinals (None: all of them) and ``budgets`` has one entry (each GPU's;
    None: 90 % of its memory) or one per device. ``emulated_count`` GPUs instead are emulated on the CPU: one
    memory pool per GPU with its own budget, all in the same host memory (every report says emulated).
    """
    if emulated_count is not None:
        if devices is not None:
            raise ValueError("name real GPUs (--gpus) or emulated ones (--emulated-gpus), not both")
        if emulated_count < 1:
            raise ValueError(f"--emulated-gpus must be at least 1, got {emulated_count}")
        each = _per_gpu(budgets, emulated_count)
        if any(budget is None for budget in each):
            raise ValueError("an emulated GPU tier needs a declared budget (e.g. --gpu-memory 8GiB)")
        log.warning(
            "running %d EMULATED GPU tier(s) on the CPU: separate budgets (%s bytes) in one host memory",
            emulated_count,
            ", ".join(str(budget) for budget in each),
        )
        return [
            GpuTier(torch.device("cpu"), budget or 0, emulated=True, gpu_name="emulated-cpu", index=index)
            for index, budget in enumerate(each)
        ]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ordinals = list(range(count)) if devices is None else devices
    missing = [ordinal for ordinal in ordinals if not 0 <= ordinal < count]
    if missing or not ordinals:
        have = f"{count} CUDA GPU{'s' if count != 1 else ''}" + (f" (0..{count - 1})" if count else "")
        hint = "" if count else "; use --emulated-gpus N to emulate GPUs on the CPU"
        named = ", ".join(map(str, missing)) if missing else "none"
        raise ValueError(f"GPU {named} does not exist: this machine has {have}{hint}")
    if len(set(ordinals)) != len(ordinals):
        raise ValueError(f"a GPU is named more than once in {ordinals}")
    each = _per_gpu(budgets, len(ordinals))
    tiers = []
    for index, ordinal in enumerate(ordinals):
        device = torch.device("cuda", ordinal)
        total_bytes = torch.cuda.get_device_properties(device).total_memory
        name = _nvml_name(ordinal) or torch.cuda.get_device_name(device)
        budget = min(each[index] or total_bytes, total_bytes) if each[index] else int(total_bytes * 0.9)
        tiers.append(
            GpuTier(
                device, budget, emulated=False, gpu_name=name, pin_host_memory=pin_host_memory, index=index
            )
        )
    return tiers


def _per_gpu(budgets: list[int | None], count: int) -> list[int | None]:
    if len(budgets) == 1:
        return budgets * count
    if len(budgets) != count:
        raise ValueError(
            f"{len(budgets)} GPU memory budgets given for {count} GPUs (give one, or one per GPU)"
        )
    return list(budgets)


def make_gpu_tier(
    budget_bytes: int | None = None, *, force_emulated: bool = False, pin_host_memory: bool = True
) -> GpuTier:
    """The real GPU when there is one (budget defaults to its memory), otherwise an emulated CPU pool.

    `pin_host_memory=False` keeps the host caches pageable (slower copies): for measuring that path.
    """
    if torch.cuda.is_available() and not force_emulated:
        device = torch.device("cuda", torch.cuda.current_device())
        total_bytes = torch.cuda.get_device_properties(device).total_memory
        name = _nvml_name(device.index or 0) or torch.cuda.get_device_name(device)
        budget = min(budget_bytes, total_bytes) if budget_bytes else int(total_bytes * 0.9)
        return GpuTier(device, budget, emulated=False, gpu_name=name, pin_host_memory=pin_host_memory)
    if budget_bytes is None:
        raise ValueError("an emulated GPU tier needs a declared budget (e.g. --gpu-memory 8GiB)")
    log.warning(
        "no CUDA GPU: running with an EMULATED GPU tier (CPU memory pool, budget %d bytes)", budget_bytes
    )
    return GpuTier(torch.device("cpu"), budget_bytes, emulated=True, gpu_name="emulated-cpu")


def nvml_memory_bytes(device: torch.device) -> tuple[int, int] | None:
    """(used, total) bytes of the physical GPU as NVML sees them (all processes), or None."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device.index or 0))
        return int(info.used), int(info.total)
    except Exception as exc:  # no NVML library or no permission: torch's own numbers remain
        log.debug("NVML memory query failed: %s", exc)
        return None


def _nvml_lost(device: torch.device) -> str | None:
    """NVML's word that a GPU is gone (None: it answers, or NVML cannot tell)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML here: only a failed step can tell
        return None
    try:
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        handle = (
            pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            if uuid is not None
            else pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        )
        pynvml.nvmlDeviceGetMemoryInfo(handle)
    except pynvml.NVMLError as exc:
        if isinstance(exc, (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission)):
            return None
        return f"NVML: {exc}"
    except Exception as exc:  # torch or pynvml without these calls: nothing to tell
        log.debug("NVML probe of %s failed: %s", device, exc)
        return None
    return None


def _nvml_name(ordinal: int) -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(ordinal)
        name = pynvml.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:  # pynvml absent or no driver access: the torch name is good enough
        log.info("pynvml unavailable (%s); using torch's device name", exc)
        return None


def measure_host_to_device_peak(
    tier: GpuTier, size_bytes: int = 256 * 2**20, trials: int = 3
) -> TransferTiming:
    """The node's own pinned host→device bandwidth: best of a few large single copies."""
    owner = "_calibration"
    size_bytes = min(size_bytes, max(tier.budget_bytes - tier.reserved_bytes(), 0) // 2) or 2**20
    host = tier.host_empty((size_bytes,), torch.uint8)
    host.fill_(1)
    tier.reserve(owner, size_bytes)
    try:
        device = tier.allocate(owner, "calibration", (size_bytes,), torch.uint8)
        device.copy_(host, non_blocking=True)  # warm-up
        best_seconds = float("inf")
        for _ in range(trials):
            tier.synchronize()
            start = time.perf_counter()
            device.copy_(host, non_blocking=True)
            tier.synchronize()
            best_seconds = min(best_seconds, time.perf_counter() - start)
        tier.release(device)
    finally:
        tier.unreserve(owner)
    timing = TransferTiming.of(
        "calibration",
        "host_to_device",
        size_bytes,
        best_seconds,
        path=tier.host_path,
        copies=1,
        streams=1,
        emulated=tier.emulated,
    )
    tier.host_to_device_peak = timing
    return timing
