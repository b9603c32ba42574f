"""The node agent: a kubelet for models. Registers the node's measured profile, converges the engine to
the ModelPlacements for this node, and reports what happened (state, residency, measured timings).

Level-triggered: every sync reads this node's placements (a watch-fed cache: one LIST, then WATCH) and
compares them with what the engine holds. The node's liveness is a coordination.k8s.io Lease it renews,
as a kubelet does; its NodeProfile status is written only when a measured value changes.
Shrinking steps (unload, preempt, demote) run before growing ones (load, resume, promote), so the node's
GPU budget is never exceeded on the way; the engine refuses anything that would not fit anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from residency.api import GROUP, VERSION
from residency.api.placement import PREFILL_MODE
from residency.informer import Informer
from residency.kubeapi import TimeoutApiClient
from residency.names import label_value
from residency_worker.ack import LateStatus
from residency_worker.engine import Engine, ModelOptions
from residency_worker.engine.observed import observed_step_due, observed_step_wire
from residency_worker.engine.runner import DEMAND_WINDOW_SECONDS
from residency_worker.engine.types import (
    EngineError,
    LoadReport,
    ModelTimings,
    ObservedDemand,
    PreemptReport,
    ResidencyReport,
    ResumeReport,
    TransferTiming,
)
from residency_worker.gpus import (
    gpu_profile_fields,
    gpus_changed,
    gpus_wire,
    measure_copy_gbps,
    placement_gpus,
    refresh_gpu_fields,
)
from residency_worker.profiler import PROFILE_PREFIX, BackgroundProfiler
from residency_worker.publish import ProfilePublisher

log = logging.getLogger("residency.agent")
NODE_LABEL = "residency.dev/node"
NODE_LEASE_LABEL = "residency.dev/node-lease"
LEASE_DURATION_FACTOR = 4  # a node Lease lasts this many renewal periods (the kubelet's 40 s for 10 s)
UNLOAD_FINALIZER = "residency.dev/unload"
FRACTION_TOLERANCE = 0.02
ACTIVITY_GRANULARITY_SECONDS = 2.0  # report activity at most this often (each report wakes the planner)
DEMAND_REPORT_SECONDS = 10.0  # a changed demand is reported at most this often (unless it starts or stops)
DEMAND_CHANGE_SHARE = 0.2  # ...and only when it moved by this share of what was last reported
# cluster-autoscaler and Karpenter leave a node alone while its pods carry these
PROTECT_ANNOTATIONS = {
    "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
    "karpenter.sh/do-not-disrupt": "true",
}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def timings_wire(timings: ModelTimings) -> dict[str, Any]:
    """The engine's measured timings in the API's Timings shape."""
    wire: dict[str, Any] = {"weightBytes": timings.weight_bytes, "emulated": timings.emulated}
    if timings.load_seconds is not None:
        wire["loadSeconds"] = round(timings.load_seconds, 6)
    if timings.reload_seconds is not None:
        wire["reloadSeconds"] = round(timings.reload_seconds, 6)
    if timings.kv_save_seconds is not None:
        wire["kvTransferSeconds"] = round(timings.kv_save_seconds, 6)
    if timings.kv_save_seconds is not None or timings.kv_bytes:
        wire["kvBytes"] = timings.kv_bytes  # 0 is a measurement too: nothing was in flight
    transfer = timings.reload_transfer or timings.load_transfer
    if transfer is not None:
        # bytes, seconds and GB/s of one and the same measured weight transfer
        wire["hostToDeviceBytes"] = transfer.moved_bytes
        wire["hostToDeviceSeconds"] = round(transfer.seconds, 9)
        wire["hostToDeviceGBps"] = round(transfer.gbps, 4)
        wire["transferPath"] = transfer.path
    elif timings.host_to_device_gbps is not None:
        wire["hostToDeviceGBps"] = round(timings.host_to_device_gbps, 4)
    return wire


def operation_wire(
    action: str, seconds: float, node: str, before: float | None, report: object
) -> dict[str, Any]:
    """One lifecycle operation in the API's Operation shape: what it moved and how long it took.

    Every key is always there (0 where nothing was moved): a status is merge-patched, so a key left out
    would keep the previous operation's value."""
    wire: dict[str, Any] = {
        "action": action.capitalize(),
        "seconds": round(seconds, 6),
        "node": node,
        "time": now_rfc3339(),
        "fromFraction": round(before or 0.0, 6),
        "toFraction": 0.0,
        "movedBytes": 0,
        "gbps": 0.0,
        "requests": 0,
    }
    transfer: TransferTiming | None = None
    if isinstance(report, LoadReport):
        wire["toFraction"] = round(report.residency.resident_fraction, 6)
        transfer = report.host_to_device
    elif isinstance(report, ResidencyReport):
        wire["toFraction"] = round(report.resident_fraction, 6)
    elif isinstance(report, PreemptReport):
        transfer = report.kv_save
        wire["requests"] = report.sequences_parked
    elif isinstance(report, ResumeReport):
        transfer = report.reload
        wire["requests"] = report.sequences_resumed
    if transfer is not None and transfer.moved_bytes:
        wire["movedBytes"] = transfer.moved_bytes
        wire["gbps"] = round(transfer.gbps, 4)
    return wire


