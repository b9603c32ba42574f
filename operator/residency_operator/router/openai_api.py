"""The OpenAI API of the router: completions and chat (forwarded), the model list and one model.

A model is `namespace/name`, or a bare `name` in the caller's own namespace (a ServiceAccount's; other
callers use the router's default namespace). Every route needs an authenticated caller and, per model,
its right (see auth.py); a model the caller may not use is refused with 403 whether it exists or not.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from residency.httpguard import loads_strict
from residency_operator.router.auth import Caller
from residency_operator.router.deps import ARRIVED_AT, RouterState, caller, error, router_state
from residency_operator.router.forward import forward
from residency_operator.router.table import qualify

router = APIRouter(prefix="/v1")

# What the router reads of a request; everything else goes to the worker, which validates it in full.
_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "description": "namespace/name, or a name in the caller's namespace"},
        "stream": {"type": "boolean"},
    },
    "additionalProperties": True,
}
_OPENAPI_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}
}
FORBIDDEN = "forbidden"
"""The whole message of a 403: nothing about whether the model exists or who may use it."""

CallerDep = Annotated[Caller, Depends(caller)]
StateDep = Annotated[RouterState, Depends(router_state)]


def _key(state: RouterState, who: Caller, requested: str) -> str | None:
    return qualify(requested, who.namespace or state.access.default_namespace)


async def _proxy(request: Request, state: RouterState, who: Caller, path: str) -> Response:
    try:
        body = loads_strict(await request.body())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return error(400, f"request body must be JSON: {exc}"[:500])
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return error(400, "request body must be a JSON object with a string `model`", param="model")
    key = _key(state, who, body["model"])
    if key is None:
        return error(400, "`model` is `namespace/name` or `name`", param="model")
    namespace, name = key.split("/", 1)
    if not await state.access.allowed(who, namespace, name):
        state.metrics.requests.labels("forbidden").inc()
        return error(403, FORBIDDEN)
    return await forward(state, body, key, path, getattr(request.state, ARRIVED_AT, None))


@router.post("/completions", openapi_extra=_OPENAPI_BODY)
async def completions(request: Request, state: StateDep, who: CallerDep) -> Response:
    return await _proxy(request, state, who, "completions")


@router.post("/chat/completions", openapi_extra=_OPENAPI_BODY)
async def chat_completions(request: Request, state: StateDep, who: CallerDep) -> Response:
    return await _proxy(request, state, who, "chat/completions")


def model_item(key: str, model: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI model object (id, object, created, owned_by) with the model's phase."""
    created = model["metadata"].get("creationTimestamp")
    try:
        created_seconds = int(datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp())
    except ValueError:
        created_seconds = 0
    return {
        "id": key,
        "object": "model",
        "created": created_seconds,
        "owned_by": key.split("/", 1)[0],
        "phase": (model.get("status") or {}).get("phase", "Pending"),
    }


@router.get("/models")
async def list_models(state: StateDep, who: CallerDep) -> Any:
    """The models the caller may use (each checked; answers cached), by `namespace/name`."""
    models = sorted(state.table.models.items())
    allowed = await asyncio.gather(*(state.access.allowed(who, *key.split("/", 1)) for key, _ in models))
    data = [model_item(key, model) for (key, model), ok in zip(models, allowed, strict=True) if ok]
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, state: StateDep, who: CallerDep) -> Any:
    key = _key(state, who, model_id)
    if key is None:
        return error(400, "a model id is `namespace/name` or `name`", param="model")
    namespace, name = key.split("/", 1)
    if not await state.access.allowed(who, namespace, name):
        return error(403, FORBIDDEN)
    model = state.table.models.get(key)
    if model is None:
        return error(404, f"model {key!r} does not exist", code="model_not_found", param="model")
    return model_item(key, model)
