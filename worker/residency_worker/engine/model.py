"""The decoder math of the supported families (Llama, Mistral, Qwen2, Qwen3, Phi-3), on weight dicts.

Each function takes the tensors of one placement unit on whatever device it computes on, so the same
code runs a GPU-resident layer, a layer streamed into a staging buffer, or a layer computed on the CPU.
Numerics follow transformers' own implementations (RMSNorm in float32, rotate-half RoPE, SDPA).

A step is flat: ``hidden`` is ``[tokens, hidden]`` holding one token of every decoding sequence first,
then the prompt chunks being prefilled. The linear layers run once over all of them; attention reads the
step's layout from a :class:`StepTensors` (the per-step context, as nano-vllm's attention does), attends
for all decoding sequences in one call over the model's KV pool, and for each prompt chunk in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from residency_worker.engine import cpu_kernels
from residency_worker.engine.loading import ArchSpec

Weights = dict[str, torch.Tensor]


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
    packed = w.get(f"{name}.weight{cpu_kernels.PACKED_SUFFIX}")
    if packed is not None:  # a layer computed on the CPU from oneDNN's prepacked weights
        return cpu_kernels.linear(x, packed, w.get(f"{name}.bias"))
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, 1, rotary_dim] (partial rotary keeps the rest)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def embed(w: Weights, token_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(token_ids, w["embed_tokens.weight"])


def final_norm(norm_weight: torch.Tensor, spec: ArchSpec, hidden_last: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_last, norm_weight, spec.rms_norm_eps)


def logits_chunk(
    rows: torch.Tensor, normed: torch.Tensor, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits of one chunk of vocabulary rows; the head always runs chunk by chunk."""
    if packed is not None:
        return cpu_kernels.linear(normed, packed, None).float()
    return F.linear(normed, rows).float()


def _has(w: Weights, name: str) -> bool:
    """Whether the unit holds the projection ``name``, dense or only as a packed fused copy."""
    return f"{name}.weight" in w or f"{name}.weight{cpu_kernels.PACKED_SUFFIX}" in w


