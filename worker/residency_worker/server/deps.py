"""FastAPI dependencies of the worker's routers: the engine, the request lifecycle, settings, token checks."""

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


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def inference_of(request: Request) -> Inference:
    inference: Inference = request.app.state.inference
    return inference


def settings_of(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


def metrics_of(request: Request) -> WorkerMetrics:
    metrics: WorkerMetrics = request.app.state.metrics
    return metrics


def load_times_of(request: Request) -> LoadTimes:
    times: LoadTimes = request.app.state.load_times
    return times


def require_admin(request: Request) -> None:
    check_admin(request, settings_of(request))


def require_inference(request: Request) -> None:
    check_inference(request, settings_of(request))
