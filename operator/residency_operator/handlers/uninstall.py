"""What `helm uninstall` runs first when the chart deletes the CRDs (crds.keep=false): its pre-delete hook.

Deleting a CRD deletes its objects, but an object goes only once its finalizers are gone: an LLMModel's
(kopf's, which the operator removes once the model's placement is unloaded) and a ModelPlacement's
(residency.dev/unload, which the worker removes once it has freed the memory). helm deletes the
operator, the workers, their RBAC and the CRDs in one go, so nobody would remove those finalizers: the
CRDs would hang in Terminating, and the models with them.

The hook runs before helm deletes anything, while the operator and the workers still run:

1. it deletes every LLMModel (the CRDs are going: every model would go with them anyway);
2. while an operator holds its Lease, it waits (bounded) for the operator to unload and finalize them,
   as it does for any deleted model;
3. it deletes what is left (no operator, a worker gone, the time is up) and removes residency's own
   finalizers from it, then waits for those objects to go. Another controller's finalizer it leaves, and
   fails naming it: helm then stops before deleting the CRDs, rather than leave them Terminating.

Run as `python -m residency_operator.handlers.uninstall --lease-namespace NS --timeout SECONDS`
(the chart's hook Job), with a ServiceAccount that may list, delete and patch LLMModels and
ModelPlacements and get the operator's Lease.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from residency.api import GROUP, VERSION
from residency.kubeapi import TimeoutApiClient
from residency_operator.controller import LEASE_NAME
from residency_operator.kube import lease_held, load_config
from residency_operator.state import UNLOAD_FINALIZER

log = logging.getLogger("residency.uninstall")

KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"  # kopf's default, which the operator keeps
OWN_FINALIZERS = frozenset({KOPF_FINALIZER, UNLOAD_FINALIZER})
MODELS, PLACEMENTS = "llmmodels", "modelplacements"
SETTLE_SECONDS = 30.0
"""After removing the finalizers: how long objects may take to go (the API server deletes them at once)."""


class Cluster(Protocol):
    """The few API calls the hook makes (the real one below; tests pass a fake)."""

    def items(self, plural: str) -> list[dict[str, Any]]: ...

    def delete(self, plural: str, meta: dict[str, Any]) -> None: ...

    def set_finalizers(self, plural: str, meta: dict[str, Any], finalizers: list[str]) -> None: ...

    def operator_alive(self) -> bool: ...


def _key(plural: str, meta: dict[str, Any]) -> str:
    kind = "llmmodel" if plural == MODELS else "modelplacement"
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{kind}/{where}{meta['name']}"


@dataclass
class Outcome:
    """What the hook did; `ok` when no LLMModel or ModelPlacement is left."""

    deleted: list[str] = field(default_factory=list)
    """Objects whose deletion the hook asked for."""
    forced: list[str] = field(default_factory=list)
    """Objects whose residency finalizers the hook removed itself (the operator did not finalize them)."""
    left: list[str] = field(default_factory=list)
    """Objects still there at the end, each with its finalizers."""
    waited_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.left


def _remaining(cluster: Cluster) -> list[tuple[str, dict[str, Any]]]:
    return [(plural, obj["metadata"]) for plural in (MODELS, PLACEMENTS) for obj in cluster.items(plural)]


def _delete(cluster: Cluster, plural: str, meta: dict[str, Any], outcome: Outcome) -> None:
    if meta.get("deletionTimestamp"):
        return
    cluster.delete(plural, meta)
    key = _key(plural, meta)
    if key not in outcome.deleted:
        outcome.deleted.append(key)


def finalize_all(
    cluster: Cluster,
    timeout: float,
    poll: float = 1.0,
    settle: float = SETTLE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Deletes every LLMModel, lets a running operator finalize them (at most `timeout` seconds), then
    deletes and unfinalizes what is left; returns what it did and what is still there."""
    outcome = Outcome()
    started = clock()
    deadline = started + timeout
    # 1-2. the orderly way: the operator unloads each model as it does for any deletion
    while True:
        remaining = _remaining(cluster)
        if not remaining:
            outcome.waited_seconds = clock() - started
            log.info("the operator finalized every model in %.1f s", outcome.waited_seconds)
            return outcome
        for plural, meta in remaining:
            if plural == MODELS:  # a model applied meanwhile too; placements are the operator's to delete
                _delete(cluster, plural, meta, outcome)
        if clock() >= deadline:
            log.warning(
                "%d objects are still there after %.0f s: removing their finalizers", len(remaining), timeout
            )
            break
        if not cluster.operator_alive():
            log.warning("no operator holds the %s Lease: removing the finalizers itself", LEASE_NAME)
            break
        log.info("waiting for the operator to finalize %d objects", len(remaining))
        sleep(poll)
    # 3. nobody else will: delete what is left and drop residency's own finalizers from it
    outcome.waited_seconds = clock() - started
    settle_deadline = clock() + settle
    while True:
        for plural, meta in remaining:
            _force(cluster, plural, meta, outcome)
        remaining = _remaining(cluster)
        if not remaining:
            return outcome
        if clock() >= settle_deadline:
            outcome.left = [
                f"{_key(plural, meta)} (finalizers: {', '.join(meta.get('finalizers') or []) or 'none'})"
                for plural, meta in remaining
            ]
            return outcome
        sleep(poll)


