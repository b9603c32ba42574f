"""Probes and metrics of the worker. Probes are open (kubelets carry no token) and name no model; /metrics
names models, so it is as private as inference (auth.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from residency_worker.engine import Engine
from residency_worker.server.deps import engine_of, metrics_of
from residency_worker.server.metrics import WorkerMetrics

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(engine: Annotated[Engine, Depends(engine_of)]) -> dict[str, Any]:
    node = engine.node_report()
    return {"status": "ready", "node": node.node, "emulated": node.emulated, "models": len(engine.names())}


@router.get("/metrics")
async def metrics(
    engine: Annotated[Engine, Depends(engine_of)],
    worker_metrics: Annotated[WorkerMetrics, Depends(metrics_of)],
) -> Response:
    worker_metrics.refresh(engine)
    return PlainTextResponse(generate_latest(worker_metrics.registry), media_type=CONTENT_TYPE_LATEST)