def demand_wire(demand: ObservedDemand) -> dict[str, Any]:
    """The engine's observed demand in the API's ObservedDemand shape (a ``None`` field, merge-patched, is
    removed from the status)."""
    return {
        "decodeTokensPerSecond": round(demand.decode_tokens_per_second, 3),
        "promptTokensPerSecond": round(demand.prompt_tokens_per_second, 3),
        "typicalPromptTokens": demand.typical_prompt_tokens,
        "windowSeconds": round(demand.window_seconds, 3),
    }


def demand_report_due(
    reported: dict[str, Any] | None,
    observed: dict[str, Any],
    seconds_since_report: float | None,
    young: bool = False,
) -> bool:
    """Whether to write a newly observed demand: when none was reported, when traffic starts or stops,
    and otherwise when it moved by :data:`DEMAND_CHANGE_SHARE` at most every :data:`DEMAND_REPORT_SECONDS`
    (each status write wakes the planner; a noisy rate must not re-plan the cluster every second).

    ``young``: the model has served here for less than half the window, so its rate undercounts (after a
    move, resume or reload the window starts empty): it may raise what was reported, never lower it."""
    if not reported:
        return True
    before = float(reported.get("decodeTokensPerSecond") or 0.0)
    now = float(observed["decodeTokensPerSecond"])
    prompt_before = float(reported.get("promptTokensPerSecond") or 0.0)
    prompt_now = float(observed["promptTokensPerSecond"])
    if young and (now < before or prompt_now < prompt_before):
        return False
    if (before > 0) != (now > 0):
        return True
    if seconds_since_report is not None and seconds_since_report < DEMAND_REPORT_SECONDS:
        return False
    return abs(now - before) > DEMAND_CHANGE_SHARE * max(before, 1.0) or abs(
        prompt_now - prompt_before
    ) > DEMAND_CHANGE_SHARE * max(prompt_before, 1.0)


@dataclass
class AgentConfig:
    node: str
    endpoint: str
    host_memory_bytes: int
    poll_seconds: float = 1.0  # between syncs without a placement change (the engine's own news)
    heartbeat_seconds: float = 5.0  # between renewals of the node Lease
    grow_seconds: float = 2.0  # loads one sync starts before it lists placements again (moves, deletions)
    node_heartbeat: bool = False  # also keep the Node Ready (local clusters have no kubelet)
    pod_name: str | None = None  # this worker's own Pod (downward API), annotated while it serves
    pod_namespace: str | None = None
    protect_annotations: dict[str, str] = field(default_factory=lambda: dict(PROTECT_ANNOTATIONS))
    lease_namespace: str = "default"  # where the node Lease lives (the operator's namespace)
    # a load or resume is reported as Loading only once it has taken this long: a quick one is one write
    loading_report_seconds: float = 1.0
    background_profile: bool = False  # measure and publish curves of models without one (profiler.py)


@dataclass
class _Failure:
    generation: int
    reason: str
    message: str
    others_reserved_bytes: int = 0  # GPU bytes other models held when it failed
    budget_bytes: int = 0
    action: str = "load"  # what failed: a load, a resume, a preemption, a demotion or promotion

    def retry_now(self, others_reserved_bytes: int, budget_bytes: int) -> bool:
        """A refusal for room is retried once room was freed: another placement on this node shrank or
        left (the operator's writes may reach this worker in either order) or the budget grew. Not on a
        timer: a retry reads the weights again. Any other failure waits for a new spec."""
        if self.reason != RETRIED_REASON:
            return False
        return others_reserved_bytes < self.others_reserved_bytes or budget_bytes > self.budget_bytes


