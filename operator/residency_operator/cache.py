"""The operator's watch-fed view of the cluster: one informer per kind it plans from.

A planning round reads these in memory instead of listing five kinds from the API server; each informer
lists once (paginated) and then watches. Only an event that can change a plan or a status pokes the
planning loop (:mod:`residency_operator.changes`). The informers keep each object less what the operator
never reads (:func:`residency.informer.slim`: managedFields and kubectl's last-applied copy; a Node's
status but its conditions, :func:`slim_node`): at fleet size the cache is most of the operator's memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client

from residency.api import GROUP, VERSION
from residency.informer import Handler, Informer, slim, wait_synced
from residency.kubeapi import TimeoutApiClient
from residency_operator import changes
from residency_operator.state import NODE_LEASE_LABEL, ClusterState
from residency_operator.wake import WAKE_CONFIGMAP, parse_wake_entries

NODE_STATUS_KEPT = ("conditions",)
"""What the operator reads of a Node's status (Ready); the rest (images, addresses, capacity, nodeInfo,
volumes) is the bulk of a real Node's JSON."""


def slim_node(body: dict[str, Any]) -> dict[str, Any]:
    """A Node as the operator reads it (:func:`residency_operator.state.node_accepts`, drain Events): its
    metadata without managedFields or annotations, its spec (taints, unschedulable), its conditions."""
    node = slim(body)
    node["metadata"] = {k: v for k, v in node["metadata"].items() if k != "annotations"}
    status = body.get("status") or {}
    node["status"] = {k: status[k] for k in NODE_STATUS_KEPT if k in status}
    return node


class ChangeLog:
    """What changed, as the informers record it from their threads, until a round takes it at once
    (:class:`~residency_operator.changes.Changes`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spec_changes: set[str] = set()
        self.added: set[str] = set()
        self.reported: set[str] = set()
        self.ended: set[str] = set()
        self.other = False

    def take_changes(self) -> changes.Changes:
        """What changed since the last call."""
        with self._lock:
            taken = changes.Changes(
                frozenset(self.spec_changes),
                frozenset(self.added),
                frozenset(self.reported),
                frozenset(self.ended),
                self.other,
            )
            self.spec_changes, self.added, self.reported, self.ended = set(), set(), set(), set()
            self.other = False
        return taken


class ClusterCache(ChangeLog):
    """Informers for LLMModels, NodeProfiles, Nodes, ModelPlacements, SensitivityProfiles and the node
    Leases in ``lease_namespace``; ``on_change`` is called (on an informer thread) for a change that
    matters."""

    def __init__(self, on_change: Callable[[], None], lease_namespace: str, pool_size: int = 10) -> None:
        api = TimeoutApiClient()
        api.rest_client.pool_manager.connection_pool_kw["maxsize"] = pool_size
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        coordination = client.CoordinationV1Api(api)
        super().__init__()
        self._on_change = on_change
        self.models = Informer(
            "llmmodels",
            custom.list_cluster_custom_object,
            GROUP,
            VERSION,
            "llmmodels",
            handler=self._on_model,
        )
        self.node_profiles = self._custom(custom, "nodeprofiles", changes.profile_changed)
        self.placements = Informer(
            "modelplacements",
            custom.list_cluster_custom_object,
            GROUP,
            VERSION,
            "modelplacements",
            handler=self._on_placement,
        )
        self.sensitivity_profiles = self._custom(custom, "sensitivityprofiles", changes.spec_changed)
        self.nodes = Informer(
            "nodes", core.list_node, handler=self._poke_if(changes.node_changed), transform=slim_node
        )
        self.node_leases = Informer(
            "node-leases",
            coordination.list_namespaced_lease,
            lease_namespace,
            label_selector=NODE_LEASE_LABEL,
            handler=self._poke_if(changes.lease_holder_changed),
        )
        # the router's wake requests (wake.py): read from here each round, not from the API server
        self.wake = Informer(
            "wake-requests",
            core.list_namespaced_config_map,
            lease_namespace,
            field_selector=f"metadata.name={WAKE_CONFIGMAP}",
            handler=self._poke_if(lambda old, new: (old or {}).get("data") != (new or {}).get("data")),
        )
        self.informers = [
            self.models,
            self.node_profiles,
            self.placements,
            self.sensitivity_profiles,
            self.nodes,
            self.node_leases,
            self.wake,
        ]
        self._stop = threading.Event()

    def _custom(self, custom: client.CustomObjectsApi, plural: str, matters: Callable[..., bool]) -> Informer:
        return Informer(
            plural, custom.list_cluster_custom_object, GROUP, VERSION, plural, handler=self._poke_if(matters)
        )

    def _poke_if(self, matters: Callable[[Any, Any], bool]) -> Handler:
        def handle(kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
            if matters(old, new):
                with self._lock:
                    self.other = True
                self._on_change()

        return handle

    def _on_model(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if not changes.model_changed(old, new):
            return
        with self._lock:
            if new is not None and (
                changes.model_spec_changed(old, new) or changes.model_deletion_began(old, new)
            ):
                self.spec_changes.add(changes.model_key(new))
            elif old is None and new is not None:
                self.added.add(changes.model_key(new))
            elif new is None and old is not None:
                self.ended.add(changes.model_key(old))
            else:
                self.other = True
        self._on_change()

    def _on_placement(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if not changes.placement_changed(old, new):
            return
        key = changes.placement_model_key(new or old or {})
        with self._lock:
            # (a placement that came is checked against the plan like a report: the operator's own write)
            came = old is None and new is not None and not new["metadata"].get("deletionTimestamp")
            if key is not None and (came or changes.placement_report(old, new)):
                self.reported.add(key)
            elif key is not None and changes.placement_ending(old, new):
                self.ended.add(key)
            else:
                self.other = True
        self._on_change()

    def start(self) -> None:
        for informer in self.informers:
            informer.start(self._stop)

    def stop(self) -> None:
        self._stop.set()

    def synced(self, timeout_seconds: float = 0.0) -> bool:
        return wait_synced(self.informers, timeout_seconds)

    def state(self) -> ClusterState:
        """What the informers hold now (objects shared with the cache: read, never modify)."""
        return ClusterState(
            models=self.models.items(),
            node_profiles=self.node_profiles.items(),
            nodes=self.nodes.items(),
            placements=self.placements.items(),
            sensitivity_profiles=self.sensitivity_profiles.items(),
            node_leases=self.node_leases.items(),
        )

    def wake_requests(self) -> dict[str, tuple[str, str]]:
        """The router's wake requests as its ConfigMap says now (none while it has none)."""
        found = self.wake.items()
        return parse_wake_entries(found[0].get("data")) if found else {}

    def lists(self) -> int:
        """LIST calls so far, all informers (one each at start; more only after a watch expired)."""
        return sum(i.lists for i in self.informers)
