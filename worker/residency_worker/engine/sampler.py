"""Sampling on the device: greedy, temperature, top-k and top-p for a whole step in a few batched calls.

Each request draws from its own seeded generator (on the device that holds the logits), so a seeded
request gives the same tokens whatever else shares its batch. A sampled token is the argmax of
``probabilities / noise`` with exponential noise (the exponential race, equivalent to drawing from the
distribution), which keeps the whole step on the device; only the chosen token ids (and log-probabilities
when a request asks for them) come back to the host, in one transfer after the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from residency_worker.engine.types import SamplingParams

MIN_TEMPERATURE = 1e-6
"""Smaller temperatures sample as this one (already all but greedy); keeps float32 arithmetic finite."""


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream on ``device`` (None for greedy requests)."""
    if params.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
    return generator


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None


@dataclass(frozen=True)
class Sampled:
    """Per row: the token, and when asked for, its log-probability and the top alternatives."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[tuple[tuple[int, float], ...]]


def _on(device: torch.device, values: list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
    """Per-row parameters on the logits' device, copied from pinned memory (the host does not wait)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _filtered_probabilities(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Softmax of the temperature-scaled logits after top-k and top-p (float32, [rows, vocab])."""
    device = logits.device
    temperatures = _on(device, [max(r.params.temperature, MIN_TEMPERATURE) for r in rows], torch.float32)
    # shifted so the largest logit is 0: a tiny temperature then gives 0 and -inf, never inf - inf
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperatures[:, None]
    top_ks = [r.params.top_k if 0 < r.params.top_k < logits.shape[-1] else 0 for r in rows]
    if any(top_ks):
        ks = _on(device, top_ks, torch.long)
        kth = torch.topk(scaled, max(top_ks), dim=-1).values.gather(1, (ks - 1).clamp(min=0)[:, None])
        scaled = torch.where((ks[:, None] > 0) & (scaled < kth), float("-inf"), scaled)
    probabilities = torch.softmax(scaled, dim=-1)
    top_ps = [r.params.top_p for r in rows]
    if any(p < 1.0 for p in top_ps):
        ps = _on(device, top_ps, torch.float32)
        ordered, order = torch.sort(probabilities, dim=-1, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < ps[:, None]
        keep[:, 0] = True  # the likeliest token always stays, however small top_p is
        ordered = torch.where(keep, ordered, torch.zeros_like(ordered))
        probabilities = torch.zeros_like(probabilities).scatter_(1, order, ordered)
    return probabilities


def _noise(generator: torch.Generator | None, vocab: int) -> torch.Tensor:
    """Exponential noise from the request's own stream, drawn where its generator lives (the head may
    have moved between the GPU and the host since the request started)."""
    assert generator is not None
    return torch.empty(vocab, device=generator.device).exponential_(generator=generator)


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> Sampled:
    """Next token of every row of float32 ``logits`` [rows, vocab], on the logits' device."""
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, row in enumerate(rows) if row.params.temperature > 0 and row.generator is not None]
    if drawn:
        index = _on(logits.device, drawn, torch.long)
        probabilities = _filtered_probabilities(logits[index], [rows[i] for i in drawn])
        noise = torch.stack([_noise(rows[i].generator, logits.shape[-1]).to(logits.device) for i in drawn])
        tokens = tokens.index_copy(0, index, (probabilities / noise).argmax(dim=-1))
    asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    logprobs: list[float | None] = [None] * len(rows)
    top: list[tuple[tuple[int, float], ...]] = [() for _ in rows]
    if not asked:
        return Sampled(tokens.tolist(), logprobs, top)  # the step's one device→host transfer
    index = _on(logits.device, asked, torch.long)
    log_probabilities = torch.log_softmax(logits[index], dim=-1)
    chosen = log_probabilities.gather(1, tokens[index][:, None])[:, 0]
    widest = max(rows[i].params.logprobs or 0 for i in asked)
    best = torch.topk(log_probabilities, widest, dim=-1) if widest else None
    token_ids = tokens.tolist()
    chosen_list = chosen.tolist()
    best_values = best.values.tolist() if best is not None else []
    best_ids = best.indices.tolist() if best is not None else []
    for slot, row in enumerate(asked):
        logprobs[row] = chosen_list[slot]
        width = rows[row].params.logprobs or 0
        top[row] = tuple(zip(best_ids[slot][:width], best_values[slot][:width], strict=True)) if width else ()
    return Sampled(token_ids, logprobs, top)