def _qkv_roped(
    w: Weights, spec: ArchSpec, x: torch.Tensor, step: StepTensors
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries [tokens, heads, dim], keys and values [tokens, kv_heads, dim], rotary embedding applied.

    A fused projection (Phi-3's own, or the packed copy of q/k/v on the CPU) gives queries and keys as
    adjacent columns: the rotary embedding then runs once over both."""
    tokens = x.shape[0]
    q_heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    normed_heads = "self_attn.q_norm.weight" in w  # Qwen3 normalises each head before RoPE
    if _has(w, "self_attn.qkv_proj"):
        qkv = _linear(w, "self_attn.qkv_proj", x)
        qk_size = (q_heads + kv_heads) * dim
        v = qkv[:, qk_size:].view(tokens, kv_heads, dim)
        if not normed_heads:
            qk = _apply_rope(qkv[:, :qk_size].view(tokens, q_heads + kv_heads, dim), step.cos, step.sin)
            return qk[:, :q_heads], qk[:, q_heads:], v
        q, k = qkv[:, : q_heads * dim], qkv[:, q_heads * dim : qk_size]
    else:
        q = _linear(w, "self_attn.q_proj", x)
        k = _linear(w, "self_attn.k_proj", x)
        v = _linear(w, "self_attn.v_proj", x).view(tokens, kv_heads, dim)
    q = q.reshape(tokens, q_heads, dim)
    k = k.reshape(tokens, kv_heads, dim)
    if normed_heads:
        q = rms_norm(q, w["self_attn.q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], spec.rms_norm_eps)
    return _apply_rope(q, step.cos, step.sin), _apply_rope(k, step.cos, step.sin), v


def _mlp(w: Weights, spec: ArchSpec, x: torch.Tensor) -> torch.Tensor:
    act = ACT2FN[spec.hidden_act]
    if _has(w, "mlp.gate_up_proj"):
        gate, up = _linear(w, "mlp.gate_up_proj", x).chunk(2, dim=-1)
        return _linear(w, "mlp.down_proj", up * act(gate))
    return _linear(w, "mlp.down_proj", act(_linear(w, "mlp.gate_proj", x)) * _linear(w, "mlp.up_proj", x))


def index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Step metadata on ``device``: copied from pinned memory to a GPU, so the copy never blocks the host."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class PromptChunk:
    """A piece of one prompt prefilled in a step: ``length`` tokens from position ``start`` into ``slot``."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class StepLayout:
    """Where each token of a flat step goes: decoding sequences first (one token each), then chunks.

    ``occupied`` slots (``0 .. occupied-1``) are attended by the decode call, over the first
    ``attend_tokens`` positions of each; rows of slots that do not decode this step attend to one
    position only and their output is dropped.
    """

    decode_slots: tuple[int, ...]
    decode_positions: tuple[int, ...]
    chunks: tuple[PromptChunk, ...]
    occupied: int
    attend_tokens: int

    @property
    def decode_rows(self) -> int:
        return len(self.decode_slots)

    @property
    def tokens(self) -> int:
        return self.decode_rows + sum(c.length for c in self.chunks)

    @property
    def dense(self) -> bool:
        """Every occupied slot decodes, in slot order: the decode call needs no scatter or gather."""
        return self.decode_slots == tuple(range(self.occupied))

    def positions(self) -> list[int]:
        flat = list(self.decode_positions)
        for chunk in self.chunks:
            flat.extend(range(chunk.start, chunk.start + chunk.length))
        return flat


@dataclass
class StepTensors:
    """A step's layout as tensors on one compute device (built once per device per step)."""

    layout: StepLayout
    positions: torch.Tensor  # [tokens]
    cos: torch.Tensor  # [tokens, 1, rotary_dim]
    sin: torch.Tensor
    decode_slots: torch.Tensor  # [decode rows]
    decode_positions: torch.Tensor  # [decode rows]
    row_positions: torch.Tensor  # [occupied]: each occupied slot's decode position, 0 if it does not decode
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @staticmethod
    def build(layout: StepLayout, rotary: Rotary, device: torch.device, dtype: torch.dtype) -> StepTensors:
        rows = [0] * layout.occupied
        for slot, position in zip(layout.decode_slots, layout.decode_positions, strict=True):
            rows[slot] = position
        positions = index_tensor(layout.positions(), device)
        cos_table, sin_table = rotary.tables(device, dtype)
        return StepTensors(
            layout=layout,
            positions=positions,
            cos=cos_table[positions].unsqueeze(1),
            sin=sin_table[positions].unsqueeze(1),
            decode_slots=index_tensor(layout.decode_slots, device),
            decode_positions=index_tensor(layout.decode_positions, device),
            row_positions=index_tensor(rows, device),
        )

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[occupied, 1, 1, attend_tokens]: key j is visible to a slot at position p when j <= p (and
        j > p - window for a sliding-window layer). None when every key is visible to every row (each
        occupied slot decodes at the last attended position, within the window): attention needs no mask.
        """
        if window in self._masks:  # decided once per step and window, not once per layer
            return self._masks[window]
        layout = self.layout
        mask = None
        if not (
            layout.dense
            and all(p == layout.attend_tokens - 1 for p in layout.decode_positions)
            and (window is None or window >= layout.attend_tokens)
        ):
            keys = torch.arange(layout.attend_tokens, device=self.positions.device)
            rows = self.row_positions[:, None]
            visible = keys[None, :] <= rows
            if window is not None:
                visible &= keys[None, :] > rows - window
            mask = visible[:, None, None, :]
        self._masks[window] = mask
        return mask


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, step: StepTensors, window: int | None
) -> torch.Tensor:
    """One call for every decoding sequence: q [rows, heads, dim], k/v [rows, kv_heads, dim] of the new
    token; writes them into the pool at each sequence's slot and position, then attends over the pool."""
    layout = step.layout
    kv[0][step.decode_slots, :, step.decode_positions] = k
    kv[1][step.decode_slots, :, step.decode_positions] = v
    keys = kv[0, : layout.occupied, :, : layout.attend_tokens]
    values = kv[1, : layout.occupied, :, : layout.attend_tokens]
    if layout.dense:
        queries = q
    else:
        queries = q.new_zeros((layout.occupied, *q.shape[1:]))
        queries[step.decode_slots] = q
    attended = F.scaled_dot_product_attention(
        queries.unsqueeze(2),
        keys,
        values,
        attn_mask=step.decode_mask(window),
        enable_gqa=q.shape[1] != k.shape[1],
    ).squeeze(2)
    return attended if layout.dense else attended[step.decode_slots]


def _chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    chunk: PromptChunk,
    window: int | None,
) -> torch.Tensor:
    """A prompt chunk: q [length, heads, dim] attends causally to the slot's earlier tokens and itself.

    The pool may live on another device than the one computing (a layer streamed in for prefill whose
    KV lives on the host, where it decodes): the chunk's keys are copied to it, earlier ones read back."""
    end = chunk.start + chunk.length
    kv[0, chunk.slot, :, chunk.start : end].copy_(k.transpose(0, 1), non_blocking=True)
    kv[1, chunk.slot, :, chunk.start : end].copy_(v.transpose(0, 1), non_blocking=True)
    gqa = q.shape[1] != k.shape[1]
    queries = q.transpose(0, 1).unsqueeze(0)
    if chunk.start == 0 and (window is None or chunk.length <= window):
        keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=gqa)
    else:
        keys = kv[0, chunk.slot : chunk.slot + 1, :, :end].to(q.device)
        values = kv[1, chunk.slot : chunk.slot + 1, :, :end].to(q.device)
        rows = torch.arange(chunk.start, end, device=q.device)[:, None]
        columns = torch.arange(end, device=q.device)[None, :]
        visible = columns <= rows
        if window is not None:
            visible &= columns > rows - window
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, enable_gqa=gqa)
    return attended[0].transpose(0, 1)


def layer(
    w: Weights, spec: ArchSpec, index: int, hidden: torch.Tensor, step: StepTensors, kv: torch.Tensor
) -> torch.Tensor:
    """One decoder layer over a flat step ``hidden`` [tokens, hidden_size]; ``kv`` is the layer's part
    of the pool ``[2, slots, kv_heads, capacity, head_dim]``."""
    tokens = hidden.shape[0]
    x = rms_norm(hidden, w["input_layernorm.weight"], spec.rms_norm_eps)
    q, k, v = _qkv_roped(w, spec, x, step)
    window = spec.sliding_windows[index]
    layout = step.layout
    rows = layout.decode_rows
    pieces = []
    if rows:
        pieces.append(_decode_attention(q[:rows], k[:rows], v[:rows], kv, step, window))
    start = rows
    for chunk in layout.chunks:
        stop = start + chunk.length
        pieces.append(_chunk_attention(q[start:stop], k[start:stop], v[start:stop], kv, chunk, window))
        start = stop
    attended = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    hidden = hidden + _linear(w, "self_attn.o_proj", attended.reshape(tokens, spec.num_heads * spec.head_dim))
    x = rms_norm(hidden, w["post_attention_layernorm.weight"], spec.rms_norm_eps)
    return hidden + _mlp(w, spec, x)
