"""Which units stay GPU-resident for a target fraction, and what the placement needs from the GPU budget.

Residency is chosen in priority order — the head (final norm + lm_head, used by every token), then the
decoder layers in order, then the input embedding (a row gather, cheap to do on the host) — taking the
units that bring the resident bytes closest to `fraction * total`. A placement over several GPUs then
cuts the resident units into contiguous ranges, one per GPU (``split``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from residency.sizing import resident_units, staging_bytes, workspace_bytes
from residency.split import GpuShares, compute_order, split_stages, stage_bytes
from residency_worker.engine.loading import LoadedWeights, Unit
from residency_worker.engine.types import ExecutionMode


@dataclass(frozen=True)
class ResidencyPlan:
    requested_fraction: float
    resident: frozenset[str]
    resident_weight_bytes: int
    weight_bytes: int
    gpus: tuple[int, ...] = (0,)  # the node's GPUs in pipeline order
    shares: tuple[float, ...] = ()  # each GPU's requested share (empty: one GPU, requested_fraction)
    stage_of: dict[str, int] = field(default_factory=dict)  # resident unit → position in gpus (absent: 0)

    @property
    def resident_fraction(self) -> float:
        return self.resident_weight_bytes / self.weight_bytes if self.weight_bytes else 1.0

    def stage(self, name: str) -> int:
        """The position in ``gpus`` of the GPU that holds resident unit ``name``."""
        return self.stage_of.get(name, 0)

    @property
    def stream_stage(self) -> int:
        """Where streamed units compute: the last GPU of the pipeline."""
        return len(self.gpus) - 1

    @property
    def split(self) -> bool:
        return len(self.gpus) > 1

    def gpu_shares(self) -> GpuShares:
        """The requested (GPU, share) pairs, as a placement writes them."""
        shares = self.shares or (self.requested_fraction,)
        return tuple(zip(self.gpus, shares, strict=True))


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


def plan_residency(
    weights: LoadedWeights, fraction: float, min_fraction: float = 0.0, gpus: GpuShares = ()
) -> ResidencyPlan:
    """Whole units, in priority order, each kept only if it brings resident bytes closer to the target;
    then more units until at least `min_fraction` is resident (a user's offload.maxFraction is a limit).
    The choice is :func:`residency.sizing.resident_units`, which the planner makes the same way. With several
    ``gpus`` (GPU, share), ``fraction`` is their sum and the units split as :mod:`residency.split` says."""
    chosen, resident_bytes = resident_units(
        [weights.unit_bytes(u) for u in weights.units], fraction, min_fraction
    )
    resident = frozenset(unit.name for index, unit in enumerate(weights.units) if index in chosen)
    total = weights.weight_bytes
    if len(gpus) <= 1:
        index = gpus[0][0] if gpus else 0
        return ResidencyPlan(fraction, resident, resident_bytes, total, gpus=(index,))
    ordered = compute_order([u.name for u in weights.units], weights.spec.num_layers)
    stage_of = split_stages(
        [name for name in ordered if name in resident],
        lambda name: weights.unit_bytes(weights.unit(name)),
        [share for _, share in gpus],
    )
    return ResidencyPlan(
        fraction,
        resident,
        resident_bytes,
        total,
        gpus=tuple(index for index, _ in gpus),
        shares=tuple(share for _, share in gpus),
        stage_of=stage_of,
    )


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


def kv_stage(plan: ResidencyPlan, layer: int, decode_mode: ExecutionMode) -> int | None:
    """The pipeline stage whose GPU holds ``layer``'s KV cache (``None``: host memory)."""
    name = f"layer.{layer}"
    if name in plan.resident:
        return plan.stage(name)
    return plan.stream_stage if decode_mode == "stream" else None


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


def stage_needs(
    weights: LoadedWeights,
    plan: ResidencyPlan,
    *,
    decode_mode: ExecutionMode,
    prefill_mode: ExecutionMode,
    max_batch_size: int,
    max_sequence_length: int,
) -> dict[int, BudgetNeed]:
    """What each GPU of the plan reserves (by the node's GPU index): its resident units, the KV of the
    layers that compute on it, the staging buffers on the last GPU (where streamed units compute), and the
    workspace on every GPU that computes. One GPU: exactly :func:`budget_need`."""
    whole = budget_need(
        weights,
        plan,
        decode_mode=decode_mode,
        prefill_mode=prefill_mode,
        max_batch_size=max_batch_size,
        max_sequence_length=max_sequence_length,
    )
    if not plan.split:
        return {plan.gpus[0]: whole}
    spec = weights.spec
    stages = stage_bytes(
        {u.name: weights.unit_bytes(u) for u in weights.units},
        {name: plan.stage(name) for name in plan.resident},
        len(plan.gpus),
        num_layers=spec.num_layers,
        layer_kv_bytes=spec.kv_elements_per_token_per_layer
        * weights.element_size
        * max_batch_size
        * max_sequence_length,
        staging_bytes=whole.staging_bytes,
        workspace_bytes=whole.workspace_bytes,
        stream_offloaded=decode_mode == "stream",
    )
    return {
        gpu: BudgetNeed(need.weight_bytes, need.kv_bytes, need.staging_bytes, need.workspace_bytes)
        for gpu, need in zip(plan.gpus, stages, strict=True)
    }
