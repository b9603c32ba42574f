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


def packed_views(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder layer's views plus a packed copy of each 2-D linear weight, under ``<name>.packed``."""
    extended = dict(views)
    for name, tensor in views.items():
        if tensor.dim() == 2 and name.endswith(".weight") and tensor.numel() >= PACK_MIN_ELEMENTS:
            extended[name + PACKED_SUFFIX] = pack(tensor)
    return extended


def packed_rows(matrix: torch.Tensor, rows_per_chunk: int) -> list[torch.Tensor] | None:
    """The head's vocabulary matrix packed chunk by chunk (the logits are computed in these chunks), or
    None when its chunks are too small to gain from packing."""
    if min(rows_per_chunk, matrix.shape[0]) * matrix.shape[1] < PACK_MIN_ELEMENTS:
        return None
    return [
        pack(matrix[start : start + rows_per_chunk]) for start in range(0, matrix.shape[0], rows_per_chunk)
    ]
