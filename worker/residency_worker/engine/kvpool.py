"""One KV pool per model: every layer's keys and values for ``max_batch_size`` slots of
``max_sequence_length`` tokens, preallocated where that layer decodes.

A running sequence owns one slot. Layers that decode on a GPU (resident, or streamed in) keep their
part of the pool in that GPU's tier (a split model's KV lives with its layers), charged to the model's KV
reservation there (the planner sizes that reservation as slots x length); layers computed on the CPU
keep it in host memory. Occupied slots are kept dense (``0 .. occupied - 1``): when a sequence ends,
the sequence in the highest slot moves into its place, so a decode step attends over one contiguous
view of the pool, never a gather.

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
        gpu_layers: dict[int, GpuTier],
    ) -> None:
        self.tier = tier  # pins the host copies (any GPU of the node can copy from them)
        self.owner = owner
        self.slots = slots
        self.capacity = capacity
        self.dtype = dtype
        self._layer_shape = (2, slots, kv_heads, capacity, head_dim)
        self._on_gpu: list[GpuTier | None] = [gpu_layers.get(index) for index in range(num_layers)]
        self._tensors: list[torch.Tensor] = [self._empty(home) for home in self._on_gpu]
        self._saved: dict[int, torch.Tensor] = {}  # layer → host copy of the used tokens while preempted
        self._saved_lengths: list[int] = []

    def _empty(self, home: GpuTier | None) -> torch.Tensor:
        """A zeroed layer of the pool: attention multiplies masked-out positions by 0, and 0 x NaN of
        uninitialised memory would still be NaN."""
        if home is not None:
            return home.allocate(self.owner, "kv", self._layer_shape, self.dtype).zero_()
        return torch.zeros(self._layer_shape, dtype=self.dtype, device="cpu")

    def layer(self, index: int) -> torch.Tensor:
        return self._tensors[index]

    @property
    def token_bytes_per_layer(self) -> int:
        _, _, kv_heads, _, head_dim = self._layer_shape
        return 2 * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size()

    def gpu_layers(self) -> int:
        return sum(home is not None for home in self._on_gpu)

    def home(self, index: int) -> GpuTier | None:
        """The GPU tier that holds layer ``index``'s KV (``None``: host memory)."""
        return self._on_gpu[index]

    def move_slot(self, source: int, target: int, used_tokens: int) -> None:
        """Moves a sequence's cached tokens to another (free) slot, in every layer."""
        if source == target or used_tokens == 0:
            return
        for tensor in self._tensors:
            tensor[:, target, :, :used_tokens].copy_(tensor[:, source, :, :used_tokens])

    def rehome(self, gpu_layers: dict[int, GpuTier], used_tokens: list[int]) -> None:
        """Moves the layers whose home changed (a live change of residency, mode or GPUs), keeping the used
        tokens of each occupied slot (``used_tokens[slot]``)."""
        for index, home in enumerate(self._on_gpu):
            wanted = gpu_layers.get(index)
            if wanted is home:
                continue
            moved = self._empty(wanted)
            for slot, used in enumerate(used_tokens):
                moved[:, slot, :, :used].copy_(self._tensors[index][:, slot, :, :used])
            if home is not None:
                home.release(self._tensors[index])
            self._tensors[index] = moved
            self._on_gpu[index] = wanted

    def release(self) -> None:
        for tensor, home in zip(self._tensors, self._on_gpu, strict=True):
            if home is not None and tensor.numel():
                home.release(tensor)
        self._tensors = [torch.empty(0, dtype=self.dtype) for _ in self._on_gpu]

    # -- preemption ---------------------------------------------------------------------------------
    def save_pairs(self, used_tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pinned host destination, GPU source) for the used tokens of each occupied slot of each GPU
        layer. One pinned buffer holds them all, so preemption pins memory once."""
        gpu_layers = [index for index, home in enumerate(self._on_gpu) if home is not None]
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
        for index, home in enumerate(self._on_gpu):
            if home is not None and self._tensors[index].numel():
                home.release(self._tensors[index])
                self._tensors[index] = torch.empty(0, dtype=self.dtype)

    def retarget(self, gpu_layers: dict[int, GpuTier]) -> None:
        """While preempted (the GPU layers dropped, their tokens saved): points each dropped layer at where it
        decodes now, so its restore lands there (another GPU of a split moved while preempted, or host
        memory). Layers on the host were never dropped: ``rehome`` moves them after the restore."""
        for index, home in enumerate(self._on_gpu):
            if home is None or self._tensors[index].numel():
                continue
            wanted = gpu_layers.get(index)
            self._on_gpu[index] = wanted
            if wanted is None:
                self._tensors[index] = self._empty(None)

    def restore_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(new GPU destination, pinned host source) of every saved slot and layer, for resume; the GPU
        part of the pool is allocated again (the caller has reserved it)."""
        _, _, kv_heads, _, head_dim = self._layer_shape
        per_token = 2 * kv_heads * head_dim
        pairs = []
        for index, home in enumerate(self._on_gpu):
            if home is not None and not self._tensors[index].numel():
                self._tensors[index] = self._empty(home)
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

    def group_by_tier(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], *, device_side: int
    ) -> list[tuple[GpuTier, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """``pairs`` by the GPU tier of their device tensor (element ``device_side`` of each pair), so each
        GPU's copies run on its own streams."""
        groups: dict[GpuTier, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for pair in pairs:
            groups.setdefault(self._tier_of(pair[device_side]), []).append(pair)
        return list(groups.items()) or [(self.tier, [])]

    def _tier_of(self, tensor: torch.Tensor) -> GpuTier:
        pointer = tensor.data_ptr()
        for home, layer in zip(self._on_gpu, self._tensors, strict=True):
            if home is not None and layer.numel():
                start = layer.data_ptr()
                if start <= pointer < start + layer.numel() * layer.element_size():
                    return home
        return self.tier

    def restored(self) -> None:
        """The restore copies have landed: the host copies can go."""
        self._saved = {}
        self._saved_lengths = []
