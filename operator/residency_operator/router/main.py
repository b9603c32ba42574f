"""Runs the router: a model table refreshed from the API server and the FastAPI app under uvicorn."""

from __future__ import annotations

import logging
import threading
from typing import Any

import uvicorn

from residency_operator.kube import Kube, load_config
from residency_operator.router.app import ModelTable, create_app


def run_router(
    host: str, port: int, hold_seconds: float, token: str | None, worker_token: str | None
) -> None:
    """Blocks serving the router until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_config()
    kube = Kube()

    def list_models() -> list[dict[str, Any]]:
        return kube.list_custom("llmmodels")

    def wake(key: str, waiting: int) -> None:
        kube.wake_model(key, waiting)

    table = ModelTable(list_models, waker=wake)
    threading.Thread(target=table.run, name="model-table", daemon=True).start()
    app = create_app(table, hold_seconds=hold_seconds, token=token, worker_token=worker_token)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
