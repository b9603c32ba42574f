"""Runs the kopf operator with residency's handlers, settings and planning loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import kopf
from prometheus_client import start_http_server

from residency_operator.cache import ClusterCache
from residency_operator.config import OperatorConfig
from residency_operator.controller import Controller
from residency_operator.handlers import llmmodel as _llmmodel_handlers
from residency_operator.handlers import sensitivity as _sensitivity_handlers
from residency_operator.kube import Kube, load_config
from residency_operator.metrics import OperatorMetrics
from residency_operator.state import OperatorKnobs

HANDLER_MODULES = (_llmmodel_handlers, _sensitivity_handlers)

KOPF_WORKER_LIMIT = 16
"""kopf's per-object workers at once (kopf: unlimited). kopf here adds the unload finalizer to a new model
and runs the delete handler; each worker that writes holds a connection of its own, and its requests share
the operator's queues in the API server's Priority and Fairness with the planning loop's 8 writers. After
a restart in the middle of a wave of 1000 models, unlimited, it patched 1000 finalizers at once over 1000
TLS connections (~250 MiB of buffers, kept as the process's peak memory) and filled those queues, which
then refused the planning round's own writes (429). At 16, kopf's writes take at most two thirds of the
operator's share while a burst lasts; placements never wait for a finalizer."""
KOPF_IDLE_SECONDS = 0.1
KOPF_BATCH_SECONDS = 0.05
"""How long kopf keeps an object's worker (and its slot, and the last event's body) for a next event
(kopf: 5 s), and gathers an object's events into one (kopf: 0.1 s). No kopf handler here reacts to an
update: an event is handled at once and the slot freed for the next object (the watch-fed planning loop
does the work), so that the 16 slots go through a restart's listing of every model in seconds."""


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps no last-handled configuration on LLMModels: no kopf handler here reacts to a field
    change (the planning loop reads watch-fed informers; kopf runs the delete handler and timers only),
    and storing one cost every model an extra write (an annotation patch on create and on each change)."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Progress in annotations (the status schema is strict), no diff base; start the planning loop."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="residency.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.batching.error_delays = (1, 2, 5, 10, 30)
    settings.batching.worker_limit = KOPF_WORKER_LIMIT
    settings.batching.idle_timeout = KOPF_IDLE_SECONDS
    settings.batching.batch_window = KOPF_BATCH_SECONDS
    controller: Controller = memo["controller"]
    if controller.cache is not None:
        controller.cache.start()  # the planning loop plans once every informer has listed
    memo["task"] = asyncio.create_task(controller.run())
    if controller.cache is None:
        # the router's wake requests live in a ConfigMap kopf does not watch (see wake.py): poke on each
        # change (with a cache, its informer watches it)
        loop = asyncio.get_running_loop()
        stop = memo["wake_watch_stop"] = threading.Event()
        threading.Thread(
            target=controller.kube.watch_wake_requests,
            args=(controller.lease_namespace, lambda: loop.call_soon_threadsafe(controller.poke), stop),
            name="wake-watch",
            daemon=True,
        ).start()


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    stop_watch: threading.Event | None = memo.get("wake_watch_stop")
    if stop_watch is not None:
        stop_watch.set()
    task: asyncio.Task[None] | None = memo.get("task")
    if task is not None:
        task.cancel()
    await asyncio.to_thread(memo["controller"].release)
    await asyncio.to_thread(memo["controller"].kube.events.flush)  # the last round's Events
    if memo["controller"].cache is not None:
        memo["controller"].cache.stop()


def run_operator(config: OperatorConfig, liveness_endpoint: str | None = None) -> None:
    """Blocks running the operator until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_config()
    knobs = OperatorKnobs(
        allowed_model_roots=config.allowed_model_roots,
        remote_code_roots=config.remote_code_roots,
        workspace_bytes=config.workspace_bytes,
        heartbeat_grace_seconds=config.heartbeat_grace_seconds,
    )
    metrics = OperatorMetrics()
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=metrics.registry)
    kube = Kube(write_qps=config.write_qps, write_burst=config.write_burst)
    metrics.events_dropped.set_function(lambda: kube.events.dropped)
    controller = Controller(
        kube,
        knobs,
        lease_namespace=config.lease_namespace,
        resync_seconds=config.resync_seconds,
        capacity=config.capacity,
        metrics=metrics,
        namespaces=config.namespaces or (),
        incremental_min_models=config.incremental_min_models,
    )
    # every read a round makes comes from watch-fed informers (one LIST each, then WATCH)
    controller.cache = ClusterCache(controller.poke, config.lease_namespace)
    memo = kopf.Memo(config=config, controller=controller)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            memo=memo,
            liveness_endpoint=liveness_endpoint,
        )
    )
