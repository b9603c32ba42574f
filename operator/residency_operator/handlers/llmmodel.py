"""kopf handlers for LLMModel: read the event, call the pure validation, write status and Events."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from residency.api import GROUP, VERSION
from residency_operator.conditions import Verdict, desired_status, now_rfc3339, status_patch
from residency_operator.config import OperatorConfig
from residency_operator.validation import pending_verdict, validate_model

LLMMODELS = (GROUP, VERSION, "llmmodels")
NODEPROFILES = (GROUP, VERSION, "nodeprofiles")
RESYNC_SECONDS = 20.0


@kopf.index(*NODEPROFILES)
def node_profiles(**kwargs: Any) -> dict[str, dict[str, Any]]:
    """In-memory index of registered GPU nodes, kept current by kopf's watch."""
    return {str(kwargs["name"]): dict(kwargs["spec"])}


def reconcile_model(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    node_profiles: kopf.Index[str, dict[str, Any]],
    logger: logging.Logger | kopf.ObjectLogger,
) -> None:
    """Level-triggered: recompute the model's verdict from spec and cluster state; patch only differences."""
    config: OperatorConfig = memo["config"]
    checked = validate_model(dict(spec), config.allowed_model_roots)
    verdict = checked if isinstance(checked, Verdict) else pending_verdict(checked, len(node_profiles))
    current = dict(status)
    desired = desired_status(current, verdict, meta.get("generation"), now_rfc3339())
    changes = status_patch(current, desired)
    if not changes:
        return
    patch.status.update(changes)
    if current.get("phase") != desired["phase"] or current.get("reason") != desired["reason"]:
        event_type = "Warning" if desired["phase"] == "Failed" else "Normal"
        kopf.event(body, type=event_type, reason=desired["reason"], message=desired["message"])
        logger.info("phase %s (%s): %s", desired["phase"], desired["reason"], desired["message"])


@kopf.on.resume(*LLMMODELS)
@kopf.on.create(*LLMMODELS)
@kopf.on.update(*LLMMODELS, field="spec")
def on_model_change(**kwargs: Any) -> None:
    """Spec created, changed, or seen again after an operator restart."""
    reconcile_model(**_handler_args(kwargs))


@kopf.timer(*LLMMODELS, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS, idle=None)
def resync_model(**kwargs: Any) -> None:
    """Periodic re-check: nodes come and go, model directories appear or vanish."""
    reconcile_model(**_handler_args(kwargs))


def _handler_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("body", "spec", "status", "meta", "patch", "memo", "node_profiles", "logger")
    return {name: kwargs[name] for name in names}
