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
        "self_attn.o_proj.weight": torch.randn(big, 512),
        "mlp.down_proj.weight": torch.randn(8, 512),  # small: oneDNN's call costs more than it gains
        "self_attn.o_proj.bias": torch.randn(big),
        "input_layernorm.weight": torch.randn(512),
    }
    extended = cpu_kernels.packed_views(views)
    assert set(extended) == set(views) | {"self_attn.o_proj.weight" + cpu_kernels.PACKED_SUFFIX}
    assert all(extended[k] is v for k, v in views.items())


def _attention_views(kv_rows: int, with_bias: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(kv_rows)
    views = {
        "self_attn.q_proj.weight": torch.randn(1024, 512, generator=generator),
        "self_attn.k_proj.weight": torch.randn(kv_rows, 512, generator=generator),
        "self_attn.v_proj.weight": torch.randn(kv_rows, 512, generator=generator),
    }
    if with_bias:
        views |= {
            f"self_attn.{p}_proj.bias": torch.randn(views[f"self_attn.{p}_proj.weight"].shape[0])
            for p in "qk"
        }
    return views


@pytest.mark.parametrize("with_bias", [False, True])
def test_projections_of_one_input_are_packed_as_one_matrix(with_bias: bool) -> None:
    views = _attention_views(128, with_bias)  # GQA: small key and value projections
    extended = cpu_kernels.packed_views(views)
    fused = "self_attn.qkv_proj.weight" + cpu_kernels.PACKED_SUFFIX
    assert set(extended) - set(views) == {fused} | ({"self_attn.qkv_proj.bias"} if with_bias else set())
    assert torch.equal(extended[fused].to_dense(), cpu_kernels.dense_of(views, fused))
    x = torch.randn(5, 512)
    separate = [
        F.linear(x, views[f"self_attn.{p}_proj.weight"], views.get(f"self_attn.{p}_proj.bias")) for p in "qkv"
    ]  # a missing bias (v here) is a zero one
    product = cpu_kernels.linear(x, extended[fused], extended.get("self_attn.qkv_proj.bias"))
    # the same products summed in another order: float32 rounding of outputs of magnitude ~sqrt(512)
    torch.testing.assert_close(product, torch.cat(separate, dim=-1), rtol=1e-5, atol=2e-4)


def test_projections_too_small_or_already_fused_stay_as_they_are() -> None:
    small = {k: v[:, :64] for k, v in _attention_views(8, False).items()}
    assert set(cpu_kernels.packed_views(small)) == set(small)
    phi3 = {"self_attn.qkv_proj.weight": torch.randn(2048, 512)}  # fused by the model itself
    assert set(cpu_kernels.packed_views(phi3)) == {
        "self_attn.qkv_proj.weight",
        "self_attn.qkv_proj.weight" + cpu_kernels.PACKED_SUFFIX,
    }


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
