"""FastAPI app of the worker: OpenAI-compatible completions (with SSE streaming), health, metrics, admin.

Inference runs on the engine's per-model threads; handlers only queue requests and relay their events,
so the event loop never blocks on torch. Errors are OpenAI-shaped JSON with the engine's reason as code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from residency.httpguard import (
    DEFAULT_MAX_BODY_BYTES,
    AsgiApp,
    BodyLimit,
    Receive,
    Scope,
    Send,
    bearer_matches,
    json_bytes,
)
from residency_worker.engine import Engine, EngineError, ModelOptions, SamplingParams
from residency_worker.engine.generate import SEED_MAX, SEED_MIN, RequestEvent
from residency_worker.engine.generate import Request as EngineRequest
from residency_worker.engine.runner import ModelRunner
from residency_worker.engine.types import as_dict
from residency_worker.server.metrics import WorkerMetrics

log = logging.getLogger(__name__)

PREEMPTED_POLL_SECONDS = 0.05
"""How often a request waiting on a preempted model looks whether it resumed (on the event loop: a waiter
holds no thread), and how long an in-flight request waits for its next token before it looks."""

_STATUS_OF_REASON = {
    "PathNotAllowed": 403,
    "ModelNotLoaded": 404,
    "ModelNotFound": 404,
    "ModelAlreadyLoaded": 409,
    "InvalidState": 409,
    "PlacementDoesNotFit": 409,
    "QueueFull": 429,
    "ModelPreempted": 503,
    "ModelUnloaded": 503,
    "InferenceFailed": 500,
}


@dataclass(frozen=True)
class ServerSettings:
    admin_token: str | None = None  # None: the admin API refuses every call
    inference_token: str | None = None  # None: inference is open (e.g. behind a cluster network policy)
    preempted_wait_seconds: float = 10.0  # how long a request to a preempted model waits for resume
    retry_after_seconds: int = 5
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before parsing


class SafeJSONResponse(JSONResponse):
    """JSON that renders whatever user input an error echoes (lone surrogates, NaN) instead of failing."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def _validation_error(exc: RequestValidationError) -> SafeJSONResponse:
    """422 naming each offending field; the offending input itself is not echoed back."""
    details = [
        {"type": e.get("type", ""), "loc": list(e.get("loc", ())), "msg": e.get("msg", "")}
        for e in exc.errors()
    ]
    first = details[0] if details else {"type": "", "loc": [], "msg": "invalid request"}
    if first["type"] == "json_invalid":
        field, message = "", f"the request body is not valid JSON ({first['msg']} at {first['loc'][-1]})"
    else:
        field = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
    body = {
        "error": {"message": message, "type": "InvalidRequest", "code": "InvalidRequest", "param": field},
        "detail": details,
    }
    return SafeJSONResponse(body, status_code=422)


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, retry_after_seconds: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_seconds = retry_after_seconds


def _api_error(exc: EngineError, settings: ServerSettings) -> ApiError:
    status = _STATUS_OF_REASON.get(exc.reason, 400)
    retry = exc.retry_after_seconds
    if status in (429, 503) and retry is None:
        retry = settings.retry_after_seconds
    return ApiError(status, exc.reason, exc.message, retry)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


STOP_MAX_COUNT = 4
STOP_MAX_CHARS = 256
"""Limits on `stop` (OpenAI's count): each is matched against the text's tail at every token, so a long
one costs every sequence of the batch."""


class CompletionBody(_Body):
    model: str
    prompt: str | list[int] | list[str]
    max_tokens: int = Field(default=16, ge=1, le=1_048_576)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="Choices per request: only 1 is supported.")


