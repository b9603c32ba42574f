"""FastAPI app of the worker: routers by concern (openai_api.py, admin.py, health.py), dependencies for the
engine and tokens (deps.py), one error shape (errors.py). Tokens are checked before a body is read (auth.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from residency.httpguard import BodyLimit
from residency_worker.engine import Engine, EngineError
from residency_worker.server import admin, health, openai_api
from residency_worker.server.auth import SCHEMA_PATH, TokenGate
from residency_worker.server.deps import LoadTimes
from residency_worker.server.errors import (
    ApiError,
    SafeJSONResponse,
    ServerSettings,
    api_error,
    error_response,
    validation_error,
)
from residency_worker.server.inference import Inference
from residency_worker.server.metrics import WorkerMetrics

__all__ = ["ServerSettings", "create_app"]


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The worker's HTTP app around an already constructed engine."""
    settings = settings or ServerSettings()
    metrics = WorkerMetrics()
    load_times = LoadTimes()
    engine.add_listener(metrics.on_engine_event)
    engine.add_listener(load_times.on_engine_event)
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
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.load_times = load_times
    app.state.inference = Inference(engine, settings, metrics)
    app.include_router(health.router)
    app.include_router(openai_api.router)
    app.include_router(admin.router)

    @app.exception_handler(ApiError)
    async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "NotFound" if exc.status_code == 404 else "InvalidRequest"
        response = error_response(ApiError(exc.status_code, code, str(exc.detail)))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(EngineError)
    async def _on_engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(api_error(exc, settings))

    return app
