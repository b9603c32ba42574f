"""The node's presence in the cluster: its measured NodeProfile, its liveness (a coordination.k8s.io Lease
renewed as a kubelet renews its own; the profile's status written only when a measured value changes) and
the autoscaler protection of its Pod while it serves. A part of the node agent (agent.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from residency.api import GROUP, VERSION
from residency.names import label_value
from residency_worker.engine import Engine
from residency_worker.gpus import gpu_profile_fields, measure_copy_gbps, refresh_gpu_fields
from residency_worker.status_wire import now_rfc3339

log = logging.getLogger("residency.agent")

NODE_LABEL = "residency.dev/node"
NODE_LEASE_LABEL = "residency.dev/node-lease"
LEASE_DURATION_FACTOR = 4  # a node Lease lasts this many renewal periods (the kubelet's 40 s for 10 s)
# cluster-autoscaler and Karpenter leave a node alone while its pods carry these
PROTECT_ANNOTATIONS = {
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
    "karpenter.sh/do-not-disrupt": "true",
}


@dataclass
class AgentConfig:
    node: str
    endpoint: str
    host_memory_bytes: int
    poll_seconds: float = 1.0  # between syncs without a placement change (the engine's own news)
    heartbeat_seconds: float = 10.0  # between renewals of the node Lease (the kubelet's 10 s)
    lease_thread: bool = True
    """Renew the Lease on a thread of its own (renew_leases); False: between sync passes (the scale
    harness's hollow agents, see hollow.py)."""
    grow_seconds: float = 2.0  # loads one sync starts before it lists placements again (moves, deletions)
    node_heartbeat: bool = False  # also keep the Node Ready (local clusters have no kubelet)
    pod_name: str | None = None  # this worker's own Pod (downward API), annotated while it serves
    pod_namespace: str | None = None
    protect_annotations: dict[str, str] = field(default_factory=lambda: dict(PROTECT_ANNOTATIONS))
    lease_namespace: str = "default"  # where the node Lease lives (the operator's namespace)
    # a load or resume is reported as Loading only once it has taken this long: a quick one is one write
    loading_report_seconds: float = 1.0
    background_profile: bool = False  # measure and publish curves of models without one (profiler.py)


class NodePresence:
    """Registration, heartbeat, Lease and Pod protection of one node (the base of NodeAgent, which holds
    the state declared here)."""

    engine: Engine
    config: AgentConfig
    custom: client.CustomObjectsApi
    core: client.CoreV1Api
    coordination: client.CoordinationV1Api
    _protected: bool | None
    _last_heartbeat: float
    _profile_spec: dict[str, Any] | None
    _lease: dict[str, Any] | None  # the node Lease as last written (its JSON)
    _lease_refused: bool  # no RBAC for Leases (an older chart): heartbeat in the NodeProfile
    _lease_lock: threading.Lock  # renew_lease from the sync loop (at registration) and the renewer
    _lease_renewer: bool  # a thread of its own renews the Lease (renew_leases runs)
    _reported_resident_bytes: int | None

    def profile_spec(self) -> dict[str, Any]:
        """The node's measured profile (measured once)."""
        if self._profile_spec is None:
            report = self.engine.node_report()
            peak = report.host_to_device_peak
            tier = self.engine.tier
            host_gbps = measure_copy_gbps(torch.device("cpu"))
            # an emulated tier's "GPU memory" is the same DRAM: one measurement, not two noisy ones
            hbm_gbps = host_gbps if report.emulated else measure_copy_gbps(tier.device)
            self._profile_spec = {
                "nodeName": self.config.node,
                "gpuType": report.gpu_name,
                "gpuCount": 1,
                "gpuMemoryBytes": report.budget_bytes,
                **gpu_profile_fields(self.engine.tiers, report, host_gbps),
                "hostMemoryBytes": self.config.host_memory_bytes,
                "hostToDeviceGbps": round(peak.gbps if peak else 1.0, 4),
                "hbmGbps": round(hbm_gbps, 4),
                "hostMemoryGbps": round(host_gbps, 4),
                "emulated": report.emulated,
                "workerEndpoint": self.config.endpoint,
            }
        return self._profile_spec

    def register(self) -> None:
        """Create or update this node's NodeProfile, owned by the Node so it goes when the Node goes."""
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NodeProfile",
            "metadata": {"name": self.config.node},
            "spec": self.profile_spec(),
        }
        try:
            node = self.core.read_node(self.config.node)
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": node.metadata.name, "uid": node.metadata.uid}
            ]
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, "nodeprofiles", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.custom.patch_cluster_custom_object(
                GROUP,
                VERSION,
                "nodeprofiles",
                self.config.node,
                {"metadata": body["metadata"], "spec": body["spec"]},
            )
        self.heartbeat(force=True)

    def heartbeat(self, force: bool = False) -> None:
        """NodeProfile status: alive, and the bytes this node holds now."""
        if self._profile_spec is not None and refresh_gpu_fields(self._profile_spec, self.engine):
            # a budget changed at runtime, or a GPU was lost: the planner must plan with what the engine has
            self.register()
            return
        if not force and time.monotonic() - self._last_heartbeat < self.config.heartbeat_seconds:
            return
        if not self._lease_refused and (force or not self._lease_renewer):
            with self._lease_lock:
                self.renew_lease()
        resident_bytes = self.engine.node_report().allocated_bytes
        # the profile's status is measured values: written when they change (liveness is the Lease)
        if force or self._lease_refused or resident_bytes != self._reported_resident_bytes:
            status = {"heartbeatTime": now_rfc3339(), "residentBytes": resident_bytes}
            try:
                self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, "nodeprofiles", self.config.node, {"status": status}
                )
                self._reported_resident_bytes = resident_bytes
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.register()
        if self.config.node_heartbeat:
            self._node_ready()
        self._last_heartbeat = time.monotonic()

    def renew_leases(self, stop: threading.Event) -> None:
        """Renew the node Lease every period on a thread of its own until ``stop``, as a kubelet's lease
        controller does. The sync loop may spend minutes in one load, or wait on an API server that is
        slow to take its status writes; a Lease renewed only between its passes would then lapse, and the
        operator would judge a working node dead and move its models. A refused renewal is logged and
        tried again at the next period; without the right to write Leases the NodeProfile heartbeats, in
        the sync loop, as before. It runs from the agent's start, before the node registers: a registration
        that the API server refuses for a while (a thousand nodes starting at once) must not let the Lease
        it created lapse."""
        self._lease_renewer = True
        jitter = random.Random()
        try:
            # a little sooner than the period, at random: a fleet of nodes started together does not renew
            # in one burst every period
            while not stop.wait(self.config.heartbeat_seconds * jitter.uniform(0.8, 1.0)):
                if self._lease_refused:
                    return
                try:
                    with self._lease_lock:
                        self.renew_lease()
                except Exception as exc:  # the API server away or refusing: the next period tries again
                    log.warning(
                        "could not renew the node Lease (%s); again in %.0f s",
                        exc.__class__.__name__,
                        self.config.heartbeat_seconds,
                    )
        finally:
            self._lease_renewer = False

    def renew_lease(self) -> None:
        """Renew this node's Lease (create it the first time; read it again after a conflict). An update
        with the version last read, as a kubelet renews its own, sent and read back as plain JSON: the
        client's typed objects cost more than the request itself (a thousand hollow nodes renew in one
        process)."""
        name, namespace = node_lease_name(self.config.node), self.config.lease_namespace
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # a MicroTime
        try:
            if self._lease is None:
                try:
                    self._lease = _body(
                        self.coordination.read_namespaced_lease(name, namespace, _preload_content=False)
                    )
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    self._lease = _body(
                        self.coordination.create_namespaced_lease(
                            namespace, self._lease_body(name, namespace, now), _preload_content=False
                        )
                    )
                    return
            lease = self._lease
            lease["spec"] = {
                **(lease.get("spec") or {}),
                "holderIdentity": self.config.node,
                "renewTime": now,
                "leaseDurationSeconds": self._lease_seconds(),
            }
            self._lease = _body(
                self.coordination.replace_namespaced_lease(name, namespace, lease, _preload_content=False)
            )
        except ApiException as exc:
            self._lease = None  # read it afresh next time (a conflict, or it was deleted)
            if exc.status == 403:
                log.warning(
                    "may not write the node Lease %s/%s (%s): heartbeating in the NodeProfile instead",
                    namespace,
                    name,
                    exc.reason,
                )
                self._lease_refused = True
            elif exc.status not in (404, 409):
                raise

    def _lease_seconds(self) -> int:
        return max(1, math.ceil(LEASE_DURATION_FACTOR * self.config.heartbeat_seconds))

    def _lease_body(self, name: str, namespace: str, now: str) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {NODE_LEASE_LABEL: "true", NODE_LABEL: label_value(self.config.node)},
            },
            "spec": {
                "holderIdentity": self.config.node,
                "leaseDurationSeconds": self._lease_seconds(),
                "acquireTime": now,
                "renewTime": now,
            },
        }

    def _node_ready(self) -> None:
        now = now_rfc3339()
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "ResidencyWorkerReady",
            "message": "residency worker is serving",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        try:
            self.core.patch_node_status(self.config.node, {"status": {"conditions": [condition]}})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def protect(self, serving: bool) -> None:
        """Mark this worker's Pod as not to be evicted by autoscalers while it holds non-idle models."""
        if self.config.pod_name is None or not self.config.pod_namespace or serving == self._protected:
            return
        annotations: dict[str, str | None] = {
            k: (v if serving else None) for k, v in self.config.protect_annotations.items()
        }
        try:
            self.core.patch_namespaced_pod(
                self.config.pod_name, self.config.pod_namespace, {"metadata": {"annotations": annotations}}
            )
            self._protected = serving
            log.info(
                "%s scale-down protection on pod %s", "set" if serving else "removed", self.config.pod_name
            )
        except ApiException as exc:
            log.warning("cannot annotate pod %s: %s", self.config.pod_name, exc.reason)


def node_lease_name(node: str) -> str:
    """The name of a node's Lease (a DNS subdomain of at most 253 characters)."""
    name = f"residency-node.{node}"
    if len(name) <= 253:
        return name
    return f"{name[:240]}-{hashlib.sha256(node.encode()).hexdigest()[:12]}"


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _body(response: Any) -> dict[str, Any]:
    """The object a call made with ``_preload_content=False`` returned."""
    body: dict[str, Any] = json.loads(response.data)
    return body
