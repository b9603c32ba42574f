"""Per-sequence KV caches: each layer's keys and values live where that layer decodes.

Layers that decode on the GPU (resident, or streamed in) keep their cache in the GPU pool, charged to
the model's KV reservation; layers computed on the CPU keep it in host memory. Preemption moves the
GPU part to pinned host memory and back, byte for byte.
"""

from __future__ import annotations

import torch

from residency_worker.engine.tiers import GpuTier


class KVCache:
    """Keys and values of one sequence: per layer a [2, kv_heads, capacity, head_dim] tensor."""

    def __init__(
        self,
        tier: GpuTier,
        owner: str,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        gpu_layers: set[int],
        num_layers: int,
    ) -> None:
        self.tier = tier
        self.owner = owner
        self.shape = shape
        self.dtype = dtype
        self.capacity = shape[2]
        self._tensors: list[torch.Tensor] = []
        self._on_gpu: list[bool] = []
        for index in range(num_layers):
            on_gpu = index in gpu_layers
            self._tensors.append(self._empty(on_gpu))
            self._on_gpu.append(on_gpu)
        self._saved: dict[int, torch.Tensor] = {}  # layer → host copy of the used part, while preempted

    def _empty(self, on_gpu: bool) -> torch.Tensor:
        if on_gpu:
            return self.tier.allocate(self.owner, "kv", self.shape, self.dtype)
        return torch.empty(self.shape, dtype=self.dtype, device="cpu")

    def layer(self, index: int) -> torch.Tensor:
        return self._tensors[index]

    def gpu_bytes(self) -> int:
        per_layer = self._tensors[0].numel() * self._tensors[0].element_size() if self._tensors else 0
        return per_layer * sum(self._on_gpu)

    def release(self) -> None:
        for tensor, on_gpu in zip(self._tensors, self._on_gpu, strict=True):
            if on_gpu:
                self.tier.release(tensor)
        self._tensors = []
        self._on_gpu = []

    def rehome(self, gpu_layers: set[int], used_tokens: int) -> None:
        """Moves layers whose home changed (a live change of residency or mode), keeping their content."""
        for index, on_gpu in enumerate(self._on_gpu):
            wanted = index in gpu_layers
            if wanted == on_gpu:
                continue
            moved = self._empty(wanted)
            moved[:, :, :used_tokens].copy_(self._tensors[index][:, :, :used_tokens])
            if on_gpu:
                self.tier.release(self._tensors[index])
            self._tensors[index] = moved
            self._on_gpu[index] = wanted

    def save_pairs(self, used_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pinned host destination, GPU source) for the used part of every GPU layer, for preemption.

        One pinned buffer per sequence holds all its layers, so preemption pins memory once, not per layer.
        """
        gpu_layers = [index for index, on_gpu in enumerate(self._on_gpu) if on_gpu]
        if not gpu_layers:
            return []
        _, kv_heads, _, head_dim = self.shape
        per_layer_shape = (2, kv_heads, used_tokens, head_dim)
        per_layer = 2 * kv_heads * used_tokens * head_dim
        host = self.tier.host_empty((per_layer * len(gpu_layers),), self.dtype)
        pairs = []
        for slot, index in enumerate(gpu_layers):
            destination = host[slot * per_layer : (slot + 1) * per_layer].view(per_layer_shape)
            self._saved[index] = destination
            pairs.append((destination, self._tensors[index][:, :, :used_tokens]))
        return pairs

    def drop_gpu(self) -> None:
        """Releases the GPU layers once their content is saved (an empty placeholder stays in place)."""
        for index, on_gpu in enumerate(self._on_gpu):
            if on_gpu and self._tensors[index].numel():
                self.tier.release(self._tensors[index])
                self._tensors[index] = torch.empty(0, dtype=self.dtype)

    def restore_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(new GPU destination, pinned host source) of every saved layer, for resume."""
        pairs = []
        for index, host in self._saved.items():
            tensor = self._empty(True)
            self._tensors[index] = tensor
            pairs.append((tensor[:, :, : host.shape[2]], host))
        return pairs

    def restored(self) -> None:
        """The restore copies have landed: the host copies can go."""
        self._saved = {}
