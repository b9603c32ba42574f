"""FastAPI dependencies of the worker's routers: the engine, the request lifecycle, settings, token checks.

Each is a coroutine although none waits: FastAPI runs a plain function dependency in its thread pool, a
thread hop per dependency and request (and a wait for the pool's 40 threads) that a busy worker pays in
every request's time to first token."""

from __future__ import annotations

import threading
import time

from fastapi import Request

from residency_worker.engine import Engine
from residency_worker.server.auth import check_admin, check_inference
from residency_worker.server.errors import ServerSettings
from residency_worker.server.inference import Inference
from residency_worker.server.metrics import WorkerMetrics


class LoadTimes:
    """When each model was loaded on this worker (OpenAI's `created` of a model), from engine events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded_at: dict[str, int] = {}

    def on_engine_event(self, model: str, operation: str, report: object) -> None:
        if operation == "load":
            with self._lock:
                self._loaded_at[model] = int(time.time())

    def created(self, model: str) -> int:
        with self._lock:
            return self._loaded_at.setdefault(model, int(time.time()))


async def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def inference_of(request: Request) -> Inference:
    inference: Inference = request.app.state.inference
    return inference


async def settings_of(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


async def metrics_of(request: Request) -> WorkerMetrics:
    metrics: WorkerMetrics = request.app.state.metrics
    return metrics


async def load_times_of(request: Request) -> LoadTimes:
    times: LoadTimes = request.app.state.load_times
    return times


async def require_admin(request: Request) -> None:
    check_admin(request, request.app.state.settings)


async def require_inference(request: Request) -> None:
    check_inference(request, request.app.state.settings)
