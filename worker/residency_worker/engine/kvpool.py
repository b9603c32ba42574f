"""One KV pool per model: every layer's keys and values for ``max_batch_size`` slots of
``max_sequence_length`` tokens, preallocated where that layer decodes.

A running sequence owns one slot. Layers that decode on the GPU (resident, or streamed in) keep their
part of the pool in the GPU tier, charged to the model's KV reservation (the planner sizes that
reservation as slots x length); layers computed on the CPU keep it in host memory. Occupied slots are
kept dense (``0 .. occupied - 1``): when a sequence ends, the sequence in the highest slot moves into
its place, so a decode step attends over one contiguous view of the pool, never a gather.

Preemption copies only the used tokens of each occupied slot to pinned host memory and back.
"""

from __future__ import annotations

import torch

from residency_worker.engine.tiers import GpuTier


class KVPool:
    """Per layer a ``[2, slots, kv_heads, capacity, head_dim]`` tensor on that layer's home device."""

    def __init__(
        self,
        tier: GpuTier,
        owner: str,
        *,
        num_layers: int,
        slots: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        gpu_layers: set[int],
    ) -> None:
        self.tier = tier
        self.owner = owner
        self.slots = slots
        self.capacity = capacity
        self.dtype = dtype
        self._layer_shape = (2, slots, kv_heads, capacity, head_dim)
        self._on_gpu = [index in gpu_layers for index in range(num_layers)]
        self._tensors: list[torch.Tensor] = [self._empty(on_gpu) for on_gpu in self._on_gpu]
        self._saved: dict[int, torch.Tensor] = {}  # layer → host copy of the used tokens while preempted
        self._saved_lengths: list[int] = []

    def _empty(self, on_gpu: bool) -> torch.Tensor:
        """A zeroed layer of the pool: attention multiplies masked-out positions by 0, and 0 x NaN of
        uninitialised memory would still be NaN."""
        if on_gpu:
            return self.tier.allocate(self.owner, "kv", self._layer_shape, self.dtype).zero_()
        return torch.zeros(self._layer_shape, dtype=self.dtype, device="cpu")

    def layer(self, index: int) -> torch.Tensor:
        return self._tensors[index]

    @property
    def token_bytes_per_layer(self) -> int:
        _, _, kv_heads, _, head_dim = self._layer_shape
        return 2 * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size()

    def gpu_layers(self) -> int:
        return sum(self._on_gpu)

    def move_slot(self, source: int, target: int, used_tokens: int) -> None:
        """Moves a sequence's cached tokens to another (free) slot, in every layer."""
        if source == target or used_tokens == 0:
            return
        for tensor in self._tensors:
            tensor[:, target, :, :used_tokens].copy_(tensor[:, source, :, :used_tokens])

    def rehome(self, gpu_layers: set[int], used_tokens: list[int]) -> None:
        """Moves the layers whose home changed (a live change of residency or mode), keeping the used
        tokens of each occupied slot (``used_tokens[slot]``)."""
        for index, on_gpu in enumerate(self._on_gpu):
            wanted = index in gpu_layers
            if wanted == on_gpu:
                continue
            moved = self._empty(wanted)
            for slot, used in enumerate(used_tokens):
                moved[:, slot, :, :used].copy_(self._tensors[index][:, slot, :, :used])
            if on_gpu:
                self.tier.release(self._tensors[index])
            self._tensors[index] = moved
            self._on_gpu[index] = wanted

    def release(self) -> None:
        for tensor, on_gpu in zip(self._tensors, self._on_gpu, strict=True):
            if on_gpu and tensor.numel():
                self.tier.release(tensor)
        self._tensors = [torch.empty(0, dtype=self.dtype) for _ in self._on_gpu]

    # -- preemption ---------------------------------------------------------------------------------
    def save_pairs(self, used_tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pinned host destination, GPU source) for the used tokens of each occupied slot of each GPU
        layer. One pinned buffer holds them all, so preemption pins memory once."""
        gpu_layers = [index for index, on_gpu in enumerate(self._on_gpu) if on_gpu]
        self._saved_lengths = list(used_tokens)
        total_tokens = sum(used_tokens)
        if not gpu_layers or total_tokens == 0:
            return []
        _, _, kv_heads, _, head_dim = self._layer_shape
        per_token = 2 * kv_heads * head_dim
        host = self.tier.host_empty((per_token * total_tokens * len(gpu_layers),), self.dtype)
        pairs = []
        offset = 0
        for index in gpu_layers:
            layer_host = host[offset : offset + per_token * total_tokens]
            offset += per_token * total_tokens
            self._saved[index] = layer_host
            start = 0
            for slot, used in enumerate(used_tokens):
                if used == 0:
                    continue
                numel = per_token * used
                destination = layer_host[start : start + numel].view(2, kv_heads, used, head_dim)
                start += numel
                pairs.append((destination, self._tensors[index][:, slot, :, :used]))
        return pairs

    def drop_gpu(self) -> None:
        """Gives the GPU part of the pool back once its content is saved."""
        for index, on_gpu in enumerate(self._on_gpu):
            if on_gpu and self._tensors[index].numel():
                self.tier.release(self._tensors[index])
                self._tensors[index] = torch.empty(0, dtype=self.dtype)

    def restore_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(new GPU destination, pinned host source) of every saved slot and layer, for resume; the GPU
        part of the pool is allocated again (the caller has reserved it)."""
        _, _, kv_heads, _, head_dim = self._layer_shape
        per_token = 2 * kv_heads * head_dim
        pairs = []
        for index, on_gpu in enumerate(self._on_gpu):
            if on_gpu and not self._tensors[index].numel():
                self._tensors[index] = self._empty(True)
        for index, layer_host in self._saved.items():
            start = 0
            for slot, used in enumerate(self._saved_lengths):
                if used == 0:
                    continue
                numel = per_token * used
                source = layer_host[start : start + numel].view(2, kv_heads, used, head_dim)
                start += numel
                pairs.append((self._tensors[index][:, slot, :, :used], source))
        return pairs

    def restored(self) -> None:
        """The restore copies have landed: the host copies can go."""
        self._saved = {}
        self._saved_lengths = []
