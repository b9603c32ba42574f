"""Runs the kopf operator with residency's handlers and settings."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from residency_operator.config import OperatorConfig
from residency_operator.handlers import llmmodel as _llmmodel_handlers

HANDLER_MODULES = (_llmmodel_handlers,)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Progress in annotations (the status schema is strict), Events only for what we post ourselves."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="residency.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="residency.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.batching.error_delays = (1, 2, 5, 10, 30)


def run_operator(config: OperatorConfig, liveness_endpoint: str | None = None) -> None:
    """Blocks running the operator until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    memo = kopf.Memo(config=config)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            memo=memo,
            liveness_endpoint=liveness_endpoint,
        )
    )
