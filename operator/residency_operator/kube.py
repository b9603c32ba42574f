"""The one module of the operator that talks to the API server (kubernetes client, sync calls)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from residency.api import GROUP, VERSION
from residency.kubeapi import RETRIES_429, TimeoutApiClient
from residency_operator.recorder import EventRecorder
from residency_operator.wake import WAKE_CONFIGMAP, parse_wake_entries

log = logging.getLogger(__name__)
PAGE_SIZE = 500


class WriteLimiter:
    """A token bucket (client-go's QPS and burst) for the operator's writes: a wave of changes is written
    at ``qps`` after a burst, never as fast as one thread can send."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps, self.burst = qps, max(1, burst)
        self._tokens = float(self.burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()
        self.waited_seconds = 0.0

    def acquire(self) -> None:
        if self.qps <= 0:
            return  # unlimited
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            self.waited_seconds += wait
            time.sleep(wait)


def load_config() -> None:
    """In-cluster credentials when running in a pod, else $KUBECONFIG."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class Kube:
    """Thin wrappers over the calls the controller makes; every method is idempotent."""

    def __init__(self, write_qps: float = 0.0, write_burst: int = 1) -> None:
        api = TimeoutApiClient(retries_429=RETRIES_429)  # a refused write waits, not the whole round
        # the controller writes several at a time: a connection each, not a TLS handshake per write
        api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 16
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.limiter = WriteLimiter(write_qps, write_burst)
        self.events = EventRecorder(self.post_event_now)

    # --- reads -------------------------------------------------------------------------------
    def list_custom(self, plural: str) -> list[dict[str, Any]]:
        """Every object of a kind, in pages of :data:`PAGE_SIZE` (one huge answer would hold the API
        server's memory and this process's for as long as it takes to send)."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self.custom.list_cluster_custom_object(
                GROUP, VERSION, plural, limit=PAGE_SIZE, _continue=token
            )
            items += page.get("items", [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def list_nodes(self) -> list[dict[str, Any]]:
        items = self.core.list_node().items
        return [client.ApiClient().sanitize_for_serialization(n) for n in items]

    # --- placements -------------------------------------------------------------------------
    def create_placement(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created object (``None``: it existed already)."""
        self.limiter.acquire()
        try:
            created: dict[str, Any] = self.custom.create_cluster_custom_object(
                GROUP, VERSION, "modelplacements", body
            )
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise
            return None

    def patch_placement(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.limiter.acquire()
        patched: dict[str, Any] = self.custom.patch_cluster_custom_object(
            GROUP, VERSION, "modelplacements", name, body
        )
        return patched

    def delete_placement(self, name: str) -> None:
        self.limiter.acquire()
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, "modelplacements", name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def get_placement(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_cluster_custom_object(
                GROUP, VERSION, "modelplacements", name
            )
            return result
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def remove_placement_finalizers(self, name: str) -> None:
        self.limiter.acquire()
        try:
            self.custom.patch_cluster_custom_object(
                GROUP, VERSION, "modelplacements", name, {"metadata": {"finalizers": None}}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- models ------------------------------------------------------------------------------
    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """The patched model (``None``: it was deleted meanwhile)."""
        self.limiter.acquire()
        try:
            patched: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, "llmmodels", name, {"status": status}
            )
            return patched
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report to
                raise
            return None

    def post_event(
        self,
        body: dict[str, Any],
        event_type: str,
        reason: str,
        message: str,
        kind: str = "LLMModel",
        api_version: str = f"{GROUP}/{VERSION}",
    ) -> None:
        """An Event on an object (a namespaced LLMModel, or a cluster-scoped Node: its Event in default),
        posted in the background (:mod:`residency_operator.recorder`): a round never waits for it."""
        self.events.record(body, event_type, reason, message, kind, api_version)

    def post_event_now(
        self,
        body: dict[str, Any],
        event_type: str,
        reason: str,
        message: str,
        kind: str = "LLMModel",
        api_version: str = f"{GROUP}/{VERSION}",
    ) -> None:
        meta = body["metadata"]
        namespace = meta.get("namespace") or "default"
        now = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version=api_version,
                kind=kind,
                name=meta["name"],
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
            ),
            reason=reason[:128],
            message=message[:1024],
            type=event_type,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component="residency-operator"),
            reporting_component="residency.dev/operator",
            reporting_instance="residency-operator",
        )
        self.limiter.acquire()
        try:
            self.core.create_namespaced_event(namespace, event)
        except ApiException as exc:  # an Event is best effort; status already carries the truth
            log.warning("could not post event %s on %s/%s: %s", reason, namespace, meta["name"], exc.reason)

    # --- leader election ---------------------------------------------------------------------
    def try_acquire_lease(self, namespace: str, name: str, identity: str, duration_seconds: int) -> bool:
        """Acquire or renew a coordination.k8s.io Lease; True while this identity holds it."""
        now = datetime.now(UTC)
        try:
            lease = self.coordination.read_namespaced_lease(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=name, namespace=namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=identity,
                    lease_duration_seconds=duration_seconds,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self.coordination.create_namespaced_lease(namespace, body)
                return True
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
        spec = lease.spec
        if spec.holder_identity != identity and lease_held(spec, now):
            return False
        if spec.holder_identity != identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
        spec.holder_identity = identity
        spec.renew_time = now
        spec.lease_duration_seconds = duration_seconds
        try:
            self.coordination.replace_namespaced_lease(name, namespace, lease)  # resourceVersion guards races
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def release_lease(self, namespace: str, name: str, identity: str) -> None:
        """Hand a held Lease back (expired at once) so that another replica can take over."""
        try:
            lease = self.coordination.read_namespaced_lease(name, namespace)
            if lease.spec.holder_identity != identity:
                return
            lease.spec.holder_identity = None
            lease.spec.renew_time = None
            self.coordination.replace_namespaced_lease(name, namespace, lease)
        except ApiException as exc:
            log.warning("could not release the %s Lease: %s", name, exc.reason)

    # --- capacity requests --------------------------------------------------------------------
    def list_pods(self, label_selector: str) -> list[dict[str, Any]]:
        items = self.core.list_pod_for_all_namespaces(label_selector=label_selector).items
        return [client.ApiClient().sanitize_for_serialization(p) for p in items]

    def create_pod(self, body: dict[str, Any]) -> None:
        try:
            self.core.create_namespaced_pod(body["metadata"]["namespace"], body)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def ensure_priority_class(self, name: str, value: int, description: str) -> bool:
        """Create the low PriorityClass of capacity requests if missing; False when not allowed to."""
        body = client.V1PriorityClass(
            metadata=client.V1ObjectMeta(name=name),
            value=value,
            global_default=False,
            preemption_policy="Never",
            description=description,
        )
        try:
            client.SchedulingV1Api().create_priority_class(body)
        except ApiException as exc:
            if exc.status == 409:
                return True
            log.warning("cannot create PriorityClass %s (%s); install it with the chart", name, exc.reason)
            return False
        return True

    def wake_requests(self, namespace: str, name: str = WAKE_CONFIGMAP) -> dict[str, tuple[str, str]]:
        """The router's wake requests (its ConfigMap, see wake.py); none when absent or unreadable."""
        try:
            configmap = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status in (403, 404):
                return {}
            raise
        return parse_wake_entries(configmap.data)

    def watch_wake_requests(
        self, namespace: str, on_change: Callable[[], None], stop: threading.Event, name: str = WAKE_CONFIGMAP
    ) -> None:
        """Calls `on_change` at each change of the wake ConfigMap until `stop` (blocking; run in a thread)."""
        while not stop.is_set():
            try:
                for _event in watch.Watch().stream(
                    self.core.list_namespaced_config_map,
                    namespace,
                    field_selector=f"metadata.name={name}",
                    timeout_seconds=60,
                ):
                    on_change()
                    if stop.is_set():
                        return
            except Exception as exc:  # API server away or no right yet: the periodic round still reads it
                log.debug("wake watch: %s", exc.__class__.__name__)
                stop.wait(5.0)


def lease_held(spec: Any, now: datetime) -> bool:
    """Whether a V1LeaseSpec has a holder that renewed it within its duration."""
    renewed = spec.renew_time or spec.acquire_time
    if not spec.holder_identity or renewed is None:
        return False
    return bool(renewed + timedelta(seconds=spec.lease_duration_seconds or 0) >= now)
