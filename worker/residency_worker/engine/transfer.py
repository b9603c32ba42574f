"""Measured host↔device copies: big per-unit weight copies over several streams, and double-buffered staging.

On a real GPU the host side is pinned, copies are `non_blocking` on side streams, and the device is
synchronised before every clock read. On the emulated tier the same code performs real memory copies
between the host cache and the CPU pool that stands in for GPU memory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from residency_worker.engine.loading import LoadedWeights, Unit
from residency_worker.engine.placement import Piece
from residency_worker.engine.tiers import GpuTier
from residency_worker.engine.types import TransferDirection, TransferTiming

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def timed_copies(
    tier: GpuTier,
    pairs: Pairs,
    *,
    what: str,
    direction: TransferDirection,
    streams: int = 2,
) -> TransferTiming:
    """Copies each (destination, source) pair, round-robin over `streams` copy streams, and times it all."""
    return timed_copy_groups([(tier, pairs)], what=what, direction=direction, streams=streams)


def timed_copy_groups(
    groups: Sequence[tuple[GpuTier, Pairs]],
    *,
    what: str,
    direction: TransferDirection,
    streams: int = 2,
) -> TransferTiming:
    """The copies of several GPUs at once (a split model's): each GPU's pairs on its own copy streams, all
    issued before any is waited for, timed from the first issue to the last GPU's synchronisation."""
    groups = [(tier, pairs) for tier, pairs in groups if pairs] or list(groups[:1])
    moved_bytes = sum(src.numel() * src.element_size() for _, pairs in groups for _, src in pairs)
    issued = [(tier, pairs, tier.copy_streams(streams) if pairs else None) for tier, pairs in groups]
    for tier, _ in groups:
        tier.synchronize()
    start = time.perf_counter()
    for tier, pairs, cuda_streams in issued:
        if cuda_streams is None:
            for dst, src in pairs:
                dst.copy_(src)
            continue
        current = torch.cuda.current_stream(tier.device)
        for stream in cuda_streams:
            stream.wait_stream(current)  # destinations were allocated on the current stream
        for i, (dst, src) in enumerate(pairs):
            with torch.cuda.stream(cuda_streams[i % len(cuda_streams)]):
                dst.copy_(src, non_blocking=True)
    for tier, _ in groups:
        tier.synchronize()
    seconds = time.perf_counter() - start
    first = groups[0][0]
    used_streams = sum(len(s) if s else 1 for _, _, s in issued) or 1
    return TransferTiming.of(
        what,
        direction,
        moved_bytes,
        seconds,
        path=first.host_path,
        copies=sum(len(pairs) for _, pairs in groups),
        streams=used_streams,
        emulated=first.emulated,
    )


def upload_units(
    tier: GpuTier,
    owner: str,
    weights: LoadedWeights,
    units: Sequence[Unit],
    *,
    streams: int = 2,
    homes: Mapping[str, GpuTier] | None = None,
) -> tuple[dict[str, torch.Tensor], TransferTiming]:
    """Allocates each unit's GPU buffer (on ``homes[unit]`` for a split model, else on ``tier``) and fills
    it from the host cache in one big copy per unit, every GPU's copies at once."""
    homes = homes or {}
    device_flats = {
        u.name: homes.get(u.name, tier).allocate(owner, "weights", (u.numel,), weights.dtype) for u in units
    }
    groups: dict[GpuTier, list[tuple[torch.Tensor, torch.Tensor]]] = {tier: []}
    for unit in units:
        groups.setdefault(homes.get(unit.name, tier), []).append(
            (device_flats[unit.name], weights.host_unit(unit))
        )
    timing = timed_copy_groups(
        list(groups.items()), what="weights", direction="host_to_device", streams=streams
    )
    return device_flats, timing


def _stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def _event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


class Stager:
    """Two reusable GPU staging slots: the copy of streamed piece k+1 overlaps the compute of piece k."""

    def __init__(self, tier: GpuTier, owner: str, weights: LoadedWeights, slot_numel: int) -> None:
        self.tier = tier
        self.weights = weights
        self.slot_numel = slot_numel
        self.slots = [tier.allocate(owner, "staging", (slot_numel,), weights.dtype) for _ in range(2)]
        cuda = tier.device.type == "cuda"
        self._copy_stream = _stream(tier.device) if cuda else None
        self._copied = [_event() if cuda else None for _ in range(2)]
        self._freed = [_event() if cuda else None for _ in range(2)]
        self._freed_this_pass = [False, False]
        self._order: list[Piece] = []
        self._next = 0
        self._slot_of: dict[str, int] = {}
        self.copied_bytes = 0

    def close(self) -> None:
        for slot in self.slots:
            self.tier.release(slot)
        self.slots = []

    def begin(self, order: list[Piece]) -> None:
        """Starts a pass over `order`, the streamed pieces in compute order; prefetches the first two."""
        self._order = order
        self._next = 0
        self._slot_of = {}
        # the first copies of a pass follow everything queued so far (below), not events of the previous
        # pass: a pass captured into a CUDA graph may only wait on events recorded inside the capture
        self._freed_this_pass = [False, False]
        if self._copy_stream is not None:  # copies follow everything queued so far (slot reuse, allocation)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.tier.device))
        for _ in range(min(2, len(order))):
            self._issue(self._next % 2)

    def _issue(self, slot: int) -> None:
        piece = self._order[self._next]
        self._next += 1
        self._slot_of[piece.name] = slot
        source = self.weights.host_flat[piece.offset : piece.offset + piece.numel]
        target = self.slots[slot][: piece.numel]
        self.copied_bytes += piece.numel * self.weights.element_size
        if self._copy_stream is None:
            target.copy_(source)
            return
        freed, copied = self._freed[slot], self._copied[slot]
        assert freed is not None and copied is not None
        with torch.cuda.stream(self._copy_stream):
            if self._freed_this_pass[slot]:
                self._copy_stream.wait_event(freed)  # the slot's previous piece has finished computing
            target.copy_(source, non_blocking=True)
            copied.record(self._copy_stream)  # type: ignore[no-untyped-call]

    def acquire(self, piece: Piece) -> dict[str, torch.Tensor]:
        """The piece's weights in its staging slot, once its copy has landed (ordered on compute stream)."""
        slot = self._slot_of[piece.name]
        copied = self._copied[slot]
        if copied is not None:
            torch.cuda.current_stream(self.tier.device).wait_event(copied)
        return piece.views(self.slots[slot])

    def release(self, piece: Piece) -> None:
        """The compute of `piece` is queued: its slot may be refilled once that compute finishes."""
        slot = self._slot_of.pop(piece.name)
        freed = self._freed[slot]
        if freed is not None:
            freed.record(torch.cuda.current_stream(self.tier.device))  # type: ignore[no-untyped-call]
            self._freed_this_pass[slot] = True
        if self._next < len(self._order):
            self._issue(slot)
