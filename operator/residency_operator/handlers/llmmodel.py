"""kopf handlers: thin. Deletion waits for the unload. (What the planning loop reads, and which changes
start a round, is the watch-fed ClusterCache's job: residency_operator.cache.)"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from residency.api import GROUP, VERSION
from residency.names import placement_name
from residency_operator.controller import Controller

LLMMODELS = (GROUP, VERSION, "llmmodels")


def _controller(memo: kopf.Memo) -> Controller:
    controller: Controller = memo["controller"]
    return controller


@kopf.on.delete(*LLMMODELS)
async def on_model_delete(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Unload first: the model's placement goes, its worker frees the memory, then the model goes."""
    controller = _controller(memo)
    name = placement_name(f"{meta['namespace']}/{meta['name']}")
    placement = await asyncio.to_thread(controller.kube.get_placement, name)
    if placement is None:
        return
    if not placement["metadata"].get("deletionTimestamp"):
        await asyncio.to_thread(controller.kube.delete_placement, name)
    controller.poke()
    raise kopf.TemporaryError(f"waiting for the worker on {placement['spec']['nodeName']} to unload", delay=1)
