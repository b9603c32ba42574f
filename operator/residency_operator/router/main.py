"""Runs the router: a model table refreshed from the API server and the FastAPI app under uvicorn."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

import uvicorn

from residency.heap import freeze_heap
from residency_operator.kube import load_config
from residency_operator.router.admission import DEFAULT_TTFT_TARGET_SECONDS, Admission
from residency_operator.router.app import create_app
from residency_operator.router.auth import (
    DEFAULT_VERB,
    Access,
    KubernetesAccess,
    OpenAccess,
    StaticTokenAccess,
)
from residency_operator.router.kubeapi import RouterKube
from residency_operator.router.models import ModelTable
from residency_operator.wake import WAKE_CONFIGMAP

AuthMode = Literal["kubernetes", "token", "none"]
KEEP_ALIVE_SECONDS = 75  # nginx's default; see run_router


@dataclass(frozen=True)
class RouterOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    hold_seconds: float = 60.0
    auth: AuthMode = "kubernetes"
    token: str | None = None  # auth "token": the one shared client token
    worker_token: str | None = None
    verb: str = DEFAULT_VERB
    auth_cache_seconds: float = 10.0
    default_namespace: str = "default"
    wake_namespace: str = "default"
    wake_configmap: str = WAKE_CONFIGMAP
    ttft_target_seconds: float = DEFAULT_TTFT_TARGET_SECONDS
    admission: bool = True


def run_router(options: RouterOptions) -> None:
    """Blocks serving the router until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_config()
    kube = RouterKube(options.wake_namespace, options.wake_configmap)
    access: Access
    if options.auth == "none":  # tests of other parts only; the chart's schema does not allow it
        logging.getLogger("residency.router").warning("--auth none: every caller may use every model")
        access = OpenAccess(options.default_namespace)
    elif options.auth == "token":
        if not options.token:
            raise SystemExit("--auth token needs --token-file")
        access = StaticTokenAccess(options.token, options.default_namespace)
    else:
        access = KubernetesAccess(kube, options.verb, options.auth_cache_seconds, options.default_namespace)
    table = ModelTable(kube.list_models, waker=kube.wake)
    threading.Thread(target=table.run, name="model-table", daemon=True).start()
    app = create_app(
        table,
        hold_seconds=options.hold_seconds,
        worker_token=options.worker_token,
        access=access,
        admission=Admission(ttft_target_seconds=options.ttft_target_seconds, enabled=options.admission),
    )
    app.state.router.metrics.gc.install()
    freeze_heap()  # see residency/heap.py: the imports and the app are never walked by a collection again
    # idle client connections are kept well past the 5 s keep-alive of httpx (and the openai client): a
    # client that waits out a 1-2 s Retry-After reuses its connection, instead of racing its close or
    # paying a new handshake on both sides for every retry
    uvicorn.run(
        app,
        host=options.host,
        port=options.port,
        log_level="info",
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
