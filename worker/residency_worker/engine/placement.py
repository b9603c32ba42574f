"""Which units stay GPU-resident for a target fraction, and what the placement needs from the GPU budget.

Residency is chosen in priority order — the head (final norm + lm_head, used by every token), then the
decoder layers in order, then the input embedding (a row gather, cheap to do on the host) — taking the
units that bring the resident bytes closest to `fraction * total`.
"""

from __future__ import annotations

from dataclasses import dataclass

from residency_worker.engine.loading import LoadedWeights
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


def plan_residency(weights: LoadedWeights, fraction: float) -> ResidencyPlan:
    """Whole units, in priority order, each kept only if it brings resident bytes closer to the target."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"resident fraction must lie in [0, 1], got {fraction}")
    total = weights.weight_bytes
    target = fraction * total
    resident: set[str] = set()
    resident_bytes = 0
    for unit in weights.units:
        unit_bytes = weights.unit_bytes(unit)
        # a big head of a small model may overshoot a low target: then layers alone get closer
        if abs(resident_bytes + unit_bytes - target) < abs(resident_bytes - target):
            resident.add(unit.name)
            resident_bytes += unit_bytes
    return ResidencyPlan(fraction, frozenset(resident), resident_bytes, total)


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
    streamed = [u for u in weights.units if u.name not in plan.resident and u.name != "embed"]
    streaming = "stream" in (decode_mode, prefill_mode)
    staging = 2 * max((weights.unit_bytes(u) for u in streamed), default=0) if streaming else 0
    # activations of the largest step: a prefill of max_sequence_length tokens, with the MLP's
    # intermediates and float32 attention scores of one head at a time, plus float32 logits per sequence
    tokens = max_sequence_length
    activation_bytes = (
        tokens
        * (4 * spec.hidden_size + 3 * spec.intermediate_size + 2 * spec.num_heads * spec.head_dim)
        * element
    )
    score_bytes = 4 * tokens * min(tokens, 4096)
    logits_bytes = 4 * spec.vocab_size * max_batch_size
    return BudgetNeed(
        plan.resident_weight_bytes, kv_bytes, staging, activation_bytes + score_bytes + logits_bytes
    )
