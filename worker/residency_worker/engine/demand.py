"""The traffic a model saw over its last window, from the requests it accepted (``ModelRunner.demand``)."""

from __future__ import annotations

from collections.abc import Sequence

from residency_worker.engine.generate import Request
from residency_worker.engine.types import ObservedDemand


def observed_demand(
    requests: Sequence[Request], age_seconds: float, window_seconds: float, max_sequence_length: int
) -> ObservedDemand:
    """Output and prompt tokens/s of ``requests`` (those accepted in the window) over ``window_seconds``, for
    a model that has served for ``age_seconds``: see ``ModelRunner.demand``."""
    # one read per request: the batch loop may finish one meanwhile
    seen = [(r.finish_reason, len(r.token_ids), len(r.prompt_ids), r.params.max_tokens) for r in requests]
    counted = [row for row in seen if row[0] is None or row[1] > 0]
    finished = [produced for reason, produced, _, _ in counted if reason is not None]
    typical_output = sum(finished) / len(finished) if finished else None
    output_tokens = 0.0
    for reason, produced, prompt, max_tokens in counted:
        if reason is not None:
            output_tokens += produced
            continue
        limit = max(1, min(max_tokens, max_sequence_length - prompt))
        expected = limit if typical_output is None else min(limit, typical_output)
        output_tokens += max(produced, expected)
    prompt_tokens = sum(prompt for _, _, prompt, _ in counted)
    # never average over less than half the window: a few early requests are not a rate
    span = min(window_seconds, max(window_seconds / 2, age_seconds))
    return ObservedDemand(
        decode_tokens_per_second=output_tokens / span,
        prompt_tokens_per_second=prompt_tokens / span,
        typical_prompt_tokens=max(1, round(prompt_tokens / len(counted))) if counted else None,
        window_seconds=span,
        age_seconds=age_seconds,
    )