class ContentPart(_Body):
    """One part of a message's content, as OpenAI's SDKs send it: text is all a text model takes."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    # `developer` is what newer OpenAI SDKs send for `system`.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The content as one string (parts joined; none, as an assistant's tool-call turn has, is empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def chat_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatBody(_Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="Choices per request: only 1 is supported.")


class LoadBody(_Body):
    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    path: str = Field(min_length=1, max_length=4096)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    resident_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    decode_mode: Literal["stream", "cpu", "auto"] = "auto"
    prefill_mode: Literal["stream", "cpu", "auto"] | None = None
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    max_sequence_length: int = Field(default=2048, ge=2, le=1_048_576)
    max_queue: int = Field(default=64, ge=1, le=100_000)
    min_decode_tokens_per_second: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="The decode SLO: the model is paced to it while a model beside it has requests waiting.",
    )


class ResidencyBody(_Body):
    resident_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    decode_mode: Literal["stream", "cpu"] | None = None
    prefill_mode: Literal["stream", "cpu"] | None = None


class BudgetBody(_Body):
    gpu_memory_bytes: int = Field(ge=1)


class ProfileBody(_Body):
    path: str = Field(min_length=1, max_length=4096)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    fractions: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default=[1.0, 0.9, 0.75, 0.5, 0.25, 0.0], min_length=1, max_length=32
    )
    # bounded: the profile builds each prompt as a Python list of this many token ids
    sequence_lengths: list[Annotated[int, Field(ge=1, le=1_048_576)]] = Field(
        default=[128, 512], min_length=1, max_length=8
    )
    decode_tokens: int = Field(default=16, ge=1, le=4096)
    trials: int = Field(default=3, ge=1, le=100)


def _check_token(request: Request, expected: str | None, *, required: bool) -> None:
    if expected is None:
        if required:
            raise ApiError(401, "Unauthorized", "the admin API is disabled: no admin token is configured")
        return
    if not bearer_matches(request.headers.get("authorization", ""), expected):
        raise ApiError(401, "Unauthorized", "a valid bearer token is required")


def _check_admin(request: Request, settings: ServerSettings) -> None:
    _check_token(request, settings.admin_token, required=True)


def _check_inference(request: Request, settings: ServerSettings) -> None:
    _check_token(request, settings.inference_token, required=False)


def _check_schema(request: Request, settings: ServerSettings) -> None:
    """The API's own description (it names every admin route): for a holder of either configured token."""
    tokens = [t for t in (settings.admin_token, settings.inference_token) if t is not None]
    if not tokens:
        raise ApiError(401, "Unauthorized", "the API schema is disabled: no token is configured")
    authorization = request.headers.get("authorization", "")
    if not any(bearer_matches(authorization, token) for token in tokens):
        raise ApiError(401, "Unauthorized", "a valid bearer token is required")


PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and the Prometheus scrape: kubelets and scrapers carry no token."""
SCHEMA_PATH = "/openapi.json"


def _route_path(scope: Scope) -> str:
    """The path the app routes on: without the root path a proxy mounted it under (as Starlette does)."""
    path = str(scope["path"])
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _guard_of(path: str) -> Callable[[Request, ServerSettings], None] | None:
    """The token check a request for `path` must pass before the app reads anything of it (None: open).

    Paths outside the admin API, the schema and the probes (the /v1 API, and any unknown path) take the
    inference token, so a new route is never open by omission."""
    if path in PUBLIC_PATHS:
        return None
    if path == "/admin" or path.startswith("/admin/"):
        return _check_admin
    if path == SCHEMA_PATH:
        return _check_schema
    return _check_inference


def _error_response(exc: ApiError) -> SafeJSONResponse:
    headers = {}
    if exc.retry_after_seconds is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_seconds)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = {"error": {"message": exc.message, "type": exc.code, "code": exc.code}}
    return SafeJSONResponse(body, status_code=exc.status, headers=headers)


class TokenGate:
    """ASGI middleware: a request proves its bearer token before the app reads its body, so a caller
    without one gets 401 whatever it sends (not a 422 describing what its body lacks), and FastAPI's
    request parsing never runs for it. The routes keep their own checks too (defence in depth)."""

    def __init__(self, app: AsgiApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = _guard_of(_route_path(scope))
        if guard is not None:
            try:
                guard(Request(scope), self.settings)
            except ApiError as exc:
                await _error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The worker's HTTP app around an already constructed engine."""
    settings = settings or ServerSettings()
    metrics = WorkerMetrics()
    engine.add_listener(metrics.on_engine_event)
    # no /docs nor /redoc: a browser's Swagger UI fetches /openapi.json without the token it needs
    app = FastAPI(
        title="residency worker",
        version="0.1.0",
        default_response_class=SafeJSONResponse,
        docs_url=None,
        redoc_url=None,
        openapi_url=SCHEMA_PATH,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # added last, so outermost: a caller without its token is refused before its body is even read
    app.add_middleware(TokenGate, settings=settings)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "NotFound" if exc.status_code == 404 else "InvalidRequest"
        body = {"error": {"message": str(exc.detail), "type": code, "code": code}}
        return SafeJSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def _on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return await _on_api_error(request, _api_error(exc, settings))

    def admin(request: Request) -> None:
        _check_admin(request, settings)

    def inference(request: Request) -> None:
        _check_inference(request, settings)

    async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    # -- health and metrics ---------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        # open, as /metrics is (kubelets and scrapers carry no token), and like it names the loaded models
        node = engine.node_report()
        return {"status": "ready", "node": node.node, "emulated": node.emulated, "models": engine.names()}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.refresh(engine)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI-compatible inference -----------------------------------------------------------------
    @app.get("/v1/models", dependencies=[Depends(inference)])
    async def list_models() -> dict[str, Any]:
        data = []
        for name in engine.names():
            try:
                status = engine.status(name)
            except EngineError:
                continue
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "residency",
                    "state": status.state,
                    "resident_fraction": status.residency.resident_fraction,
                }
            )
        return {"object": "list", "data": data}

    async def start(
        name: str, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[ModelRunner, EngineRequest, asyncio.Queue[RequestEvent]]:
        runner = engine.runner(name)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestEvent] = asyncio.Queue()

        def relay(event: RequestEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:  # queued first, so a full queue answers 429 at once, preempted or not
            request = engine.submit(name, prompt_ids, params, on_event=relay)
        except EngineError as exc:
            metrics.requests.labels(name, exc.reason).inc()
            raise
        # a preempted model: wait a while for a resume, then tell the client when to retry
        if runner.state == "preempted" and not await until_ready(runner):
            raise preempted_error(name, runner, request)
        return runner, request, events

    async def until_ready(runner: ModelRunner) -> bool:
        """Whether a preempted model resumed (or went away) within preempted_wait_seconds.

        Waits on the event loop, not in an executor thread: any number of waiting requests leaves the
        threads to tokenisation of other models and to the admin API that would resume this one.
        """
        deadline = time.monotonic() + settings.preempted_wait_seconds
        while runner.state == "preempted":
            remaining_seconds = deadline - time.monotonic()
            if remaining_seconds <= 0:
                return False
            await asyncio.sleep(min(PREEMPTED_POLL_SECONDS, remaining_seconds))
        return True

    def preempted_error(name: str, runner: ModelRunner, request: EngineRequest) -> ApiError:
        """Gives up on a request parked by a preemption: frees its slot, tells the client when to retry."""
        runner.cancel(request)
        metrics.requests.labels(name, "ModelPreempted").inc()
        return ApiError(
            503,
            "ModelPreempted",
            f"model {name} is preempted and did not resume within {settings.preempted_wait_seconds} s",
            settings.retry_after_seconds,
        )

    async def next_event(
        name: str, runner: ModelRunner, request: EngineRequest, events: asyncio.Queue[RequestEvent]
    ) -> RequestEvent:
        """The request's next event; raises 503 ModelPreempted (ApiError) once its model, preempted while
        the request was queued or running, has not resumed within preempted_wait_seconds."""
        while True:
            try:
                async with asyncio.timeout(PREEMPTED_POLL_SECONDS):
                    return await events.get()
            except TimeoutError:
                pass  # no event yet: a slow step, or a parked request
            if runner.state == "preempted" and not await until_ready(runner) and events.empty():
                raise preempted_error(name, runner, request)

    async def cancel_on_disconnect(client: Request, runner: ModelRunner, request: EngineRequest) -> None:
        """Cancels `request` once its client hangs up (the server then sends http.disconnect)."""
        while (await client.receive())["type"] != "http.disconnect":
            pass
        runner.cancel(request)

    def sampling(body: CompletionBody | ChatBody, max_tokens: int) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > STOP_MAX_COUNT:
            raise ApiError(400, "InvalidRequest", f"at most {STOP_MAX_COUNT} stop sequences")
        if any(len(text) > STOP_MAX_CHARS for text in stop):
            raise ApiError(400, "InvalidRequest", f"a stop sequence has at most {STOP_MAX_CHARS} characters")
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop
        )

    async def collect(
        client: Request,
        name: str,
        runner: ModelRunner,
        request: EngineRequest,
        events: asyncio.Queue[RequestEvent],
    ) -> RequestEvent:
        """The request's last event; a client that hangs up first cancels it, freeing its batch slot."""
        hang_up = asyncio.create_task(cancel_on_disconnect(client, runner, request))
        try:
            while True:
                event = await next_event(name, runner, request, events)
                if event.finish_reason is not None:
                    break
        finally:
            hang_up.cancel()
            runner.cancel(request)  # no-op when finished
        if event.error is not None:
            metrics.requests.labels(name, event.error.reason).inc()
            raise event.error
        if event.finish_reason == "cancelled":  # the client went away: nobody reads the answer
            metrics.requests.labels(name, "cancelled").inc()
            return event
        metrics.tokens.labels(name).inc(len(request.token_ids))
        metrics.requests.labels(name, "ok").inc()
        return event

    def usage(request: EngineRequest) -> dict[str, int]:
        prompt = len(request.prompt_ids)
        completion = len(request.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(
        name: str,
        runner: ModelRunner,
        request: EngineRequest,
        events: asyncio.Queue[RequestEvent],
        chunk: Callable[[RequestEvent], dict[str, Any]],
        first: dict[str, Any] | None,
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    try:
                        event = await next_event(name, runner, request, events)
                    except ApiError as exc:  # too late for a status: the SSE error event the router sends
                        gone = {
                            "error": {
                                "message": exc.message,
                                "type": exc.code,
                                "code": exc.status,
                                "retry_after": settings.retry_after_seconds,
                            }
                        }
                        yield f"data: {json.dumps(gone)}\n\n"
                        break
                    if event.error is not None:
                        metrics.requests.labels(name, event.error.reason).inc()
                        error = {
                            "error": {
                                "message": event.error.message,
                                "type": event.error.reason,
                                "code": event.error.reason,
                            }
                        }
                        yield f"data: {json.dumps(error)}\n\n"
                        break
                    if event.text or event.finish_reason is not None:
                        yield f"data: {json.dumps(chunk(event))}\n\n"
                    if event.finish_reason is not None:
                        metrics.tokens.labels(name).inc(len(request.token_ids))
                        metrics.requests.labels(name, "ok").inc()
                        break
                yield "data: [DONE]\n\n"
            finally:
                runner.cancel(request)  # no-op when finished; frees the slot if the client went away

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/completions", dependencies=[Depends(inference)])
    async def completions(body: CompletionBody, client: Request) -> Any:
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise ApiError(400, "InvalidRequest", "send one prompt per request")
            prompt: str | list[int] = str(body.prompt[0])
        else:
            prompt = body.prompt  # type: ignore[assignment]
        # tokenizing a long prompt takes a while: off the event loop
        prompt_ids = (
            await in_thread(engine.encode, body.model, prompt)
            if isinstance(prompt, str)
            else [int(t) for t in prompt]
        )
        runner, request, events = await start(body.model, prompt_ids, sampling(body, body.max_tokens))
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(event: RequestEvent) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}
                ],
            }

        if body.stream:
            return sse(body.model, runner, request, events, chunk, None)
        final = await collect(client, body.model, runner, request, events)
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [
                {"index": 0, "text": request.text, "logprobs": None, "finish_reason": final.finish_reason}
            ],
            "usage": usage(request),
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(inference)])
    async def chat_completions(body: ChatBody, client: Request) -> Any:
        messages = [{"role": m.chat_role(), "content": m.text()} for m in body.messages]
        prompt_ids = await in_thread(engine.chat_prompt, body.model, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        runner, request, events = await start(body.model, prompt_ids, sampling(body, max_tokens))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(event: RequestEvent) -> dict[str, Any]:
            delta = {"content": event.text} if event.text else {}
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": event.finish_reason}],
            }

        if body.stream:
            first = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
            return sse(body.model, runner, request, events, chunk, first)
        final = await collect(client, body.model, runner, request, events)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": request.text},
                    "finish_reason": final.finish_reason,
                }
            ],
            "usage": usage(request),
        }

    # -- admin ----------------------------------------------------------------------------------------
    async def engine_call(function: Callable[..., Any], *args: Any) -> Any:
        try:
            return await in_thread(function, *args)
        except EngineError as exc:
            raise _api_error(exc, settings) from exc

    @app.get("/admin/node", dependencies=[Depends(admin)])
    async def node() -> dict[str, Any]:
        return as_dict(engine.node_report())

    @app.put("/admin/node/budget", dependencies=[Depends(admin)])
    async def set_budget(body: BudgetBody) -> dict[str, Any]:
        return as_dict(await engine_call(engine.set_budget, body.gpu_memory_bytes))

    @app.post("/admin/models", dependencies=[Depends(admin)])
    async def load(body: LoadBody) -> dict[str, Any]:
        options = ModelOptions(
            dtype=body.dtype,
            resident_fraction=body.resident_fraction,
            decode_mode=body.decode_mode,
            prefill_mode=body.prefill_mode,
            max_batch_size=body.max_batch_size,
            max_sequence_length=body.max_sequence_length,
            max_queue=body.max_queue,
            min_decode_tokens_per_second=body.min_decode_tokens_per_second,
        )
        report = await engine_call(engine.load, body.name, body.path, options)
        return as_dict(report)

    @app.get("/admin/models/{name}", dependencies=[Depends(admin)])
    async def model_status(name: str) -> dict[str, Any]:
        return as_dict(engine.status(name))

    @app.delete("/admin/models/{name}", dependencies=[Depends(admin)])
    async def unload(name: str) -> dict[str, Any]:
        await engine_call(engine.unload, name)
        return {"unloaded": name}

    @app.post("/admin/models/{name}/residency", dependencies=[Depends(admin)])
    async def set_residency(name: str, body: ResidencyBody) -> dict[str, Any]:
        def change() -> Any:
            return engine.set_residency(
                name, body.resident_fraction, decode_mode=body.decode_mode, prefill_mode=body.prefill_mode
            )

        return as_dict(await engine_call(change))

    @app.post("/admin/models/{name}/preempt", dependencies=[Depends(admin)])
    async def preempt(name: str) -> dict[str, Any]:
        return as_dict(await engine_call(engine.preempt, name))

    @app.post("/admin/models/{name}/resume", dependencies=[Depends(admin)])
    async def resume(name: str) -> dict[str, Any]:
        return as_dict(await engine_call(engine.resume, name))

    @app.post("/admin/profile", dependencies=[Depends(admin)])
    async def profile(body: ProfileBody) -> dict[str, Any]:
        from residency_worker.engine.profile import ProfileSettings, profile_model

        def measure() -> Any:
            return profile_model(
                engine,
                body.path,
                ProfileSettings(
                    dtype=body.dtype,
                    fractions=tuple(body.fractions),
                    sequence_lengths=tuple(body.sequence_lengths),
                    decode_tokens=body.decode_tokens,
                    trials=body.trials,
                ),
            )

        result = await engine_call(measure)
        return dict(result.to_json())

    return app
