"""oneDNN-packed linear layers give F.linear's results, for every row count a step can have."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from residency_worker.engine import cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(torch.float32), reason="this torch build has no oneDNN linear prepacking"
)


@pytest.mark.parametrize("rows", [1, 3, 16, 64, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_dense(rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 96, generator=generator)
    bias = torch.randn(300, generator=generator) if with_bias else None
    x = torch.randn(rows, 96, generator=generator)
    packed = cpu_kernels.pack(weight)
    torch.testing.assert_close(cpu_kernels.linear(x, packed, bias), F.linear(x, weight, bias))


def test_packed_copy_keeps_the_values_bitwise() -> None:
    weight = torch.randn(64, 32)
    assert torch.equal(cpu_kernels.pack(weight).to_dense(), weight)


def test_packed_views_add_a_copy_of_each_large_matrix_only() -> None:
    big = 1024 * 1024 // 512
    views = {
        "self_attn.q_proj.weight": torch.randn(big, 512),
        "self_attn.k_proj.weight": torch.randn(8, 512),  # small: oneDNN's call costs more than it gains
        "self_attn.q_proj.bias": torch.randn(big),
        "input_layernorm.weight": torch.randn(512),
    }
    extended = cpu_kernels.packed_views(views)
    assert set(extended) == set(views) | {"self_attn.q_proj.weight" + cpu_kernels.PACKED_SUFFIX}
    assert all(extended[k] is v for k, v in views.items())


def test_head_rows_are_packed_in_the_logits_chunks() -> None:
    matrix = torch.randn(5000, 256)
    chunks = cpu_kernels.packed_rows(matrix, 2048)
    assert chunks is not None
    assert [c.to_dense().shape[0] for c in chunks] == [2048, 2048, 904]
    assert torch.equal(torch.cat([c.to_dense() for c in chunks]), matrix)
    assert cpu_kernels.packed_rows(torch.randn(10, 4), 4) is None  # a tiny head stays dense


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_only_float32_is_packed(dtype: torch.dtype) -> None:
    assert not cpu_kernels.available(dtype)
