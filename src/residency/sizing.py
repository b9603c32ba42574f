"""GPU bytes a model needs beside its weights, shared by the engine (which reserves them) and the
planner (which must predict the same reservation, so the worker never refuses what was planned)."""

from __future__ import annotations

from collections.abc import Sequence

ALIGN_ELEMENTS = 128
"""The engine starts every tensor of its host cache on a 128-element boundary (256 bytes in bf16)."""


def aligned_numel(numel: int) -> int:
    """Elements a tensor of `numel` takes in the engine's host cache and on the GPU, padding included."""
    return (numel + ALIGN_ELEMENTS - 1) // ALIGN_ELEMENTS * ALIGN_ELEMENTS


def workspace_bytes(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    head_dim: int,
    vocab_size: int,
    element_bytes: int,
    max_sequence_length: int,
    max_batch_size: int,
) -> int:
    """Activations of the largest step (a prefill of max_sequence_length tokens, the MLP's intermediates,
    float32 attention scores of one head at a time) plus float32 logits for every sequence of a batch."""
    tokens = max_sequence_length
    activation_bytes = (
        tokens * (4 * hidden_size + 3 * intermediate_size + 2 * num_heads * head_dim) * element_bytes
    )
    score_bytes = 4 * tokens * min(tokens, 4096)
    logits_bytes = 4 * vocab_size * max_batch_size
    return activation_bytes + score_bytes + logits_bytes


def resident_units(
    unit_bytes: Sequence[int], fraction: float, min_fraction: float = 0.0
) -> tuple[frozenset[int], int]:
    """Which units (indices, in the engine's priority order: head, layer 0 … layer N-1, embedding) a
    placement of ``fraction`` keeps resident, and their bytes: the engine's choice, shared with the planner
    so it counts exactly what the worker will hold.

    Whole units in priority order, each kept only if it brings resident bytes closer to the target; then
    more units until at least ``min_fraction`` is resident (a user's offload.maxFraction is a limit)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"resident fraction must lie in [0, 1], got {fraction}")
    total = sum(unit_bytes)
    target = fraction * total
    chosen: set[int] = set()
    resident = 0
    for index, size in enumerate(unit_bytes):
        # a big head of a small model may overshoot a low target: then layers alone get closer
        if abs(resident + size - target) < abs(resident - target):
            chosen.add(index)
            resident += size
    for index, size in enumerate(unit_bytes):
        if resident >= min_fraction * total:
            break
        if index not in chosen:
            chosen.add(index)
            resident += size
    return frozenset(chosen), resident


def staging_bytes(largest_streamed_unit_bytes: int) -> int:
    """Two reusable staging buffers: the copy of unit i+1 overlaps the compute of unit i."""
    return 2 * largest_streamed_unit_bytes


_MEMORY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def memory_text(value_bytes: float) -> str:
    """Bytes in the unit that fits, at most one decimal: ``512 B``, ``8.0 MiB``, ``17.2 GiB``, ``640 GiB``.

    Messages name sizes from a few MiB (a test node) to many GiB (a GPU); one fixed unit would round the
    small ones to nothing ("0.0 GiB")."""
    value = float(value_bytes)
    unit = 0
    while abs(value) >= 1024 and unit < len(_MEMORY_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{value:.0f} B"
    digits = 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {_MEMORY_UNITS[unit]}"
