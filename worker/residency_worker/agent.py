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
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

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
from residency_worker.engine.types import EngineError, ObservedDemand
from residency_worker.gpus import gpus_changed, gpus_wire, placement_gpus
from residency_worker.presence import NODE_LABEL, AgentConfig, NodePresence
from residency_worker.profiler import PROFILE_PREFIX, BackgroundProfiler
from residency_worker.publish import ProfilePublisher
from residency_worker.status_wire import (
    demand_report_due,
    demand_wire,
    operation_wire,
    parse_rfc3339,
    rfc3339,
    timings_wire,
)

log = logging.getLogger("residency.agent")
UNLOAD_FINALIZER = "residency.dev/unload"
FRACTION_TOLERANCE = 0.02
ACTIVITY_GRANULARITY_SECONDS = 2.0  # report activity at most this often (each report wakes the planner)


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
class NodeAgent(NodePresence):
    """Converges one node's engine to its placements (its presence in the cluster: presence.py)."""

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
    _lease: dict[str, Any] | None = None  # the node Lease as last written (its JSON)
    _lease_refused: bool = False  # no RBAC for Leases (an older chart): heartbeat in the NodeProfile
    _lease_lock: threading.Lock = field(default_factory=threading.Lock)
    _lease_renewer: bool = False
    _reported_resident_bytes: int | None = None
    _gpus_checked_at: float = -math.inf  # monotonic; GPUs are probed once per heartbeat period
    _placement_cache: Informer | None = None
    _changed: threading.Event = field(default_factory=threading.Event)
    profiler: BackgroundProfiler | None = None
    """Measures a curve of each model loaded here that has none for this GPU type (profiler.py)."""
    publisher: ProfilePublisher | None = None

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
        # (an Event of its own: the scale harness runs a thousand agents in one process, and a thousand
        # renewers timing out on the one shared ``stop`` each period would all contend for its lock)
        lease_stop = threading.Event()
        if self.config.lease_thread:
            threading.Thread(
                target=self.renew_leases, args=(lease_stop,), name=f"lease-{self.config.node}", daemon=True
            ).start()
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
                self._changed.wait(self._wait_seconds(backoff))  # a placement change, or the poll period
        self._changed.set()
        lease_stop.set()

    def _wait_seconds(self, backoff: float) -> float:
        """Until the next pass: the poll period (or an error's backoff), or sooner where the Lease renewal
        this loop makes (no renewer thread) falls due first."""
        if self.config.lease_thread or backoff > self.config.poll_seconds:
            return backoff
        due = self.config.heartbeat_seconds - (time.monotonic() - self._last_heartbeat)
        return min(backoff, max(0.05, due))


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


def _percent(fraction: float) -> str:
    return f"{100 * float(fraction):.0f}"
