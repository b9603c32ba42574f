"""Probes and metrics of the router. Probes are open and name no model; /metrics names models, so it takes
a caller with the right to read it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from residency_operator.router.deps import RouterState, metrics_reader, router_state, state_of

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, object]:
    state = state_of(request)
    return {"status": "ready", "models": len(state.table.models)}


@router.get("/metrics", dependencies=[Depends(metrics_reader)])
async def metrics(state: Annotated[RouterState, Depends(router_state)]) -> Response:
    state.metrics.drain_gc_pauses()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
