"""Requests, sampling (greedy or temperature/top-p with a per-request seed) and stop-sequence handling."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from residency_worker.engine.types import EngineError, SamplingParams

_request_ids = itertools.count(1)


@dataclass(frozen=True)
class RequestEvent:
    """What a request produced at one step: a token and the text it made safe to show, or the end."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: EngineError | None = None
    logprob: float | None = None  # with SamplingParams.logprobs: the token's log-probability
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the likeliest (token id, log-probability), best first


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[RequestEvent], None] | None = None
    request_id: int = field(default_factory=lambda: next(_request_ids))
    submitted_at: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: EngineError | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: RequestEvent) -> None:
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        self.text += event.text
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.error = event.error
            self.finished_at = time.perf_counter()
        if self.on_event is not None:
            self.on_event(event)
        if event.finish_reason is not None:
            self.done.set()

    def cancel(self) -> None:
        """Asks the engine to drop this request at its next step (e.g. the client went away)."""
        self.cancelled = True

    def wait(self, timeout_seconds: float | None = None) -> Request:
        if not self.done.wait(timeout_seconds):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout_seconds} s")
        if self.error is not None:
            raise self.error
        return self


SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
"""The seeds torch.Generator.manual_seed accepts; the engine and the HTTP API refuse others."""


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token from float32 CPU logits [vocab]: argmax when greedy, else temperature + nucleus."""
    if params.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    # in float64 (any positive temperature a client sends is representable, none rounds to 0) and shifted
    # so that the largest logit is 0: a tiny temperature then gives 0 and -inf, never inf - inf = NaN
    scaled = (logits.double() - logits.max().double()) / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True  # the likeliest token always stays, however small top_p is (even below float32's)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = int(torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator))
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-probability of `token` under float logits [vocab] and the `top` likeliest (id, logprob)."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        best = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return float(logprobs[token]), best


class Detokenizer:
    """Incremental text for a growing token list, holding back text that may begin a stop sequence."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.emitted_chars = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Adds a token; returns (new safe text, whether a stop sequence was reached)."""
        self.token_ids.append(token_id)
        text = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte token
            return "", False
        for stop in self.stop:
            index = text.find(stop, self.emitted_chars)  # held-back text never lets a stop start earlier
            if index != -1:
                delta = text[self.emitted_chars : index]
                self.emitted_chars = index
                return delta, True
        safe = len(text) - self._held_back(text)
        delta = text[self.emitted_chars : safe]
        self.emitted_chars = max(self.emitted_chars, safe)
        return delta, False

    def flush(self) -> str:
        text = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        delta = text[self.emitted_chars :]
        self.emitted_chars = len(text)
        return delta

    def _held_back(self, text: str) -> int:
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
