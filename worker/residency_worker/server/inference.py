"""One API request's generation on the engine: `n` engine requests (one per choice), their events relayed to
the event loop, a preempted model waited for, a client that hangs up cancelling its requests.

The engine is used only through its public methods: `Engine.submit` / `runner` / `token_texts` and
`ModelRunner.state` / `cancel`; `SamplingParams.logprobs` asks it for log-probabilities per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from residency.openai_errors import error_body
from residency_worker.engine import Engine, EngineError, SamplingParams
from residency_worker.engine.generate import SEED_MAX, SEED_MIN, RequestEvent
from residency_worker.engine.generate import Request as EngineRequest
from residency_worker.engine.runner import ModelRunner
from residency_worker.server.errors import ApiError, ServerSettings
from residency_worker.server.metrics import WorkerMetrics

PREEMPTED_POLL_SECONDS = 0.05
"""How often a request waiting on a preempted model looks whether it resumed (on the event loop: a waiter
holds no thread), and how long an in-flight request waits for its next token before it looks."""


@dataclass
class Generation:
    """The engine requests of one API request (choice i is requests[i]) and their events, in one queue."""

    name: str
    runner: ModelRunner
    requests: list[EngineRequest]
    events: asyncio.Queue[tuple[int, RequestEvent]]
    finals: dict[int, RequestEvent] = field(default_factory=dict)
    logs: dict[int, list[RequestEvent]] = field(default_factory=dict)  # each choice's events (plain answers)

    def log(self, index: int) -> list[RequestEvent]:
        return self.logs.get(index, [])

    def cancel(self) -> None:
        for request in self.requests:
            self.runner.cancel(request)  # a no-op for a finished one

    def usage(self) -> dict[str, int]:
        prompt = len(self.requests[0].prompt_ids)
        completion = sum(len(r.token_ids) for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def ttft_seconds(self) -> float | None:
        """Time from submission to the first token of any choice (what the router's admission watches)."""
        firsts = [r.first_token_at - r.submitted_at for r in self.requests if r.first_token_at is not None]
        return min(firsts) if firsts else None

    def decode_seconds(self) -> float | None:
        """From the first token to the last (the longest choice): the answer's time after its first token."""
        spans = [
            r.finished_at - r.first_token_at
            for r in self.requests
            if r.first_token_at is not None and r.finished_at is not None
        ]
        return max(spans) if spans else None


@dataclass
class Inference:
    """The request lifecycle around one engine (shared by the OpenAI routes; `app.state.inference`)."""

    engine: Engine
    settings: ServerSettings
    metrics: WorkerMetrics

    async def start(self, name: str, prompt_ids: list[int], params: SamplingParams, n: int) -> Generation:
        """Queues `n` requests (choices); a full queue answers 429 at once, preempted or not. Choice i > 0
        of a seeded request uses seed + i, so the choices differ and the whole answer is reproducible."""
        runner = self.engine.runner(name)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, RequestEvent]] = asyncio.Queue()
        generation = Generation(name, runner, [], events)
        for index in range(n):
            choice_params = params
            if params.seed is not None and index:
                seed = SEED_MIN + (params.seed - SEED_MIN + index) % (SEED_MAX - SEED_MIN + 1)
                choice_params = dataclasses.replace(params, seed=seed)

            def relay(event: RequestEvent, index: int = index) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))

            try:
                request = self.engine.submit(name, prompt_ids, choice_params, on_event=relay)
            except EngineError as exc:
                generation.cancel()  # the choices queued already give their slots back
                self.metrics.requests.labels(name, exc.reason).inc()
                raise
            generation.requests.append(request)
        # a preempted model: wait a while for a resume, then tell the client when to retry
        if runner.state == "preempted" and not await self.until_ready(runner):
            raise self.preempted_error(generation)
        return generation

    async def until_ready(self, runner: ModelRunner) -> bool:
        """Whether a preempted model resumed (or went away) within preempted_wait_seconds.

        Waits on the event loop, not in an executor thread: any number of waiting requests leaves the
        threads to tokenisation of other models and to the admin API that would resume this one.
        """
        deadline = time.monotonic() + self.settings.preempted_wait_seconds
        while runner.state == "preempted":
            remaining_seconds = deadline - time.monotonic()
            if remaining_seconds <= 0:
                return False
            await asyncio.sleep(min(PREEMPTED_POLL_SECONDS, remaining_seconds))
        return True

    def preempted_error(self, generation: Generation) -> ApiError:
        """Gives up on requests parked by a preemption: frees their slots, tells the client when to retry."""
        generation.cancel()
        self.metrics.requests.labels(generation.name, "ModelPreempted").inc()
        return ApiError(
            503,
            "ModelPreempted",
            f"model {generation.name} is preempted and did not resume within "
            f"{self.settings.preempted_wait_seconds} s",
            self.settings.retry_after_seconds,
        )

    async def next_event(self, generation: Generation) -> tuple[int, RequestEvent]:
        """The next (choice, event); raises 503 ModelPreempted (ApiError) once its model, preempted while
        the requests were queued or running, has not resumed within preempted_wait_seconds."""
        while True:
            try:
                async with asyncio.timeout(PREEMPTED_POLL_SECONDS):
                    return await generation.events.get()
            except TimeoutError:
                pass  # no event yet: a slow step, or a parked request
            runner = generation.runner
            if (
                runner.state == "preempted"
                and not await self.until_ready(runner)
                and generation.events.empty()
            ):
                raise self.preempted_error(generation)

    async def collect(self, client: Request, generation: Generation) -> dict[int, RequestEvent]:
        """Each choice's last event; a client that hangs up first cancels them, freeing their batch slots."""
        hang_up = asyncio.create_task(_cancel_on_disconnect(client, generation))
        try:
            while len(generation.finals) < len(generation.requests):
                index, event = await self.next_event(generation)
                generation.logs.setdefault(index, []).append(event)
                if event.finish_reason is None:
                    continue
                generation.finals[index] = event
                if event.error is not None:
                    self.metrics.requests.labels(generation.name, event.error.reason).inc()
                    raise event.error
        finally:
            hang_up.cancel()
            generation.cancel()  # no-op when finished
        if any(e.finish_reason == "cancelled" for e in generation.finals.values()):
            self.metrics.requests.labels(generation.name, "cancelled").inc()  # nobody reads the answer
            return generation.finals
        self.count_done(generation)
        return generation.finals

    def count_done(self, generation: Generation) -> None:
        self.metrics.tokens.labels(generation.name).inc(sum(len(r.token_ids) for r in generation.requests))
        self.metrics.requests.labels(generation.name, "ok").inc()

    def stream(
        self,
        generation: Generation,
        chunk: Callable[[int, RequestEvent, list[RequestEvent]], dict[str, Any] | None],
        usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None,
    ) -> StreamingResponse:
        """Server-sent events: `chunk(choice, event, events since the last chunk of that choice)` for each
        event that has text or ends a choice (None: skip), then the usage chunk when asked, then [DONE]."""

        async def body() -> AsyncIterator[str]:
            pending: dict[int, list[RequestEvent]] = {}
            try:
                while len(generation.finals) < len(generation.requests):
                    try:
                        index, event = await self.next_event(generation)
                    except ApiError as exc:  # too late for a status: the SSE error event the router sends
                        gone = error_body(exc.status, exc.message, exc.code)
                        gone["error"]["retry_after"] = self.settings.retry_after_seconds
                        yield f"data: {json.dumps(gone)}\n\ndata: [DONE]\n\n"
                        return
                    if event.error is not None:
                        self.metrics.requests.labels(generation.name, event.error.reason).inc()
                        failed = error_body(
                            500 if event.error.reason == "InferenceFailed" else 400,
                            event.error.message,
                            event.error.reason,
                        )
                        yield f"data: {json.dumps(failed)}\n\ndata: [DONE]\n\n"
                        return
                    pending.setdefault(index, []).append(event)
                    if event.finish_reason is not None:
                        generation.finals[index] = event
                    if event.text or event.finish_reason is not None:
                        data = chunk(index, event, pending.pop(index))
                        if data is not None:
                            yield f"data: {json.dumps(data)}\n\n"
                self.count_done(generation)
                if usage_chunk is not None:
                    yield f"data: {json.dumps(usage_chunk(generation.usage()))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                generation.cancel()  # no-op when finished; frees the slots if the client went away

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _cancel_on_disconnect(client: Request, generation: Generation) -> None:
    """Cancels the generation once its client hangs up (the server then sends http.disconnect)."""
    while (await client.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()
