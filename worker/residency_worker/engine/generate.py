"""Requests, their events, and stop-sequence handling (sampling itself runs on the device: ``sampler``)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from residency_worker.engine.types import EngineError, SamplingParams

_request_ids = itertools.count(1)


@dataclass(frozen=True)
class RequestEvent:
    """What a request produced at one step: a token and the text it made safe to show, or the end."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: EngineError | None = None
    logprob: float | None = None  # of the token, when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), likeliest first


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


MAX_LOGPROBS = 20
"""The most alternatives a request may ask for per token (OpenAI's limit)."""


def check_request(request: Request, model: str, max_sequence_length: int, vocab_size: int) -> None:
    """Refuses a request the model cannot serve, with the reason (before it is queued)."""
    prompt_tokens = len(request.prompt_ids)
    if prompt_tokens == 0:
        raise EngineError("InvalidRequest", "the prompt is empty")
    if prompt_tokens >= max_sequence_length:
        raise EngineError(
            "InvalidRequest",
            f"the prompt has {prompt_tokens} tokens; {model} accepts at most {max_sequence_length - 1}",
        )
    if request.params.max_tokens < 1:
        raise EngineError("InvalidRequest", "max_tokens must be at least 1")
    if request.params.top_k < 0:
        raise EngineError("InvalidRequest", "top_k must be 0 (no cut) or positive")
    logprobs = request.params.logprobs
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise EngineError("InvalidRequest", f"logprobs must lie in [0, {MAX_LOGPROBS}]")
    seed = request.params.seed
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise EngineError("InvalidRequest", f"seed must lie in [{SEED_MIN}, {SEED_MAX}]")
    if any(not 0 <= t < vocab_size for t in request.prompt_ids):
        raise EngineError("InvalidRequest", f"prompt token ids must lie in [0, {vocab_size})")
