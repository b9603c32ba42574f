"""kopf handlers: thin. Deletion waits for the unload. (What the planning loop reads, and which changes
start a round, is the watch-fed ClusterCache's job: residency_operator.cache.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf

from residency.api import GROUP, VERSION
from residency.names import placement_name
from residency_operator.controller import Controller

LLMMODELS = (GROUP, VERSION, "llmmodels")


def _controller(memo: kopf.Memo) -> Controller:
    controller: Controller = memo["controller"]
    return controller


UNLOAD_WAIT_SECONDS = 60.0
"""How long one delete handler call waits for the unload before it hands back to kopf to retry. An unload
normally takes a second or two: waiting here, logged at info, keeps a normal delete out of the error log
(kopf logs every TemporaryError as an ERROR); only an unload slower than this is worth an error."""


@kopf.on.delete(*LLMMODELS)
async def on_model_delete(meta: kopf.Meta, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Unload first: the model's placement goes, its worker frees the memory, then the model goes."""
    controller = _controller(memo)
    name = placement_name(f"{meta['namespace']}/{meta['name']}")
    deadline = time.monotonic() + UNLOAD_WAIT_SECONDS
    announced = False
    while True:
        placement = await asyncio.to_thread(controller.kube.get_placement, name)
        if placement is None:
            return
        if not placement["metadata"].get("deletionTimestamp"):
            await asyncio.to_thread(controller.kube.delete_placement, name)
        controller.poke()
        node = placement["spec"]["nodeName"]
        if time.monotonic() > deadline:
            raise kopf.TemporaryError(
                f"the worker on {node} has not unloaded the model in {UNLOAD_WAIT_SECONDS:.0f} s; "
                "still waiting (is it running? `residency doctor`)",
                delay=5,
            )
        if not announced:
            logger.info("waiting for the worker on %s to unload", node)
            announced = True
        await asyncio.sleep(0.5)
