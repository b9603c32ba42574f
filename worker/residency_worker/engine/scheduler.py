"""Who runs in the next step of one model: admission into KV slots, chunked prefill beside decode, and
what each step's sampled tokens mean for its sequences.

Every running sequence owns one slot of the model's KV pool; ``running[i]`` always owns slot ``i`` (a
sequence that ends hands its slot to the sequence in the highest slot, whose cached tokens move with
it). A step takes one token of every decoding sequence and, within a token budget, the next chunk of
prompts still being prefilled, oldest first — so running streams keep producing tokens while a long
prompt arrives. When the model prefills and decodes in different places (offloaded layers decoded on the
host but prefilled streamed), a step cannot do both: prefill and decode steps then alternate.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from residency_worker.engine.generate import Detokenizer, Request, RequestEvent
from residency_worker.engine.kvpool import KVPool
from residency_worker.engine.model import PromptChunk, StepLayout
from residency_worker.engine.sampler import Sampled, SampleRow
from residency_worker.engine.types import EngineError, ExecutionMode

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request: Request
    detokenizer: Detokenizer
    generator: torch.Generator | None
    max_tokens: int
    eos_ids: frozenset[int]
    cached_tokens: int = 0  # tokens whose keys and values are in the pool
    last_token: int = 0
    generated: int = 0
    slot: int = -1

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.cached_tokens < self.prompt_tokens


@dataclass(frozen=True)
class Step:
    """One forward pass: its layout, its input tokens, the rows to sample and whose they are."""

    layout: StepLayout
    token_ids: list[int]
    mode: ExecutionMode
    decoding: list[Sequence]
    chunked: list[tuple[Sequence, int]]  # (sequence, tokens of its prompt cached after this step)
    sample_rows: list[int]
    sampled: list[Sequence]  # whose token each sampled row is

    @property
    def prefills(self) -> bool:
        return bool(self.chunked)


@dataclass
class Scheduler:
    """The waiting queue and the running batch of one model (driven by its runner's thread)."""

    max_batch_size: int
    prefill_chunk_tokens: int
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    _last_step_prefilled: bool = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def batch_full(self) -> bool:
        return len(self.running) >= self.max_batch_size

    def admit(self, sequence: Sequence) -> None:
        sequence.slot = len(self.running)
        self.running.append(sequence)

    def remove(self, sequence: Sequence, pool: KVPool | None) -> None:
        """Frees the sequence's slot; the sequence in the highest slot moves into it (its KV with it)."""
        slot = sequence.slot
        last = self.running.pop()
        if last is not sequence:
            if pool is not None:
                pool.move_slot(last.slot, slot, last.cached_tokens)
            last.slot = slot
            self.running[slot] = last
        sequence.slot = -1

    def used_tokens(self) -> list[int]:
        """Cached tokens per occupied slot."""
        return [s.cached_tokens for s in self.running]

    # -- planning a step ----------------------------------------------------------------------------
    def next_step(self, decode_mode: ExecutionMode, prefill_mode: ExecutionMode) -> Step | None:
        decoding = [s for s in self.running if not s.prefilling]
        prefilling = sorted((s for s in self.running if s.prefilling), key=lambda s: s.request.request_id)
        if not decoding and not prefilling:
            return None
        if decode_mode != prefill_mode and decoding and prefilling:
            # one place per pass: alternate, so neither decoding streams nor new prompts starve
            if self._last_step_prefilled:
                prefilling = []
            else:
                decoding = []
        mode = decode_mode if decoding else prefill_mode
        token_ids = [s.last_token for s in decoding]
        chunks: list[PromptChunk] = []
        chunked: list[tuple[Sequence, int]] = []
        sample_rows = list(range(len(decoding)))
        sampled = list(decoding)
        row = len(decoding)
        budget = self.prefill_chunk_tokens
        for sequence in prefilling:
            if budget <= 0:
                break
            start = sequence.cached_tokens
            length = min(budget, sequence.prompt_tokens - start)
            budget -= length
            chunks.append(PromptChunk(sequence.slot, start, length))
            token_ids.extend(sequence.request.prompt_ids[start : start + length])
            chunked.append((sequence, start + length))
            row += length
            if start + length == sequence.prompt_tokens:  # the prompt's last token gives the first output
                sample_rows.append(row - 1)
                sampled.append(sequence)
        self._last_step_prefilled = bool(chunks)
        attend = max((s.cached_tokens + 1 for s in decoding), default=1)
        layout = StepLayout(
            decode_slots=tuple(s.slot for s in decoding),
            decode_positions=tuple(s.cached_tokens for s in decoding),
            chunks=tuple(chunks),
            occupied=len(self.running),
            attend_tokens=attend,
        )
        return Step(layout, token_ids, mode, decoding, chunked, sample_rows, sampled)

    @staticmethod
    def sample_rows(step: Step) -> list[SampleRow]:
        return [SampleRow(s.request.params, s.generator) for s in step.sampled]

    # -- after the step -----------------------------------------------------------------------------
    def complete(self, step: Step, result: Sampled, pool: KVPool) -> None:
        """Advances every sequence of the step and emits its token; ends the ones that finished."""
        for sequence in step.decoding:
            sequence.cached_tokens += 1
        for sequence, cached in step.chunked:
            sequence.cached_tokens = cached
        for row, sequence in enumerate(step.sampled):
            try:
                finished = accept(
                    sequence, result.token_ids[row], result.logprobs[row], result.top_logprobs[row]
                )
            except Exception as exc:  # one request's detokenizing fails: only that request fails
                log.exception("sampling failed for request %s", sequence.request.request_id)
                self.remove(sequence, pool)
                error = EngineError("InferenceFailed", f"sampling failed: {exc}")
                sequence.request.emit(RequestEvent(None, "", "error", error))
                continue
            if finished:
                self.remove(sequence, pool)

    def drop_cancelled(self, pool: KVPool | None) -> None:
        for sequence in [s for s in self.running if s.request.cancelled]:
            self.remove(sequence, pool)
            sequence.request.emit(RequestEvent(None, "", "cancelled"))

    def fail_all(self, error: EngineError) -> None:
        for sequence in self.running:
            sequence.slot = -1
            sequence.request.emit(RequestEvent(None, "", "error", error))
        self.running = []


def accept(sequence: Sequence, token: int, logprob: float | None, top: tuple[tuple[int, float], ...]) -> bool:
    """Emits the sequence's next token; True when the sequence has finished."""
    sequence.last_token = token
    sequence.generated += 1
    delta, stopped = sequence.detokenizer.push(token)
    finish: str | None = None
    if stopped or token in sequence.eos_ids:
        finish = "stop"
    elif sequence.generated >= sequence.max_tokens:
        finish = "length"
    if finish is not None and not stopped:
        delta += sequence.detokenizer.flush()
    sequence.request.emit(RequestEvent(token, delta, finish, logprob=logprob, top_logprobs=top))
    return finish is not None
