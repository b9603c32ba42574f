"""How a model's resident units split across the GPUs of its placement (pipeline order) — pure, shared by the
engine (which places the units) and the planner (which must predict each GPU's bytes the same way).

The rule (docs/multi-gpu.md):

1. Which units are resident at all is chosen exactly as for one GPU (the engine's ``plan_residency``: the
   head, then the decoder layers in order, then the input embedding), for the sum of the GPUs' shares.
2. The resident units, taken in **compute order** (embedding, layer 0 … layer N-1, head), are cut into
   contiguous ranges, one per GPU in the placement's order: the first GPU holds the first layers (and the
   embedding when it is resident), the last GPU that has a share holds the last resident layers and the
   head. A unit goes to the GPU whose share of the resident bytes holds the unit's middle byte, so each GPU
   holds its share to within half a unit (a planner leaves that much slack per GPU).
3. The offloaded remainder stays in host memory. In stream mode it is copied into staging buffers on the
   **last** GPU of the pipeline (the one that holds the head, computed right after them); in cpu mode it
   is computed on the host. A layer's KV cache lives where the layer computes: its GPU, the last GPU for a
   streamed layer, host memory for a layer computed there.

A GPU with share 0 holds no weights; as the last GPU of a pipeline it still hosts the streamed layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

GpuShares = tuple[tuple[int, float], ...]
"""A placement's GPUs: (the node's GPU index, its share of the model's weight bytes), in pipeline order."""


def compute_order(unit_names: Sequence[str], num_layers: int) -> list[str]:
    """The units in the order a forward pass uses them: embedding, layers, head."""
    layers = [f"layer.{i}" for i in range(num_layers)]
    order = (["embed"] if "embed" in unit_names else []) + layers + ["head"]
    return [name for name in order if name in unit_names]


def split_stages(
    ordered_resident: Sequence[str], unit_bytes: Callable[[str], int], shares: Sequence[float]
) -> dict[str, int]:
    """Each resident unit's stage (position in the pipeline): contiguous ranges in compute order, each
    stage taking the units whose middle byte falls in its share of the resident bytes."""
    stages = len(shares)
    if stages <= 1:
        return dict.fromkeys(ordered_resident, 0)
    if any(share < 0 for share in shares):
        raise ValueError(f"a GPU's share cannot be negative: {list(shares)}")
    total_bytes = sum(unit_bytes(name) for name in ordered_resident)
    # shares that sum to 0 with units resident anyway (the model's minimum residency): even split
    weights = list(shares) if sum(shares) > 0 else [1.0] * stages
    weight_total = sum(weights)
    boundaries: list[float] = []
    running = 0.0
    for weight in weights:
        running += weight
        boundaries.append(running / weight_total * total_bytes)
    stage_of: dict[str, int] = {}
    cumulative = 0
    stage = 0
    for name in ordered_resident:
        size = unit_bytes(name)
        middle = cumulative + size / 2
        while stage < stages - 1 and middle > boundaries[stage]:
            stage += 1
        stage_of[name] = stage
        cumulative += size
    return stage_of


def check_shares(gpus: GpuShares, gpu_count: int, resident_fraction: float | None = None) -> None:
    """Refuses a split the node cannot run: unknown or repeated GPUs, shares outside [0, 1], or shares that
    do not sum to ``resident_fraction`` (when given)."""
    indices = [index for index, _ in gpus]
    missing = sorted({index for index in indices if not 0 <= index < gpu_count})
    if missing:
        raise ValueError(
            f"GPU {', '.join(map(str, missing))} does not exist on this node: it has {gpu_count} "
            f"GPU{'s' if gpu_count != 1 else ''} (0..{gpu_count - 1})"
        )
    if len(set(indices)) != len(indices):
        raise ValueError(f"a GPU appears more than once in {indices}")
    if any(not 0.0 <= share <= 1.0 for _, share in gpus):
        raise ValueError(f"each GPU's share must lie in [0, 1]: {[share for _, share in gpus]}")
    total = sum(share for _, share in gpus)
    if resident_fraction is not None and gpus and abs(total - resident_fraction) > 1e-6:
        raise ValueError(
            f"the GPUs' shares sum to {total:.6f}, not the resident fraction {resident_fraction}"
        )


def scaled_shares(gpus: GpuShares, fraction: float) -> GpuShares:
    """The same GPUs holding ``fraction`` in all, in the proportions they hold now (evenly when none)."""
    total = sum(share for _, share in gpus)
    if total <= 0:
        return tuple((index, fraction / len(gpus)) for index, _ in gpus)
    return tuple((index, share / total * fraction) for index, share in gpus)


@dataclass(frozen=True)
class StageBytes:
    """What one GPU of a split reserves: its resident units, the KV of the layers that compute on it, the
    staging buffers (on the last GPU, where streamed units compute) and the workspace (on every GPU that
    computes). The engine reserves exactly this; a planner predicting per-GPU bytes calls the same."""

    weight_bytes: int
    kv_bytes: int
    staging_bytes: int
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.staging_bytes + self.workspace_bytes


def stage_bytes(
    unit_bytes: Mapping[str, int],
    stage_of: Mapping[str, int],
    stages: int,
    *,
    num_layers: int,
    layer_kv_bytes: int,
    staging_bytes: int,
    workspace_bytes: int,
    stream_offloaded: bool,
) -> list[StageBytes]:
    """Each stage's bytes for a split whose resident units sit where ``stage_of`` says (units absent from it
    are offloaded): ``layer_kv_bytes`` is one layer's KV for the whole batch at full length, and offloaded
    layers keep their KV on the last GPU when ``stream_offloaded`` (stream decode), else in host memory.
    ``staging_bytes`` and ``workspace_bytes`` are what one GPU of the model would reserve for them."""
    last = stages - 1
    kv_stages = [stage_of.get(f"layer.{i}", last if stream_offloaded else None) for i in range(num_layers)]
    result = []
    for stage in range(stages):
        held = sum(size for name, size in unit_bytes.items() if stage_of.get(name, -1) == stage)
        result.append(
            StageBytes(
                held,
                kv_stages.count(stage) * layer_kv_bytes,
                staging_bytes if stage == last else 0,
                workspace_bytes if stage == last or held else 0,
            )
        )
    return result