def _force(cluster: Cluster, plural: str, meta: dict[str, Any], outcome: Outcome) -> None:
    """Deletes the object and removes residency's finalizers from it (another controller's stay)."""
    _delete(cluster, plural, meta, outcome)
    finalizers = list(meta.get("finalizers") or [])
    kept = [f for f in finalizers if f not in OWN_FINALIZERS]
    if kept == finalizers:
        return
    try:
        cluster.set_finalizers(plural, meta, kept)
    except ApiException as exc:
        if exc.status not in (404, 409):  # gone, or changed meanwhile: the next pass reads it again
            raise
    if _key(plural, meta) not in outcome.forced:
        outcome.forced.append(_key(plural, meta))


class ApiCluster:
    """`Cluster` over the Kubernetes API (in-cluster credentials, else $KUBECONFIG)."""

    def __init__(self, lease_namespace: str) -> None:
        api = TimeoutApiClient()
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self.lease_namespace = lease_namespace

    def items(self, plural: str) -> list[dict[str, Any]]:
        try:
            result = self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
        except ApiException as exc:
            if exc.status == 404:  # no such CRD (any more): nothing to finalize
                return []
            raise
        return list(result.get("items", []))

    def delete(self, plural: str, meta: dict[str, Any]) -> None:
        try:
            if meta.get("namespace"):
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], plural, meta["name"]
                )
            else:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, meta["name"])
        except ApiException as exc:
            if exc.status != 404:
                raise

    def set_finalizers(self, plural: str, meta: dict[str, Any], finalizers: list[str]) -> None:
        # resourceVersion: a finalizer added meanwhile makes this a 409, not a lost update
        body = {"metadata": {"finalizers": finalizers or None, "resourceVersion": meta["resourceVersion"]}}
        if meta.get("namespace"):
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], plural, meta["name"], body
            )
        else:
            self.custom.patch_cluster_custom_object(GROUP, VERSION, plural, meta["name"], body)

    def operator_alive(self) -> bool:
        """Whether an operator renewed its Lease within the Lease's duration (as the operator decides)."""
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.lease_namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            if exc.status == 403:  # cannot tell: wait for the timeout
                return True
            raise
        return lease_held(lease.spec, datetime.now(UTC))


def run(cluster: Cluster, timeout: float, poll: float = 1.0, settle: float = SETTLE_SECONDS) -> int:
    """The hook: 0 when no LLMModel or ModelPlacement is left, else 1 (naming what is)."""
    outcome = finalize_all(cluster, timeout, poll, settle)
    log.info("deleted %d objects: %s", len(outcome.deleted), ", ".join(outcome.deleted) or "none")
    if outcome.forced:
        log.warning(
            "the operator did not finalize these within %.1f s; their residency finalizers were removed: %s",
            outcome.waited_seconds,
            ", ".join(outcome.forced),
        )
    if not outcome.ok:
        log.error(
            "these objects are still there, held by other finalizers: %s. Deleting the CRDs now would "
            "leave them Terminating, so the uninstall stops here. Remove those finalizers and uninstall "
            "again (or `helm uninstall --no-hooks` to skip this check).",
            "; ".join(outcome.left),
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m residency_operator.handlers.uninstall",
        description="Before the CRDs are deleted: delete every LLMModel, let the operator finalize them, "
        "remove residency's finalizers from what is left.",
    )
    parser.add_argument("--lease-namespace", required=True, help="Namespace of the operator's Lease.")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="Most seconds to wait for the operator (default 120)."
    )
    parser.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=SETTLE_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_config()
    return run(ApiCluster(args.lease_namespace), args.timeout, args.poll, args.settle)


if __name__ == "__main__":
    sys.exit(main())
