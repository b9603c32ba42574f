"""The decoder math of the supported families (Llama, Mistral, Qwen2, Qwen3, Phi-3), on weight dicts.

Each function takes the tensors of one placement unit on whatever device it computes on, so the same
code runs a GPU-resident layer, a layer streamed into a staging buffer, or a layer computed on the CPU.
Numerics follow transformers' own implementations (RMSNorm in float32, rotate-half RoPE, SDPA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from residency_worker.engine.loading import ArchSpec

Weights = dict[str, torch.Tensor]


class LayerCache(Protocol):
    """One sequence's keys and values for one layer: [2, kv_heads, capacity, head_dim] on its home device."""

    def layer(self, index: int) -> torch.Tensor: ...


class Rotary:
    """cos/sin tables for every position up to the model's limit, per device and dtype."""

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        scaling = getattr(config, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope type {rope_type!r} is not supported")
        init = cast(Callable[..., tuple[torch.Tensor, float]], ROPE_INIT_FUNCTIONS[rope_type])
        inv_freq, attention_scaling = init(config, torch.device("cpu"))
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        angles = torch.cat((freqs, freqs), dim=-1)
        self._cos = angles.cos() * attention_scaling
        self._sin = angles.sin() * attention_scaling
        self._cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def max_positions(self) -> int:
        return int(self._cos.shape[0])

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (self._cos.to(device, dtype), self._sin.to(device, dtype))
        return self._cache[key]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [B, 1, T, rotary_dim] (partial rotary keeps the rest)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def embed(w: Weights, token_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(token_ids, w["embed_tokens.weight"])


def final_norm(norm_weight: torch.Tensor, spec: ArchSpec, hidden_last: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_last, norm_weight, spec.rms_norm_eps)


def logits_chunk(rows: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """Float32 logits of one chunk of vocabulary rows; the head always runs chunk by chunk."""
    return F.linear(normed, rows).float()


def _qkv(w: Weights, spec: ArchSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if "self_attn.qkv_proj.weight" in w:  # Phi-3 fuses the projections
        qkv = _linear(w, "self_attn.qkv_proj", x)
        q_size = spec.num_heads * spec.head_dim
        kv_size = spec.num_kv_heads * spec.head_dim
        return qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
    return (
        _linear(w, "self_attn.q_proj", x),
        _linear(w, "self_attn.k_proj", x),
        _linear(w, "self_attn.v_proj", x),
    )


def _mlp(w: Weights, spec: ArchSpec, x: torch.Tensor) -> torch.Tensor:
    act = ACT2FN[spec.hidden_act]
    if "mlp.gate_up_proj.weight" in w:
        gate, up = _linear(w, "mlp.gate_up_proj", x).chunk(2, dim=-1)
        return _linear(w, "mlp.down_proj", up * act(gate))
    return _linear(w, "mlp.down_proj", act(_linear(w, "mlp.gate_proj", x)) * _linear(w, "mlp.up_proj", x))


def layer(
    w: Weights,
    spec: ArchSpec,
    index: int,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    position_list: list[int],
    caches: Sequence[LayerCache],
    rotary: Rotary,
    *,
    prefill: bool,
) -> torch.Tensor:
    """One decoder layer. Prefill: one sequence [1, T, H] from position 0. Decode: [B, 1, H].

    `positions` [B, T] indexes the RoPE tables on the compute device; `position_list` holds each
    sequence's first position as Python ints so decode never reads a device tensor back.

    Keys and values are written into each sequence's cache at its positions (moved to the cache's
    home device if the layer computes elsewhere); decode attends over the cache, which then lives
    on the compute device.
    """
    batch, steps, _ = hidden.shape
    x = rms_norm(hidden, w["input_layernorm.weight"], spec.rms_norm_eps)
    q, k, v = _qkv(w, spec, x)
    q = q.view(batch, steps, spec.num_heads, spec.head_dim).transpose(1, 2)
    k = k.view(batch, steps, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
    v = v.view(batch, steps, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
    if "self_attn.q_norm.weight" in w:  # Qwen3 normalises each head before RoPE
        q = rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_norm_eps)
    cos_table, sin_table = rotary.tables(hidden.device, hidden.dtype)
    cos = cos_table[positions].unsqueeze(1)
    sin = sin_table[positions].unsqueeze(1)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    window = spec.sliding_windows[index]
    if prefill:
        cache = caches[0].layer(index)
        cache[0, :, :steps].copy_(k[0], non_blocking=True)
        cache[1, :, :steps].copy_(v[0], non_blocking=True)
        mask = None
        if window is not None and steps > window:
            rows = torch.arange(steps, device=hidden.device)
            offsets = rows[:, None] - rows[None, :]
            mask = (offsets >= 0) & (offsets < window)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=spec.num_heads != spec.num_kv_heads
        )
    else:
        outputs = []
        for b in range(batch):
            cache = caches[b].layer(index)
            position = position_list[b]
            cache[0, :, position].copy_(k[b, :, 0])
            cache[1, :, position].copy_(v[b, :, 0])
            first = 0 if window is None else max(0, position + 1 - window)
            keys = cache[0, :, first : position + 1].unsqueeze(0)
            values = cache[1, :, first : position + 1].unsqueeze(0)
            outputs.append(
                F.scaled_dot_product_attention(
                    q[b : b + 1], keys, values, enable_gqa=spec.num_heads != spec.num_kv_heads
                )
            )
        attended = torch.cat(outputs, dim=0)
    attended = attended.transpose(1, 2).reshape(batch, steps, spec.num_heads * spec.head_dim)
    hidden = hidden + _linear(w, "self_attn.o_proj", attended)
    x = rms_norm(hidden, w["post_attention_layernorm.weight"], spec.rms_norm_eps)
    return hidden + _mlp(w, spec, x)
