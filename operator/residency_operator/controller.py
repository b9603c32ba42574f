"""The planning loop: read the cluster, plan, write placements before any worker acts, report status.

Level-triggered: each round recomputes everything from the API server's state (as the watch-fed
:class:`~residency_operator.cache.ClusterCache` holds it), so a restart or a lost event changes nothing.
A round runs when a change that can alter the plan arrives, when a node's liveness flips, and every
resync period. Only the holder of the `residency-operator` Lease writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from residency.names import placement_name
from residency_operator.cache import ClusterCache
from residency_operator.capacity import (
    CAPACITY_LABEL,
    MODEL_LABEL,
    CapacityConfig,
    capacity_pod,
    full_residency_gpu_bytes,
    needs_capacity,
    waiting_verdict,
)
from residency_operator.changes import Changes
from residency_operator.conditions import desired_status, now_rfc3339, status_patch
from residency_operator.drains import DrainReports
from residency_operator.events import operation_event, prediction_event, with_operation, with_prediction_check
from residency_operator.incremental import IncrementalRounds
from residency_operator.inputs import ModelRows, Validate, planner_inputs
from residency_operator.kube import Kube
from residency_operator.metrics import OperatorMetrics
from residency_operator.placements import desired_placements, placement_needs_update, write_phase
from residency_operator.planner import Plan, PlannerConfig, plan
from residency_operator.rounds import (
    PROGRESS_REASONS,
    REJECTED_STATUSES,
    WARNING_PHASES,
    RoundReport,
    StatusJob,
    rejection_message,
    short_list,
    status_rank,
)
from residency_operator.state import (
    UNLOAD_FINALIZER,
    ClusterState,
    Inputs,
    OperatorKnobs,
    lease_renewals,
    live_nodes,
    liveness_suspended,
    model_key,
    stale_nodes,
    with_wake_requests,
)
from residency_operator.validation import ValidationCache
from residency_operator.verdicts import (
    RETRIED_LOAD_FAILURES,
    model_verdict,
    rejected_verdict,
    unschedulable_by_model,
)

log = logging.getLogger("residency.controller")
LEASE_NAME = "residency-operator"


class Controller:
    """Runs planning rounds when something changed (debounced) and on a resync period."""

    def __init__(
        self,
        kube: Kube,
        knobs: OperatorKnobs,
        planner_config: PlannerConfig | None = None,
        lease_namespace: str = "default",
        resync_seconds: float = 20.0,
        debounce_seconds: float = 0.3,
        lease_seconds: int = 15,
        capacity: CapacityConfig | None = None,
        metrics: OperatorMetrics | None = None,
        namespaces: Sequence[str] = (),
        cache: ClusterCache | None = None,
        validation_seconds: float = 60.0,
        write_workers: int = 8,
        status_budget_seconds: float = 1.0,
        incremental_min_models: int | None = 2000,
        progress_quiet_seconds: float = 10.0,
    ) -> None:
        self.progress_quiet_seconds = progress_quiet_seconds
        """While more changes wait, the ordinary steps (Scheduled, Loading) of a model placed less than
        this long ago are not written: the round after its worker reports writes where it got to (often
        Ready) in one write instead of two or three. With nothing waiting, each step is written at once."""
        self._placed_at: dict[str, float] = {}
        self.write_workers = write_workers
        self.status_budget_seconds = status_budget_seconds
        """After this long writing statuses, a round leaves the rest to the next one when a change is
        waiting: new placements go out first, and a status that is behind is written once, not per step."""
        """Writes of one step of a round in flight at once (each still through the write limiter)."""
        self._report_lock = threading.Lock()
        self.kube = kube
        self.cache = cache
        """Watch-fed state; without one, each round lists every kind from the API server (tests)."""
        self._validation = ValidationCache(validation_seconds)
        self._rows = ModelRows()
        """Each model's planner inputs, reused while its objects stay (inputs.py)."""
        self._live: frozenset[str] | None = None  # nodes taking work in the last round
        self._reported: dict[str, tuple[Any, Any]] = {}  # model -> (verdict, version) its status shows
        self._last_round = -float("inf")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.namespaces = frozenset(namespaces)
        """The namespaces whose models this operator serves (empty: all)."""
        self._foreign_gpu_bytes: dict[str, int] = {}
        self.knobs = knobs
        self.planner_config = planner_config or PlannerConfig()
        self.incremental = (
            None
            if incremental_min_models is None
            else IncrementalRounds(incremental_min_models, self.planner_config)
        )
        """Single-model spec changes at fleet size re-planned incrementally (None: always in full)."""
        self.lease_namespace = lease_namespace
        self.resync_seconds = resync_seconds
        self.debounce_seconds = debounce_seconds
        self.lease_seconds = lease_seconds
        self.identity = f"{socket.gethostname()}-{os.getpid()}"
        self.capacity = capacity or CapacityConfig()
        self.metrics = metrics or OperatorMetrics()
        self._priority_class_ready = False
        self.drains = DrainReports(kube)
        self.liveness_suspended = False
        """Most nodes went stale at once: liveness is not acted on (state.liveness_suspended)."""
        self.stale_nodes: frozenset[str] = frozenset()
        """The nodes judged dead at the last round (logged when the set grows or shrinks)."""
        self._statuses_behind = False  # the last round left status writes to the next one
        self._dirty = asyncio.Event()
        self.leader = False
        self._renewed_at = -math.inf
        # Leader work (a Lease renewal, a round) runs in a thread that cancelling run() does not stop:
        # release() waits for it under this lock, and nothing starts once it is stopping.
        self._leading = threading.Lock()
        self._stopping = False

    def poke(self) -> None:
        """Something changed in the cluster: plan again soon (safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._dirty.set()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._dirty.set()
        else:
            loop.call_soon_threadsafe(self._dirty.set)

    def round_due(self, dirty: bool) -> bool:
        """Whether to plan now: a change came, the resync period passed, or a node's liveness flipped
        (a Lease that stopped being renewed sends no event)."""
        if dirty or time.monotonic() - self._last_round >= self.resync_seconds:
            return True
        if self.cache is None or self._live is None:
            return False
        return live_nodes(self.cache.state(), datetime.now(UTC), self.knobs) != self._live

    async def run(self) -> None:
        """Forever: wait for a change, a liveness check or the resync period, then plan (when leader)."""
        self._loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._dirty.wait(), timeout=min(self.resync_seconds, self.lease_seconds / 3)
                )
            await asyncio.sleep(self.debounce_seconds)
            dirty = self._dirty.is_set()
            self._dirty.clear()
            try:
                if not (self._lease_fresh() or await asyncio.to_thread(self._renew)):
                    self._last_round = -float("inf")  # a new leader plans at once
                    continue
                if self.cache is not None and not self.cache.synced():
                    self._dirty.set()  # plan from a complete view only
                    await asyncio.sleep(0.5)
                    continue
                if not self.round_due(dirty):
                    continue
                report = await asyncio.to_thread(self._lead_round)
                if report is None:
                    return  # stopping
                if report.created or report.updated or report.deleted or report.statuses:
                    log.info(
                        "plan (%s, %.3f s: %s): created %s updated %s deleted %s; %d statuses written, "
                        "%d left to the next round",
                        report.solver,
                        report.seconds,
                        report.timings(),
                        short_list(report.created),
                        short_list(report.updated),
                        short_list(report.deleted),
                        report.statuses,
                        report.deferred,
                    )
            except asyncio.CancelledError:
                raise
            except Exception:  # the API server may be restarting: log, back off, try again
                log.exception("planning round failed; retrying")
                if self.incremental is not None:
                    self.incremental.drop()  # the changes this round took are lost: plan in full
                await asyncio.sleep(2.0)
                self._dirty.set()

    def _lease_fresh(self) -> bool:
        """Whether this operator leads on a Lease renewed less than a third of its term ago: a round may
        start without renewing it first (a round at fleet size takes seconds, far less than the two thirds
        left; client-go's leader election acts within its renew deadline the same way). At fleet size a
        renewal before every round would add an API round trip to every change's latency."""
        return self.leader and time.monotonic() - self._renewed_at < self.lease_seconds / 3

    def _renew(self) -> bool:
        with self._leading:
            if self._stopping:
                return False
            asked_at = time.monotonic()  # (the Lease's term runs from no later than this)
            # (set under the lock: a Lease acquired as a stop begins must be one release() gives up)
            leader = self.kube.try_acquire_lease(
                self.lease_namespace, LEASE_NAME, self.identity, self.lease_seconds
            )
            if leader:
                self._renewed_at = asked_at
            if leader != self.leader:
                log.info("%s the %s Lease as %s", "holding" if leader else "lost", LEASE_NAME, self.identity)
            self.leader = leader
            if not leader and self.incremental is not None:
                self.incremental.drop()  # another operator may have planned meanwhile
            return leader

    def _lead_round(self) -> RoundReport | None:
        with self._leading:
            return None if self._stopping else self.round()

    def release(self) -> None:
        """Give the Lease up on a clean stop so that a successor acts at once: after the round (or Lease
        renewal) in flight has ended, so that two leaders never write placements at the same time."""
        with self._leading:
            self._stopping = True
            if self.leader:
                self.kube.release_lease(self.lease_namespace, LEASE_NAME, self.identity)
                self.leader = False

    def read_state(self) -> ClusterState:
        """The cluster as this operator plans it: with ``namespaces``, only their models, profiles and
        placements (another operator's placements are left alone; see :meth:`foreign_gpu_bytes`)."""
        state = (
            self.cache.state()
            if self.cache is not None
            else ClusterState(
                models=self.kube.list_custom("llmmodels"),
                node_profiles=self.kube.list_custom("nodeprofiles"),
                nodes=self.kube.list_nodes(),
                placements=self.kube.list_custom("modelplacements"),
                sensitivity_profiles=self.kube.list_custom("sensitivityprofiles"),
            )
        )
        # the router's wake requests (a ConfigMap of its own, wake.py) mark the models they name
        wake = (
            self.cache.wake_requests()
            if self.cache is not None
            else self.kube.wake_requests(self.lease_namespace)
        )
        state = dataclasses.replace(state, models=with_wake_requests(state.models, wake))
        self._foreign_gpu_bytes = self.foreign_gpu_bytes(state.placements)
        if not self.namespaces:
            return state
        return dataclasses.replace(
            state,
            models=[m for m in state.models if m["metadata"].get("namespace") in self.namespaces],
            placements=[p for p in state.placements if self._serves(p)],
            sensitivity_profiles=[
                p for p in state.sensitivity_profiles if p["metadata"].get("namespace") in self.namespaces
            ],
        )

    def _serves(self, placement: dict[str, Any]) -> bool:
        return not self.namespaces or placement["spec"]["model"]["namespace"] in self.namespaces

    def foreign_gpu_bytes(self, placements: list[dict[str, Any]]) -> dict[str, int]:
        """Per node, the GPU bytes that models of other namespaces hold (their workers report them on
        their ModelPlacements): memory this operator must not plan into."""
        held: dict[str, int] = {}
        if not self.namespaces:
            return held
        for placement in placements:
            if self._serves(placement):
                continue
            node = placement["spec"]["nodeName"]
            held[node] = held.get(node, 0) + int((placement.get("status") or {}).get("residentBytes") or 0)
        return held

    @property
    def validation_seconds(self) -> float:
        """How long a model's validation verdict (its directory read from disk) is reused."""
        return self._validation.seconds

    @validation_seconds.setter
    def validation_seconds(self, seconds: float) -> None:
        self._validation.seconds = seconds

    def validator(self) -> Validate:
        """This round's validate_model, its verdicts reused (:class:`ValidationCache`)."""
        return self._validation.validator(self.knobs.allowed_model_roots, self.knobs.remote_code_roots)

    def round(self) -> RoundReport:
        """One level-triggered planning round."""
        started = time.perf_counter()
        self._last_round = time.monotonic()
        report = RoundReport()
        # what changed since the last round, taken before the state is read (a change that comes between
        # the two is in this round's state and planned again by the next round)
        changes = self.cache.take_changes() if self.cache is not None else Changes(other=True)
        state = self.read_state()
        now = datetime.now(UTC)
        self._live = live_nodes(state, now, self.knobs)
        self._note_liveness(state, now)
        inputs = planner_inputs(state, now, self.knobs, self.validator(), self._rows)
        foreign = self._foreign_gpu_bytes
        if foreign:
            inputs.nodes = [
                dataclasses.replace(n, reserved_gpu_bytes=n.reserved_gpu_bytes + foreign.get(n.name, 0))
                for n in inputs.nodes
            ]
        lap = time.perf_counter()
        report.phase_seconds["inputs"] = lap - started
        change = None
        # (a round that left statuses to the next one is followed by a full round, which writes them)
        if not changes.other and not foreign and not self._statuses_behind and self.incremental is not None:
            change = self.incremental.change(changes, inputs, time.time())
        if change is None:
            result = plan(
                inputs.demands,
                inputs.nodes,
                inputs.current,
                inputs.profiles,
                time.time(),
                self.planner_config,
            )
            scoped_result, scoped_inputs = result, inputs
        else:
            # only the changed models and what they touched: their placements and statuses are written
            result = change.plan
            scoped_result, scoped_inputs = change.scoped(inputs)
        report.solver = result.solver if change is None else "incremental"
        report.phase_seconds["plan"] = time.perf_counter() - lap
        lap = time.perf_counter()
        desired = desired_placements(scoped_result, scoped_inputs)
        existing = {p["metadata"]["name"]: p for p in state.placements}
        if change is not None:
            names = change.placement_names()
            existing = {name: p for name, p in existing.items() if name in names}
        accepting = {n.name for n in inputs.nodes if n.schedulable}
        # Placements first: the plan is in the API server before any worker acts on it. Writes that free
        # GPU memory (demotions, preemptions, removals) go before writes that take it, so that a worker
        # that lists placements between two writes never sees a load without the room made for it.
        # (Within one step the writes are independent: they go `write_workers` at a time.)
        order = {name: write_phase(existing.get(name), wanted) for name, wanted in desired.items()}

        def write(name: str) -> None:
            self._write_placement(name, desired[name], existing.get(name), report)

        def remove(name: str) -> None:
            have = existing[name]
            if not have["metadata"].get("deletionTimestamp"):
                self.kube.delete_placement(name)
                report.deleted.append(name)
            elif have["spec"]["nodeName"] not in accepting:
                # its worker is gone: nobody else will unload it
                self.kube.remove_placement_finalizers(name)

        self._each(sorted(n for n, p in order.items() if p == "shrink"), write)
        self._each(sorted(n for n in existing if n not in desired), remove)
        self._each(sorted(n for n, p in order.items() if p in ("move", "grow")), write)
        report.phase_seconds["placements"] = time.perf_counter() - lap
        lap = time.perf_counter()
        waiting: dict[str, tuple[dict[str, Any], int]] = {}
        if change is None:
            waiting = self._request_capacity(result, inputs)
            self.drains.report(state, inputs, desired)
        phases: dict[str, int] = {}
        unschedulable = unschedulable_by_model(result)
        statuses: list[StatusJob] = []
        placed_at = time.monotonic()
        self._placed_at = {n: t for n, t in self._placed_at.items() if n in desired}
        self._placed_at.update((name, placed_at) for name in report.created)
        bodies = (
            inputs.bodies
            if change is None
            else {k: inputs.bodies[k] for k in change.models if k in inputs.bodies}
        )
        for key, body in sorted(bodies.items()):
            placement = existing.get(placement_name(key))
            if placement is not None and placement_name(key) not in desired:
                placement = None
            verdict = model_verdict(key, inputs, result, placement, unschedulable)
            refused = report.rejected.get(placement_name(key))
            if refused is not None:
                verdict = rejected_verdict(verdict, refused)
            if key in waiting and verdict.phase == "Unschedulable":
                pod, gpu_bytes = waiting[key]
                verdict = waiting_verdict(verdict, pod, gpu_bytes, self.capacity)
            verdict = with_prediction_check(with_operation(verdict, placement))
            phases[verdict.phase] = phases.get(verdict.phase, 0) + 1
            version = body["metadata"].get("resourceVersion")
            if version is not None and self._reported.get(key) == (verdict, version):
                continue  # the same verdict on the same object as last round: its status says it already
            current = dict(body.get("status") or {})
            events = [
                e for e in (operation_event(current, placement), prediction_event(current, verdict)) if e
            ]
            if (
                verdict.reason in ("Placed", "Loading")
                and current.get("phase") in (None, "Pending", "Scheduled", "Loading")
                and placed_at - self._placed_at.get(placement_name(key), -math.inf)
                < self.progress_quiet_seconds
                and self._dirty.is_set()
            ):
                # Placed moments ago while more changes wait (a wave): its worker is loading it, and a
                # round after the worker reports writes where it got to; the placement is what the
                # worker acts on, the status only reports it.
                report.deferred += 1
                continue
            generation = body["metadata"].get("generation")
            patch = status_patch(current, desired_status(current, verdict, generation, now_rfc3339()))
            if not patch:
                self._reported[key] = (verdict, version)
                continue
            statuses.append((key, body, verdict, current, patch, events))
        # What a person must hear first goes first (failures, preemptions, waits), then Ready, then the
        # steps on the way; when the status budget runs out with a change waiting, the rest wait a round.
        statuses.sort(key=lambda job: (status_rank(job[2]), job[0]))
        statuses_from = time.monotonic()

        def write_status(job: StatusJob) -> None:
            # (an incremental round writes a few statuses: never left to a round that would be a full one)
            if (
                change is None
                and self._dirty.is_set()
                and time.monotonic() - statuses_from > self.status_budget_seconds
            ):
                with self._report_lock:
                    report.deferred += 1  # level-triggered: the next round, moments away, writes it
                return
            self._write_status(job, report)

        report.phase_seconds["verdicts"] = time.perf_counter() - lap
        lap = time.perf_counter()
        self._each(statuses, write_status)
        report.phase_seconds["statuses"] = time.perf_counter() - lap
        report.created.sort()
        report.updated.sort()
        report.deleted.sort()
        self._reported = {k: v for k, v in self._reported.items() if k in inputs.bodies}
        # A full round that left statuses behind makes the next round a full one, which writes them. A step
        # an incremental round did not write (Scheduled while more changes wait) is written by the round
        # its worker's report starts, or the resync.
        self._statuses_behind = report.deferred > 0 and change is None
        if change is None and self.incremental is not None:
            wrote = bool(report.created or report.updated or report.deleted or report.rejected)
            self.incremental.after_full_round(inputs, wrote or bool(foreign), time.time())
        report.seconds = time.perf_counter() - started
        if change is None:  # (phase counts and plan figures are the whole fleet's, from full rounds)
            self.metrics.observe_round(report.seconds, phases, waiting, result, inputs)
        else:
            self.metrics.plan_seconds.observe(report.seconds)
        return report

    def _note_liveness(self, state: ClusterState, now: datetime) -> None:
        """Log when nodes are judged dead (their models may move) or live again, and when liveness is
        suspended (most nodes stale at once) and when it resumes."""
        renewed = lease_renewals(state.node_leases)
        suspended = liveness_suspended(state.node_profiles, renewed, now, self.knobs)
        stale = frozenset() if suspended else stale_nodes(state.node_profiles, renewed, now, self.knobs)
        if stale - self.stale_nodes:
            newly = sorted(stale - self.stale_nodes)
            log.warning(
                "%d node(s) judged dead, no Lease renewal for over %.0f s (%d of %d now): %s; "
                "their models are placed elsewhere",
                len(newly),
                self.knobs.heartbeat_grace_seconds,
                len(stale),
                len(state.node_profiles),
                ", ".join(newly[:10]) + (f" and {len(newly) - 10} more" if len(newly) > 10 else ""),
            )
        if self.stale_nodes - stale:
            back = sorted(self.stale_nodes - stale)
            log.info("%d node(s) renewing again: %s", len(back), ", ".join(back[:10]))
        self.stale_nodes = stale
        if suspended != self.liveness_suspended:
            if suspended:
                log.warning(
                    "most nodes stopped renewing their Leases at once (%d registered): the API server is "
                    "the likelier failure; no node is judged dead, no model moved for it, until they resume",
                    len(state.node_profiles),
                )
            else:
                log.info("node Lease renewals come through again: liveness is judged as before")
        self.liveness_suspended = suspended

    def _each(self, items: Sequence[Any], write: Callable[[Any], None]) -> None:
        """``write(item)`` for every item, :attr:`write_workers` at a time (each still through the write
        limiter); the first failure is raised once every write has ended."""
        if self.write_workers <= 1 or len(items) <= 1:
            for item in items:
                write(item)
            return
        with ThreadPoolExecutor(self.write_workers, thread_name_prefix="residency-write") as pool:
            futures = [pool.submit(write, item) for item in items]
        for future in futures:
            future.result()

    def _write_status(self, job: StatusJob, report: RoundReport) -> None:
        """One model's status patch (key, body, verdict, current status, patch) and its Events."""
        key, body, verdict, current, patch, events = job
        namespace, name = key.split("/", 1)
        try:
            patched = self.kube.patch_model_status(namespace, name, patch)
            if self.cache is not None:
                self.cache.models.written(patched)
            written_version = ((patched or {}).get("metadata") or {}).get("resourceVersion")
            self._reported[key] = (verdict, written_version)
        except ApiException as exc:
            if exc.status not in REJECTED_STATUSES:
                raise
            report.rejected[key] = rejection_message(exc)
            log.error("the API server refused the status of %s: %s", key, report.rejected[key])
            return
        with self._report_lock:
            report.statuses += 1
        if (current.get("phase") != verdict.phase or current.get("reason") != verdict.reason) and (
            verdict.reason not in PROGRESS_REASONS
        ):
            warn = verdict.phase in WARNING_PHASES or verdict.reason in RETRIED_LOAD_FAILURES
            event_type = "Warning" if warn else "Normal"
            self.kube.post_event(body, event_type, verdict.reason, f"{verdict.phase}: {verdict.message}")
        for event_type, reason, message in events:  # an operation the worker measured, a slow decode
            self.kube.post_event(body, event_type, reason, message)

    def _write_placement(
        self, name: str, wanted: dict[str, Any], have: dict[str, Any] | None, report: RoundReport
    ) -> None:
        try:
            self._write_placement_once(name, wanted, have, report)
        except ApiException as exc:
            if exc.status not in REJECTED_STATUSES:
                raise  # the API server is unwell or unreachable: the whole round retries
            # This one object is refused (invalid, forbidden): every other model is still planned, and
            # this model's status says why (see model loop in round()).
            message = rejection_message(exc)
            report.rejected[name] = message
            log.error("the API server refused ModelPlacement %s: %s", name, message)

    def _write_placement_once(
        self, name: str, wanted: dict[str, Any], have: dict[str, Any] | None, report: RoundReport
    ) -> None:
        if have is None:
            wanted["metadata"]["finalizers"] = [UNLOAD_FINALIZER]
            created = self.kube.create_placement(wanted)
            if self.cache is not None:
                self.cache.placements.written(created)
            report.created.append(name)
        elif have["metadata"].get("deletionTimestamp"):
            return  # being unloaded; recreated next round
        elif placement_needs_update(have, wanted):
            patched = self.kube.patch_placement(
                name, {"metadata": {"labels": wanted["metadata"]["labels"]}, "spec": wanted["spec"]}
            )
            if self.cache is not None:
                self.cache.placements.written(patched)
            changed = sorted(k for k in wanted["spec"] if have["spec"].get(k) != wanted["spec"][k])
            report.updated.append(f"{name} ({', '.join(changed) or 'labels'})")

    def _request_capacity(self, result: Plan, inputs: Inputs) -> dict[str, tuple[dict[str, Any], int]]:
        """Placeholder Pods for models that lack capacity; removes those no longer needed."""
        waiting: dict[str, tuple[dict[str, Any], int]] = {}
        if not self.capacity.enabled:
            return waiting  # no placeholder pods, and no permission to list them
        for unschedulable in result.unschedulable:
            key = unschedulable.model
            if not needs_capacity(unschedulable.reason) or key not in inputs.infos:
                continue
            body = inputs.bodies[key]
            spec = body["spec"]
            info = inputs.infos[key]
            gpu_bytes = full_residency_gpu_bytes(
                info, int(spec.get("maxSequenceLength", 4096)), int(spec.get("maxBatchSize", 8))
            )
            waiting[key] = (capacity_pod(body, gpu_bytes, info.weight_bytes, self.capacity), gpu_bytes)
        existing = {
            f"{p['metadata']['namespace']}/{p['metadata']['name']}": p
            for p in self.kube.list_pods(f"{CAPACITY_LABEL}=true")
        }
        wanted = {
            f"{ns}/{pod['metadata']['name']}": pod
            for ns, pod in ((k.split("/", 1)[0], v[0]) for k, v in waiting.items())
        }
        if wanted and not self._priority_class_ready:
            self._priority_class_ready = self.kube.ensure_priority_class(
                self.capacity.priority_class, -10, "residency capacity requests: never preempt real work"
            )
        for name, pod in sorted(wanted.items()):
            if name not in existing:
                self.kube.create_pod(pod)
                log.info(
                    "requested capacity for %s with pod %s", pod["metadata"]["labels"][MODEL_LABEL], name
                )
        for name in sorted(set(existing) - set(wanted)):
            namespace, pod_name_ = name.split("/", 1)
            self.kube.delete_pod(namespace, pod_name_)
            log.info("capacity request %s no longer needed", name)
        return waiting


def model_keys(bodies: list[dict[str, Any]]) -> list[str]:
    return sorted(model_key(b) for b in bodies)
