"""Matrix multiplies of the layers that compute on a CPU, with oneDNN's prepacked weights.

torch's CPU ``F.linear`` goes to MKL's ``sgemm``, which on the AMD cores this project's CI and many cloud
VMs run on multiplies 4 to 16 rows (a decode step's batch) several times below its one-row rate. oneDNN
(shipped inside torch, the library ``torch.compile`` uses for the same job) runs the same product from a
weight reordered once into its blocked layout: measured on a 2-core AMD EPYC, one thread, a 4864 x 896
float32 matrix, 16 rows took 2.1 ms against 8.2 ms with ``F.linear`` and one row 1.0 against 1.15 ms
(see docs/engine.md). The packed copy holds the same values (``to_dense`` gives them back bitwise).

Only float32 weights are packed: oneDNN's bfloat16/float16 kernels need CPU instructions (AVX-512 BF16,
AMX) that are not everywhere, and the plain path is kept where they are missing.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# the batch size oneDNN picks its blocked layout for; measured across 1..128 rows, 64 was within a few
# per cent of the best layout at every row count (a layout chosen for 16 rows slows one row down 3x)
PACK_ROWS_HINT = 64
PACKED_SUFFIX = ".packed"
# oneDNN's call costs 30-50 us more than MKL's: measured, a 512 x 512 matrix times one row took 60 us packed
# against 30 dense, a 1024 x 1024 one 97 against 106 (16 rows: 287 against 551); smaller ones stay dense
PACK_MIN_ELEMENTS = 2**19


def available(dtype: torch.dtype) -> bool:
    """Whether this torch build can prepack ``dtype`` linear weights for oneDNN."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's layout (a new tensor: the caller keeps or drops the
    dense one)."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` [rows, in] from the packed weight."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


# projections that multiply the same input, packed as one matrix (the fused name first): one oneDNN call
# reads all of them, the small key and value projections of a GQA model included (dense, MKL multiplies
# them at batch 16 several times below its one-row rate), and the rotary embedding of the queries and keys
# then runs once over both (they are adjacent columns of the product)
FUSED_PROJECTIONS = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)


def _fused(views: dict[str, torch.Tensor], fused: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The packed fused weight (and the concatenated biases) of ``parts``, or nothing when they cannot be
    fused (a part missing, different input widths) or are too small to gain from packing."""
    weights = [views.get(f"{part}.weight") for part in parts]
    if f"{fused}.weight" in views or any(w is None or w.dim() != 2 for w in weights):
        return {}
    matrices = [w for w in weights if w is not None]
    if len({m.shape[1] for m in matrices}) != 1 or sum(m.numel() for m in matrices) < PACK_MIN_ELEMENTS:
        return {}
    extended = {f"{fused}.weight{PACKED_SUFFIX}": pack(torch.cat(matrices))}
    biases = [views.get(f"{part}.bias") for part in parts]
    if any(b is not None for b in biases):
        extended[f"{fused}.bias"] = torch.cat(
            [b if b is not None else m.new_zeros(m.shape[0]) for b, m in zip(biases, matrices, strict=True)]
        )
    return extended


def packed_views(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder layer's views plus packed copies of its linear weights: the fused projections under
    ``<fused>.weight.packed`` (``FUSED_PROJECTIONS``, with ``<fused>.bias``), every other large 2-D weight
    under ``<name>.packed``. The dense views stay as they are."""
    extended = dict(views)
    covered: set[str] = set()
    for fused, parts in FUSED_PROJECTIONS:
        added = _fused(views, fused, parts)
        if added:
            extended.update(added)
            covered.update(f"{part}.weight" for part in parts)
    for name, tensor in views.items():
        if name in covered:
            continue
        if tensor.dim() == 2 and name.endswith(".weight") and tensor.numel() >= PACK_MIN_ELEMENTS:
            extended[name + PACKED_SUFFIX] = pack(tensor)
    return extended


def dense_of(views: dict[str, torch.Tensor], packed_name: str) -> torch.Tensor:
    """The dense weight a packed copy in ``packed_views`` holds (the parts concatenated for a fused one)."""
    name = packed_name.removesuffix(PACKED_SUFFIX)
    for fused, parts in FUSED_PROJECTIONS:
        if name == f"{fused}.weight" and name not in views:
            return torch.cat([views[f"{part}.weight"] for part in parts])
    return views[name]


def packed_rows(matrix: torch.Tensor, rows_per_chunk: int) -> list[torch.Tensor] | None:
    """The head's vocabulary matrix packed chunk by chunk (the logits are computed in these chunks), or
    None when its chunks are too small to gain from packing."""
    if min(rows_per_chunk, matrix.shape[0]) * matrix.shape[1] < PACK_MIN_ELEMENTS:
        return None
    return [
        pack(matrix[start : start + rows_per_chunk]) for start in range(0, matrix.shape[0], rows_per_chunk)
    ]
