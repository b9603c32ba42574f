"""Which units stay GPU-resident for a target fraction, and what the placement needs from the GPU budget.

Residency is chosen in priority order — the head (final norm + lm_head, used by every token), then the
decoder layers in order, then the input embedding (a row gather, cheap to do on the host) — taking the
units that bring the resident bytes closest to `fraction * total`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from residency.sizing import resident_units, staging_bytes, workspace_bytes
from residency_worker.engine.loading import LoadedWeights, Unit
from residency_worker.engine.types import ExecutionMode


@dataclass(frozen=True)
class ResidencyPlan:
    requested_fraction: float
    resident: frozenset[str]
    resident_weight_bytes: int
    weight_bytes: int

    @property
    def resident_fraction(self) -> float:
        return self.resident_weight_bytes / self.weight_bytes if self.weight_bytes else 1.0


@dataclass(frozen=True)
class BudgetNeed:
    """GPU bytes a placement reserves: weights + KV for max_batch * max_seq + staging + workspace."""

    resident_weight_bytes: int
    kv_bytes: int
    staging_bytes: int
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.resident_weight_bytes + self.kv_bytes + self.staging_bytes + self.workspace_bytes


def plan_residency(weights: LoadedWeights, fraction: float, min_fraction: float = 0.0) -> ResidencyPlan:
    """Whole units, in priority order, each kept only if it brings resident bytes closer to the target;
    then more units until at least `min_fraction` is resident (a user's offload.maxFraction is a limit).
    The choice is :func:`residency.sizing.resident_units`, which the planner makes the same way."""
    chosen, resident_bytes = resident_units(
        [weights.unit_bytes(u) for u in weights.units], fraction, min_fraction
    )
    names = frozenset(unit.name for index, unit in enumerate(weights.units) if index in chosen)
    return ResidencyPlan(fraction, names, resident_bytes, weights.weight_bytes)


@dataclass(frozen=True)
class Piece:
    """A contiguous slice of the host cache that streams as one copy: a decoder layer or part of the head."""

    name: str
    offset: int  # elements into the host cache
    numel: int
    tensors: dict[str, tuple[int, tuple[int, ...]]]  # local name → (offset in the piece, shape)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: flat[off : off + _numel(shape)].view(shape) for name, (off, shape) in self.tensors.items()
        }


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def head_matrix_name(weights: LoadedWeights) -> str:
    return "embed_tokens.weight" if weights.spec.tie_word_embeddings else "lm_head.weight"


def head_rows_per_chunk(weights: LoadedWeights) -> int:
    """Vocabulary rows per logits chunk: a chunk is never bigger than a decoder layer.

    The head (often the biggest unit of a small model with a large vocabulary) then streams through
    layer-sized staging slots, and the logits are computed chunk by chunk wherever the head lives,
    so a streamed, a resident and a CPU-computed head give bitwise the same logits.
    """
    largest_layer = max(u.numel for u in weights.units if u.name.startswith("layer."))
    return max(1, largest_layer // weights.spec.hidden_size)


def unit_piece(unit: Unit) -> Piece:
    return Piece(unit.name, unit.offset, unit.numel, dict(unit.tensors))


def head_pieces(weights: LoadedWeights) -> list[Piece]:
    """The head as pieces: its final norm, then the rows of its matrix in layer-sized chunks."""
    unit = weights.unit("head")
    norm_offset, norm_shape = unit.tensors["norm.weight"]
    norm = Piece("head.norm", unit.offset + norm_offset, _numel(norm_shape), {"norm.weight": (0, norm_shape)})
    pieces = [norm]
    matrix_offset, (rows, columns) = unit.tensors[head_matrix_name(weights)]
    step = head_rows_per_chunk(weights)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        offset = unit.offset + matrix_offset + start * columns
        pieces.append(
            Piece(
                f"head.rows.{start}",
                offset,
                (stop - start) * columns,
                {"weight": (0, (stop - start, columns))},
            )
        )
    return pieces


def streamed_pieces(weights: LoadedWeights, plan: ResidencyPlan) -> list[Piece]:
    """What a stream-mode pass copies in, in compute order: offloaded layers, then an offloaded head."""
    layers = [u for u in weights.units if u.name.startswith("layer.") and u.name not in plan.resident]
    pieces = [unit_piece(u) for u in layers]
    if "head" not in plan.resident:
        pieces.extend(head_pieces(weights))
    return pieces


def gpu_kv_layers(weights: LoadedWeights, plan: ResidencyPlan, decode_mode: ExecutionMode) -> list[int]:
    """Layers whose KV cache lives on the GPU: those that decode there (resident, or streamed in)."""
    layers = range(weights.spec.num_layers)
    if decode_mode == "stream":
        return list(layers)
    return [i for i in layers if f"layer.{i}" in plan.resident]


def budget_need(
    weights: LoadedWeights,
    plan: ResidencyPlan,
    *,
    decode_mode: ExecutionMode,
    prefill_mode: ExecutionMode,
    max_batch_size: int,
    max_sequence_length: int,
) -> BudgetNeed:
    spec = weights.spec
    element = weights.element_size
    kv_layers = len(gpu_kv_layers(weights, plan, decode_mode))
    kv_bytes = (
        kv_layers * spec.kv_elements_per_token_per_layer * element * max_batch_size * max_sequence_length
    )
    streaming = "stream" in (decode_mode, prefill_mode)
    largest_piece = max((p.numel for p in streamed_pieces(weights, plan)), default=0) if streaming else 0
    staging = staging_bytes(largest_piece * element) if largest_piece else 0
    workspace = workspace_bytes(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_heads=spec.num_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        element_bytes=element,
        max_sequence_length=max_sequence_length,
        max_batch_size=max_batch_size,
    )
    return BudgetNeed(plan.resident_weight_bytes, kv_bytes, staging, workspace)
