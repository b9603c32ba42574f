"""kopf handlers: thin. Every watch event pokes the planning loop; deletion waits for the unload."""

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


@kopf.on.event(*LLMMODELS)
@kopf.on.event(GROUP, VERSION, "nodeprofiles")
@kopf.on.event(GROUP, VERSION, "modelplacements")
@kopf.on.event(GROUP, VERSION, "sensitivityprofiles")
@kopf.on.event("", "v1", "nodes")
def on_cluster_change(memo: kopf.Memo, **_: Any) -> None:
    """Any change a plan depends on: plan again (debounced)."""
    _controller(memo).poke()


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
