"""Choosing a model's "auto" execution modes by measuring a short prefill and a few decode steps in each."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from residency_worker.engine.generate import Request
from residency_worker.engine.placement import streamed_pieces
from residency_worker.engine.types import ExecutionMode, SamplingParams

if TYPE_CHECKING:
    from residency_worker.engine.runner import ModelRunner

log = logging.getLogger(__name__)


def choose_modes(runner: ModelRunner) -> dict[str, float]:
    """Resolves "auto" modes by timing a short prefill and a few decode steps in each mode.

    Runs before the model serves (on the caller's thread); each mode gets an untimed warm-up
    pass first, so one-off costs (kernel selection, first-touch memory) do not decide.
    """
    decode_choice = runner.options.decode_mode
    prefill_choice = runner.options.prefill_mode or decode_choice
    if "auto" not in (decode_choice, prefill_choice) or not streamed_pieces(runner.weights, runner.plan):
        return {}
    prompt_tokens = max(1, min(32, runner.max_sequence_length // 2))
    measured: dict[str, float] = {}
    scheduler = runner.scheduler
    for mode in ("stream", "cpu"):
        runner.set_residency(None, mode, mode)
        for timed in (False, True):
            request = Request(prompt_ids=[0] * prompt_tokens, params=SamplingParams(max_tokens=5))
            sequence = runner.new_sequence(request)
            scheduler.admit(sequence)
            try:
                step = scheduler.next_step(mode, mode)
                assert step is not None
                start = time.perf_counter()
                token = runner.forward_step(step).token_ids[0]
                prefill_seconds = time.perf_counter() - start
                sequence.cached_tokens, sequence.last_token = prompt_tokens, token
                start = time.perf_counter()
                for _ in range(3):
                    step = scheduler.next_step(mode, mode)
                    assert step is not None
                    sequence.last_token = runner.forward_step(step).token_ids[0]
                    sequence.cached_tokens += 1
                decode_seconds = (time.perf_counter() - start) / 3
            finally:
                scheduler.remove(sequence, None)
            if timed:
                measured[f"prefill_{mode}_seconds"] = prefill_seconds
                measured[f"decode_{mode}_seconds"] = decode_seconds

    def faster(phase: str) -> ExecutionMode:
        return "stream" if measured[f"{phase}_stream_seconds"] <= measured[f"{phase}_cpu_seconds"] else "cpu"

    decode: ExecutionMode = faster("decode") if decode_choice == "auto" else decode_choice
    prefill: ExecutionMode = faster("prefill") if prefill_choice == "auto" else prefill_choice
    runner.set_residency(None, decode, prefill)
    log.info("model %s: measured modes %s → decode %s, prefill %s", runner.name, measured, decode, prefill)
    return measured