RETRIED_REASON = "PlacementDoesNotFit"


@dataclass
class NodeAgent:
    """Converges one node's engine to its placements."""

    engine: Engine
    config: AgentConfig
    custom: client.CustomObjectsApi = field(
        default_factory=lambda: client.CustomObjectsApi(TimeoutApiClient())
    )
    core: client.CoreV1Api = field(default_factory=lambda: client.CoreV1Api(TimeoutApiClient()))
    coordination: client.CoordinationV1Api = field(
        default_factory=lambda: client.CoordinationV1Api(TimeoutApiClient())
    )
    _failures: dict[str, _Failure] = field(default_factory=dict)
    _loaded_specs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    _protected: bool | None = None
    _last_heartbeat: float = 0.0
    _profile_spec: dict[str, Any] | None = None
    _demand_reported_at: dict[str, float] = field(default_factory=dict)  # monotonic, per model
    _observed_reported_at: dict[str, float] = field(default_factory=dict)  # monotonic, per model
    _operations: dict[str, dict[str, Any]] = field(default_factory=dict)  # last one per model, API shape
    _reload_pending: set[str] = field(default_factory=set)  # unloaded for a spec change: next load reloads
    _lease: Any = None  # the node Lease as last written (a V1Lease)
    _lease_refused: bool = False  # no RBAC for Leases (an older chart): heartbeat in the NodeProfile
    _reported_resident_bytes: int | None = None
    _gpus_checked_at: float = -math.inf  # monotonic; GPUs are probed once per heartbeat period
    _placement_cache: Informer | None = None
    _changed: threading.Event = field(default_factory=threading.Event)
    profiler: BackgroundProfiler | None = None
    """Measures a curve of each model loaded here that has none for this GPU type (profiler.py)."""
    publisher: ProfilePublisher | None = None

    # -- node profile -------------------------------------------------------------------------------
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
        if not self._lease_refused:
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

    def renew_lease(self) -> None:
        """Renew this node's Lease (create it the first time; read it again after a conflict)."""
        name, namespace = node_lease_name(self.config.node), self.config.lease_namespace
        now = datetime.now(UTC)
        try:
            if self._lease is None:
                try:
                    self._lease = self.coordination.read_namespaced_lease(name, namespace)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    self._lease = self.coordination.create_namespaced_lease(
                        namespace, self._lease_body(name, namespace, now)
                    )
                    return
            self._lease.spec.holder_identity = self.config.node
            self._lease.spec.renew_time = now
            self._lease.spec.lease_duration_seconds = self._lease_seconds()
            self._lease = self.coordination.replace_namespaced_lease(name, namespace, self._lease)
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

    def _lease_body(self, name: str, namespace: str, now: datetime) -> client.V1Lease:
        return client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels={NODE_LEASE_LABEL: "true", NODE_LABEL: label_value(self.config.node)},
            ),
            spec=client.V1LeaseSpec(
                holder_identity=self.config.node,
                lease_duration_seconds=self._lease_seconds(),
                acquire_time=now,
                renew_time=now,
            ),
        )

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

    # -- convergence --------------------------------------------------------------------------------
    def placements(self) -> list[dict[str, Any]]:
        """This node's placements: from the watch-fed cache once it has listed, else listed now."""
        cache = self._placement_cache
        if cache is not None and cache.synced.is_set():
            items = cache.items()
        else:
            items = self.custom.list_cluster_custom_object(
                GROUP, VERSION, "modelplacements", label_selector=self._selector()
            ).get("items", [])
        return [p for p in items if p["spec"]["nodeName"] == self.config.node]

    def _selector(self) -> str:
        return f"{NODE_LABEL}={label_value(self.config.node)}"

    def watch_placements(self, stop: threading.Event) -> None:
        """Keep this node's placements in a watch-fed cache; each change wakes the sync loop."""
        self._placement_cache = Informer(
            f"placements-{self.config.node}",
            self.custom.list_cluster_custom_object,
            GROUP,
            VERSION,
            "modelplacements",
            label_selector=self._selector(),
            handler=lambda *_: self._changed.set(),
        )
        self._placement_cache.start(stop)

    def sync(self) -> bool:
        """One convergence pass: shrink first, then grow, then report. True when growing stopped early:
        after `grow_seconds` of loads the next pass lists again, so that a model that moved or went away
        meanwhile is released at once rather than after every other load of a long batch."""
        placements = self.placements()
        if time.monotonic() - self._gpus_checked_at >= self.config.heartbeat_seconds:
            self._gpus_checked_at = time.monotonic()
            self.engine.check_gpus()  # a GPU lost while idle (a driver reset) fails its models now
        wanted = {self._model_name(p): p for p in placements if not p["metadata"].get("deletionTimestamp")}
        leaving = [p for p in placements if p["metadata"].get("deletionTimestamp")]
        loaded = {n for n in self.engine.names() if not n.startswith(PROFILE_PREFIX)}
        for name in sorted(loaded - set(wanted)):
            self._unload(name)
        for name in sorted(loaded & set(wanted)):
            if self._loaded_specs.get(name, _load_key(wanted[name])) != _load_key(wanted[name]):
                self._unload(name)  # path, dtype or KV reservation changed: load afresh below
                self._reload_pending.add(name)
            elif self._state(name) == "failed":
                self._gpu_failed(name, wanted[name])
        loaded = {n for n in self.engine.names() if not n.startswith(PROFILE_PREFIX)}
        for name in sorted(loaded & set(wanted)):
            # the SLO it is paced to follows the LLMModel's without moving anything
            with contextlib.suppress(EngineError):  # unloaded meanwhile: nothing to pace
                self.engine.set_decode_slo(name, _decode_slo(wanted[name]["spec"]))
        for placement in leaving:
            self._release(placement)
        grow: list[dict[str, Any]] = []
        for name, placement in sorted(wanted.items()):
            spec = placement["spec"]
            if name in loaded and spec["desiredState"] in ("Preempted", "Idle"):
                if self._state(name) == "ready":
                    self._act(placement, "preempt")
                else:
                    self._report(placement)
            elif (
                name in loaded
                and spec["desiredState"] == "Loaded"
                and self._state(name) == "ready"
                and (
                    spec["residentFraction"]
                    < self.engine.residency(name).resident_fraction - FRACTION_TOLERANCE
                )
                and not gpus_changed(spec, self.engine.residency(name), FRACTION_TOLERANCE)
            ):
                self._act(placement, "demote")
            else:
                grow.append(placement)
        started = time.monotonic()
        more = False
        for placement in grow:
            if time.monotonic() - started > self.config.grow_seconds:
                more = True
                break
            name = self._model_name(placement)
            spec = placement["spec"]
            if spec["desiredState"] != "Loaded":
                self._report(placement)
                continue
            if name not in self.engine.names():
                self._act(placement, "load")
            elif self._state(name) == "preempted":
                self._act(placement, "resume")
            elif self._state(name) == "failed":
                self._report(placement)  # its GPU was lost: Failed until the operator places it again
            elif (
                abs(spec["residentFraction"] - (held := self.engine.residency(name)).resident_fraction)
                > FRACTION_TOLERANCE
                or spec.get("executionMode", "stream") != held.decode_mode
                or gpus_changed(spec, held, FRACTION_TOLERANCE)
            ):
                # a higher fraction, or the same one in another mode (a change of mode alone moves no
                # weights; it re-homes the offloaded layers' KV cache)
                self._act(placement, "promote")
            else:
                self._report(placement)
        served = [n for n in self.engine.names() if not n.startswith(PROFILE_PREFIX)]
        self.protect(any(self._state(n) in ("ready", "loading") for n in served))
        self.heartbeat()
        return more

    def _act(self, placement: dict[str, Any], action: str) -> None:
        name = self._model_name(placement)
        spec = placement["spec"]
        generation = int(placement["metadata"].get("generation", 0))
        failure = self._failures.get(name)
        if (
            failure is not None
            and failure.generation == generation
            and not failure.retry_now(self._others_reserved_bytes(name), self.engine.gpu_budget_bytes())
        ):
            return  # already failed for this spec: wait for room, or for the operator to re-plan
        if self.profiler is not None:
            self.profiler.interrupt()  # an admin command: a measurement in flight steps aside
        before = self.engine.residency(name).resident_fraction if name in self.engine.names() else None
        started = time.perf_counter()
        report: object = None
        announce: LateStatus | None = None
        try:
            if action == "load":
                loading = {"state": "Loading", "reason": None, "message": None}
                announce = self._report_loading(placement, loading)
                report = self.engine.load(
                    name,
                    spec["sourcePath"],
                    ModelOptions(
                        dtype=spec.get("dtype", "bfloat16"),
                        resident_fraction=float(spec["residentFraction"]),
                        min_resident_fraction=float(spec.get("minResidentFraction", 0.0)),
                        max_batch_size=int(spec.get("maxBatchSize", 8)),
                        max_sequence_length=int(spec.get("maxSequenceLength", 2048)),
                        min_decode_tokens_per_second=_decode_slo(spec),
                        # the planner's mode is the decode mode; prefill streams in both (PREFILL_MODE),
                        # and its memory promise counts the staging buffers that takes
                        decode_mode=spec.get("executionMode", "stream"),
                        prefill_mode=PREFILL_MODE,
                        gpus=placement_gpus(spec),
                    ),
                )
                self._loaded_specs[name] = _load_key(placement)
                self._want_profile(placement)
            elif action == "preempt":
                report = self.engine.preempt(name)
            elif action == "resume":
                announce = self._report_loading(placement, {"state": "Loading"})
                report = self.engine.resume(name)
            elif action in ("demote", "promote"):
                mode = spec.get("executionMode", "stream")
                report = self.engine.set_residency(
                    name,
                    float(spec["residentFraction"]),
                    decode_mode=mode,
                    prefill_mode=PREFILL_MODE,
                    gpus=placement_gpus(spec) or ((0, float(spec["residentFraction"])),),
                )
            seconds = time.perf_counter() - started
            log.info("%s %s on %s in %.3f s", action, name, self.config.node, seconds)
            self._failures.pop(name, None)
            reload = action == "load" and name in self._reload_pending
            self._reload_pending.discard(name)
            operation = operation_wire(
                "reload" if reload else action, seconds, self.config.node, before, report
            )
            if action == "resume":  # back at the fraction it held
                operation["toFraction"] = round(self.engine.residency(name).resident_fraction, 6)
            self._operations[name] = operation
        except EngineError as exc:
            log.warning("%s of %s failed: %s (%s)", action, name, exc.message, exc.reason)
            self._failures[name] = _Failure(
                generation,
                exc.reason,
                exc.message,
                self._others_reserved_bytes(name),
                self.engine.gpu_budget_bytes(),
                action,
            )
            if action == "load" and name in self.engine.names():
                self._unload(name)
        finally:
            if announce is not None:
                announce.settle()
        self._report(placement)

    def _gpu_failed(self, name: str, placement: dict[str, Any]) -> None:
        """A model whose GPU was lost: Failed with the engine's reason for the spec it failed under; a newer
        spec (the operator placed it again, on other GPUs) loads it afresh."""
        generation = int(placement["metadata"].get("generation", 0))
        failure = self._failures.get(name)
        if failure is not None and failure.action == "serve" and failure.generation != generation:
            self._unload(name)  # placed again: loads afresh in this pass
            return
        if failure is None or failure.action != "serve":
            error = self.engine.runner(name).failure
            reason, message = (error.reason, error.message) if error else ("Failed", f"{name} failed")
            self._failures[name] = _Failure(generation, reason, message, action="serve")

    def _report_loading(self, placement: dict[str, Any], status: dict[str, Any]) -> LateStatus:
        """``Loading`` on the placement once the load has taken ``loading_report_seconds``."""
        return LateStatus(lambda: self._patch_status(placement, status), self.config.loading_report_seconds)

    def _others_reserved_bytes(self, name: str) -> int:
        """GPU bytes the other models on this node hold (each runner reserves under its own owner)."""
        tiers = self.engine.tiers
        try:
            owner = self.engine.runner(name).owner
            own_bytes = sum(tier.reserved_bytes(owner) for tier in tiers)
        except EngineError:
            own_bytes = 0  # not loaded: it holds nothing
        return sum(tier.reserved_bytes() for tier in tiers) - own_bytes

    def _report(self, placement: dict[str, Any]) -> None:
        name = self._model_name(placement)
        generation = placement["metadata"].get("generation")
        failure = self._failures.get(name)
        if failure is not None and failure.generation != generation:
            failure = None
        # a demotion or promotion that failed leaves the model serving as it was: reported as such below
        changed_in_place = (
            failure is not None
            and failure.action in ("demote", "promote")
            and name in self.engine.names()
            and self.engine.status(name).state == "ready"
        )
        if failure is not None and not changed_in_place:
            status: dict[str, Any] = {
                "state": "Failed",
                "reason": failure.reason,
                "message": failure.message[:4000],
                "gpus": None,  # it holds nothing on any GPU
            }
        elif name not in self.engine.names():
            desired = placement["spec"]["desiredState"]
            status = {"state": desired if desired in ("Preempted", "Idle") else "Pending", "gpus": None}
        else:
            model = self.engine.status(name)
            state = {"ready": "Loaded", "preempted": "Preempted", "loading": "Loading"}.get(
                model.state, "Failed"
            )
            if state == "Preempted" and placement["spec"]["desiredState"] == "Idle":
                state = "Idle"
            status = {
                "state": state,
                "residentFraction": round(model.residency.resident_fraction, 6),
                "executionMode": model.residency.decode_mode,
                "residentBytes": model.residency.gpu_reserved_bytes if state == "Loaded" else 0,
                "gpus": gpus_wire(model.residency) if state == "Loaded" else None,
                "timings": timings_wire(model.timings),
                "lastOperation": self._operations.get(name),
                "endpoint": f"{self.config.endpoint}/v1",
                "reason": None,
                "message": None,
            }
            if failure is not None:
                # a promotion, demotion or mode change that failed: the model still serves as it was, and
                # says so (its residentFraction is what it holds, not what the spec asks)
                status["reason"] = failure.reason
                status["message"] = (
                    f"could not change to {_percent(placement['spec']['residentFraction'])}% resident "
                    f"({placement['spec'].get('executionMode', 'stream')}): {failure.message}; still serving "
                    f"at {_percent(model.residency.resident_fraction)}%"
                )[:4000]
            runner = self.engine.runner(name)
            active = time.time() if model.active_sequences or model.queue_depth else runner.last_request_time
            reported = parse_rfc3339((placement.get("status") or {}).get("lastActiveTime"))
            fresh = reported is None or active - reported >= ACTIVITY_GRANULARITY_SECONDS
            if fresh:
                status["lastActiveTime"] = rfc3339(active)
            # requests waiting for a batch slot: written when it turns zero or non-zero, and with activity
            queued = (placement.get("status") or {}).get("queuedRequests")
            if fresh or queued is None or bool(queued) != bool(model.queue_depth):
                status["queuedRequests"] = model.queue_depth
            if state == "Loaded":
                demand = self._demand_due(name, runner.demand(), placement)
                if demand is not None:
                    status["demand"] = demand
            if model.timings.decode_tokens_per_second is not None:
                status["observedDecodeTokensPerSecond"] = round(model.timings.decode_tokens_per_second, 3)
            observed = runner.observed_steps.summary() if state == "Loaded" else None
            if observed is not None:
                reported_at = self._observed_reported_at.get(name)
                since = None if reported_at is None else time.monotonic() - reported_at
                if observed_step_due((placement.get("status") or {}).get("observedStep"), observed, since):
                    status["observedStep"] = observed_step_wire(observed)
                    self._observed_reported_at[name] = time.monotonic()
        status["observedGeneration"] = generation
        current = placement.get("status") or {}
        if any(current.get(k) != v for k, v in status.items() if v is not None) or any(
            v is None and k in current for k, v in status.items()
        ):
            self._patch_status(placement, status)

    def _demand_due(
        self, name: str, demand: ObservedDemand, placement: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The demand to write for a loaded model, when a report is due (see :func:`demand_report_due`)."""
        observed = demand_wire(demand)
        reported_at = self._demand_reported_at.get(name)
        since = None if reported_at is None else time.monotonic() - reported_at
        young = demand.age_seconds < DEMAND_WINDOW_SECONDS / 2
        if not demand_report_due((placement.get("status") or {}).get("demand"), observed, since, young):
            return None
        self._demand_reported_at[name] = time.monotonic()
        return observed

    def _patch_status(self, placement: dict[str, Any], status: dict[str, Any]) -> None:
        try:
            self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, "modelplacements", placement["metadata"]["name"], {"status": status}
            )
            placement.setdefault("status", {}).update({k: v for k, v in status.items() if v is not None})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _unload(self, name: str) -> None:
        self._loaded_specs.pop(name, None)
        self._operations.pop(name, None)
        self._reload_pending.discard(name)
        self._demand_reported_at.pop(name, None)
        self._observed_reported_at.pop(name, None)
        try:
            self.engine.unload(name)
            log.info("unloaded %s from %s", name, self.config.node)
        except EngineError as exc:
            log.warning("unload of %s: %s", name, exc.message)
        self._failures.pop(name, None)

    def _release(self, placement: dict[str, Any]) -> None:
        """A deleted placement: free the memory, then let the object go."""
        name = self._model_name(placement)
        if name in self.engine.names():
            self._unload(name)
        finalizers = [f for f in placement["metadata"].get("finalizers") or [] if f != UNLOAD_FINALIZER]
        try:
            self.custom.patch_cluster_custom_object(
                GROUP,
                VERSION,
                "modelplacements",
                placement["metadata"]["name"],
                {
                    "metadata": {
                        "finalizers": finalizers or None,
                        "resourceVersion": placement["metadata"]["resourceVersion"],
                    }
                },
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _state(self, name: str) -> str:
        return self.engine.status(name).state

    def _want_profile(self, placement: dict[str, Any]) -> None:
        """Queue a background profile of a model just loaded, unless its namespace has one for this GPU."""
        if self.profiler is None or self.publisher is None:
            return
        spec = placement["spec"]
        model, dtype = self._model_name(placement), spec.get("dtype", "bfloat16")
        if spec["model"].get("uid"):
            self.publisher.model_uids[model] = spec["model"]["uid"]
        namespace = spec["model"]["namespace"]
        if self.publisher.exists(namespace, spec["sourcePath"], self.engine.tier.gpu_name, dtype):
            self.profiler.forget(spec["sourcePath"], dtype)
        else:
            self.profiler.want(model, spec["sourcePath"], dtype)

    @staticmethod
    def _model_name(placement: dict[str, Any]) -> str:
        model = placement["spec"]["model"]
        return f"{model['namespace']}/{model['name']}"

    # -- loop ---------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Until stop is set: sync, survive API server restarts with backoff."""
        backoff = self.config.poll_seconds
        registered = False
        self.watch_placements(stop)
        while not stop.is_set():
            more = False
            self._changed.clear()  # (before the sync reads: a change during it wakes the next one)
            try:
                if not registered:
                    self.register()
                    registered = True
                more = self.sync()
                backoff = self.config.poll_seconds
            except Exception as exc:  # the API server may be away; keep serving and retry
                log.warning("sync failed (%s); retrying in %.1f s", exc.__class__.__name__, backoff)
                backoff = min(backoff * 2, 10.0)
            if not more:
                self._changed.wait(backoff)  # a placement change, or the poll period
        self._changed.set()


def node_lease_name(node: str) -> str:
    """The name of a node's Lease (a DNS subdomain of at most 253 characters)."""
    name = f"residency-node.{node}"
    if len(name) <= 253:
        return name
    return f"{name[:240]}-{hashlib.sha256(node.encode()).hexdigest()[:12]}"


def _decode_slo(spec: dict[str, Any]) -> float | None:
    """The placement's decode SLO in tokens/s (``None``: the model has none, or an invalid one)."""
    slo = spec.get("minDecodeTokensPerSecond")
    try:
        value = None if slo is None else float(slo)
    except (TypeError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _load_key(placement: dict[str, Any]) -> tuple[Any, ...]:
    """What a loaded model cannot change without loading again."""
    spec = placement["spec"]
    return (spec["sourcePath"], spec.get("dtype"), spec.get("maxSequenceLength"), spec.get("maxBatchSize"))


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _percent(fraction: float) -> str:
    return f"{100 * float(fraction):.0f}"
