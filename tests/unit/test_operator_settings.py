"""kopf's settings as the operator starts: a bounded number of per-object workers, each let go soon."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kopf

from residency_operator.main import configure


class Kube:
    def __init__(self) -> None:
        self.watching = threading.Event()

    def watch_wake_requests(self, namespace: str, poke: Any, stop: threading.Event) -> None:
        self.watching.set()


class Controller:
    cache = None
    lease_namespace = "default"

    def __init__(self) -> None:
        self.kube = Kube()
        self.ran = False

    async def run(self) -> None:
        self.ran = True

    def poke(self) -> None:
        pass


def test_kopf_runs_a_bounded_number_of_object_workers_and_frees_them_soon() -> None:
    settings = kopf.OperatorSettings()
    assert settings.batching.worker_limit is None  # kopf's default: one worker (and connection) per object
    controller = Controller()
    memo = kopf.Memo(controller=controller)

    async def start() -> None:
        await configure(settings=settings, memo=memo)
        await memo["task"]
        memo["wake_watch_stop"].set()

    asyncio.run(start())
    # a burst of new models (a wave applied while the operator restarts) is taken 16 at a time, not all
    # at once with a connection each; an idle object's worker goes at once, not after five seconds
    assert settings.batching.worker_limit == 16
    assert settings.batching.idle_timeout + settings.batching.batch_window <= 0.2
    assert settings.persistence.diffbase_storage.fetch(body=kopf.Body({})) is None
    assert controller.ran and controller.kube.watching.wait(5)
