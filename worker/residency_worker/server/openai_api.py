"""The worker's OpenAI API: completions and chat (plain and streamed, `n` choices, log-probabilities,
usage in streams), the model list and one model. Handlers queue requests and relay events; inference runs
on the engine's threads, so the event loop never blocks on torch."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from residency_worker.engine import Engine, EngineError, SamplingParams
from residency_worker.engine.generate import RequestEvent
from residency_worker.server.deps import LoadTimes, engine_of, inference_of, load_times_of, require_inference
from residency_worker.server.errors import ApiError, SafeJSONResponse, invalid
from residency_worker.server.inference import Generation, Inference
from residency_worker.server.schemas import (
    STOP_MAX_CHARS,
    STOP_MAX_COUNT,
    ChatBody,
    CompletionBody,
    unsupported,
)

TTFT_HEADER = "X-Residency-TTFT-Seconds"
"""Time to the first token of a plain answer, from the engine's queue on."""
DECODE_HEADER = "X-Residency-Decode-Seconds"
"""From the first token to the last of a plain answer: the router subtracts it from the time it waited, so
its time to first token counts every queue before the engine's too (event loop, tokenizer, network)."""

INLINE_TOKENIZE_MAX_CHARS = 2000
"""A prompt up to this long is tokenized on the event loop (well under a millisecond): the thread it would
otherwise go to costs more than that under load, and waits for one of the default pool's few threads."""

router = APIRouter(prefix="/v1", dependencies=[Depends(require_inference)])
EngineDep = Annotated[Engine, Depends(engine_of)]
InferenceDep = Annotated[Inference, Depends(inference_of)]
LoadTimesDep = Annotated[LoadTimes, Depends(load_times_of)]


def _sampling(body: CompletionBody | ChatBody, max_tokens: int, logprobs: int | None) -> SamplingParams:
    name = unsupported(body)
    if name is not None:
        raise invalid(f"`{name}` is not supported by this server; send the request without it", param=name)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > STOP_MAX_COUNT:
        raise invalid(f"at most {STOP_MAX_COUNT} stop sequences", param="stop")
    if any(len(text) > STOP_MAX_CHARS for text in stop):
        raise invalid(f"a stop sequence has at most {STOP_MAX_CHARS} characters", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        logprobs=logprobs,
    )


def _include_usage(body: CompletionBody | ChatBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _answer(content: dict[str, Any], generation: Generation) -> SafeJSONResponse:
    headers = {}
    ttft = generation.ttft_seconds()
    if ttft is not None:
        headers[TTFT_HEADER] = f"{ttft:.4f}"
    decode = generation.decode_seconds()
    if decode is not None:
        headers[DECODE_HEADER] = f"{decode:.4f}"
    return SafeJSONResponse(content, headers=headers)


# -- log-probabilities in OpenAI's two formats ------------------------------------------------------
def _completion_logprobs(
    engine: Engine, name: str, events: list[RequestEvent], offset: int
) -> dict[str, Any]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs (token → logprob), text_offset."""
    scored = [e for e in events if e.token_id is not None and e.logprob is not None]
    tokens = engine.token_texts(name, [int(e.token_id) for e in scored if e.token_id is not None])
    offsets, position = [], offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    top = []
    for event in scored:
        texts = engine.token_texts(name, [token_id for token_id, _ in event.top_logprobs])
        top.append({text: lp for text, (_, lp) in zip(texts, event.top_logprobs, strict=True)})
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in scored],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _chat_logprobs(engine: Engine, name: str, events: list[RequestEvent]) -> dict[str, Any]:
    """The chat format: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    content = []
    for event in events:
        if event.token_id is None or event.logprob is None:
            continue
        (text,) = engine.token_texts(name, [event.token_id])
        alternatives = engine.token_texts(name, [token_id for token_id, _ in event.top_logprobs])
        content.append(
            {
                "token": text,
                "logprob": event.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": alt, "logprob": lp, "bytes": list(alt.encode())}
                    for alt, (_, lp) in zip(alternatives, event.top_logprobs, strict=True)
                ],
            }
        )
    return {"content": content}


@router.get("/models")
async def list_models(engine: EngineDep, times: LoadTimesDep) -> dict[str, Any]:
    data = []
    for name in engine.names():
        item = _model_item(engine, times, name)
        if item is not None:
            data.append(item)
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, engine: EngineDep, times: LoadTimesDep) -> dict[str, Any]:
    item = _model_item(engine, times, model_id)
    if item is None:
        raise ApiError(
            404, "ModelNotFound", f"model {model_id!r} is not loaded on this worker", param="model"
        )
    return item


def _model_item(engine: Engine, times: LoadTimes, name: str) -> dict[str, Any] | None:
    try:
        status = engine.status(name)
    except EngineError:
        return None
    return {
        "id": name,
        "object": "model",
        "created": times.created(name),
        "owned_by": name.split("/", 1)[0] if "/" in name else "residency",
        "state": status.state,
        "resident_fraction": status.residency.resident_fraction,
    }


@router.post("/completions")
async def completions(
    body: CompletionBody, client: Request, engine: EngineDep, inference: InferenceDep
) -> Any:
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
        if len(body.prompt) != 1:
            raise invalid("send one prompt per request", param="prompt")
        prompt: str | list[int] = str(body.prompt[0])
    else:
        prompt = body.prompt  # type: ignore[assignment]
    params = _sampling(body, body.max_tokens, body.logprobs)
    if not isinstance(prompt, str):
        prompt_ids = [int(t) for t in prompt]
    elif len(prompt) <= INLINE_TOKENIZE_MAX_CHARS:
        prompt_ids = engine.encode(body.model, prompt)
    else:  # tokenizing a long prompt takes a while: off the event loop
        prompt_ids = await asyncio.to_thread(engine.encode, body.model, prompt)
    generation = await inference.start(body.model, prompt_ids, params, body.n)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    include_usage = _include_usage(body)
    offsets = [0] * body.n

    def chunk(index: int, event: RequestEvent, events: list[RequestEvent]) -> dict[str, Any]:
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(engine, body.model, events, offsets[index])
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        choice = {
            "index": index,
            "text": event.text,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }
        data = _envelope(completion_id, "text_completion", created, body.model, [choice])
        if include_usage:
            data["usage"] = None
        return data

    def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
        return _envelope(completion_id, "text_completion", created, body.model, [], usage=usage)

    if body.stream:
        return inference.stream(generation, chunk, usage_chunk if include_usage else None)
    finals = await inference.collect(client, generation)
    choices = []
    for index, request in enumerate(generation.requests):
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(engine, body.model, generation.log(index), 0)
        choices.append(
            {
                "index": index,
                "text": request.text,
                "logprobs": logprobs,
                "finish_reason": finals[index].finish_reason,
            }
        )
    content = _envelope(
        completion_id, "text_completion", created, body.model, choices, usage=generation.usage()
    )
    return _answer(content, generation)


def _envelope(
    completion_id: str, kind: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """The fields every completion object, chunk and usage chunk carries (OpenAI's shape)."""
    return {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }


@router.post("/chat/completions")
async def chat_completions(
    body: ChatBody, client: Request, engine: EngineDep, inference: InferenceDep
) -> Any:
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    params = _sampling(body, max_tokens, logprobs)
    messages = [{"role": m.chat_role(), "content": m.text()} for m in body.messages]
    prompt_ids = await asyncio.to_thread(engine.chat_prompt, body.model, messages)
    generation = await inference.start(body.model, prompt_ids, params, body.n)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    include_usage = _include_usage(body)
    started: set[int] = set()  # choices whose first chunk (with the role) went out

    def chunk(index: int, event: RequestEvent, events: list[RequestEvent]) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": event.text} if event.text else {}
        if index not in started:  # the role comes with the first token, so the first byte means one
            started.add(index)
            delta = {"role": "assistant", "content": event.text}
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": event.finish_reason}
        if body.logprobs:
            choice["logprobs"] = _chat_logprobs(engine, body.model, events)
        data = _envelope(completion_id, "chat.completion.chunk", created, body.model, [choice])
        if include_usage:
            data["usage"] = None
        return data

    def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
        return _envelope(completion_id, "chat.completion.chunk", created, body.model, [], usage=usage)

    if body.stream:
        return inference.stream(generation, chunk, usage_chunk if include_usage else None)
    finals = await inference.collect(client, generation)
    choices = []
    for index, request in enumerate(generation.requests):
        choice: dict[str, Any] = {
            "index": index,
            "message": {"role": "assistant", "content": request.text},
            "finish_reason": finals[index].finish_reason,
            "logprobs": _chat_logprobs(engine, body.model, generation.log(index)) if body.logprobs else None,
        }
        choices.append(choice)
    content = _envelope(
        completion_id, "chat.completion", created, body.model, choices, usage=generation.usage()
    )
    return _answer(content, generation)
