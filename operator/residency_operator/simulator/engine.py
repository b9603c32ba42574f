"""A time-stepped simulation of a GPU cluster serving many models, driven by a request trace.

Requests are served at the decode and prefill times of ``engine`` (simulator/measured.py: fitted to a
measured report), or, without one, of the planner's own predictor, so a policy's simulated outcome then
follows from the same physics the planner believes in. Memory footprint and transition costs are the
planner's model. What the
planner does *not* see is simulated here: models on one GPU share its time (processor sharing), a model
is unavailable while it loads or moves, queued requests time out, evicted requests restart, and the
router in front refuses (429) what a model would serve past its TTFT target (``runtime.RouterGate``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

from residency_operator.planner.options import (
    cached_host_bytes,
    gpu_bytes_needed,
    host_bytes_needed,
    transition,
)
from residency_operator.planner.predictor import Predictor, typical_sequence_tokens
from residency_operator.planner.types import (
    CurrentPlacement,
    ExecutionMode,
    NodeCapacity,
    ObservedPoint,
)
from residency_operator.simulator.cluster import SimModel
from residency_operator.simulator.devices import Topology, Unit
from residency_operator.simulator.measured import EngineModel
from residency_operator.simulator.runtime import (
    ActiveRequest,
    Counters,
    ModelRuntime,
    RequestOutcome,
    RouterGate,
)
from residency_operator.simulator.trace import Request

DEMAND_WINDOW_SECONDS = 60.0
IDLE_AFTER_SECONDS = 10.0
"""A running model with no request queued or running for this long counts as idle (the operator's reading
of a placement's lastActiveTime, state.IDLE_AFTER_SECONDS)."""
PREEMPTED_WAIT_SECONDS = 10.0
"""How long a request in flight on a preempted model stays parked before the worker answers it 503 with
Retry-After and the router takes it back to retry (the worker's ``--preempted-wait-seconds`` default)."""
PACE_HEADROOM = 1.25


def fair_shares(wanted_seconds: Sequence[float], capacity_seconds: float) -> list[float]:
    """Max-min fair split of ``capacity_seconds`` among claims: nobody gets more than it wants, and what
    one leaves is shared equally by those that want more (water-filling)."""
    shares = [0.0] * len(wanted_seconds)
    left = capacity_seconds
    order = sorted(range(len(wanted_seconds)), key=lambda i: wanted_seconds[i])
    for position, index in enumerate(order):
        equal = left / (len(order) - position)
        shares[index] = min(max(0.0, wanted_seconds[index]), equal)
        left -= shares[index]
    return shares


class SimulationError(RuntimeError):
    """A policy asked for something the hardware cannot do (e.g. over-committed memory)."""


class Policy(Protocol):
    """Decides placements; called once per tick before requests are served. A policy whose server paces
    decoding to the SLO (the residency worker, see ``residency_worker.engine.pacing``) sets a class attribute
    ``paces_decode = True``; the simulator then serves its models paced (:meth:`Simulation._shares`)."""

    name: str

    def step(self, sim: Simulation, now_seconds: float) -> None: ...


class Simulation:
    """The simulated cluster: state, the operations policies may call, and the serving loop."""

    def __init__(
        self,
        nodes: Sequence[NodeCapacity],
        models: Sequence[SimModel],
        requests: Sequence[Request],
        duration_seconds: float,
        tick_seconds: float = 0.5,
        ttft_slo_seconds: float = 10.0,
        queue_timeout_seconds: float = 30.0,
        idle_after_seconds: float = IDLE_AFTER_SECONDS,
        preempted_wait_seconds: float = PREEMPTED_WAIT_SECONDS,
        engine: EngineModel | None = None,
        router_admission: bool = True,
    ) -> None:
        self.topology = Topology(nodes)
        self.machines = self.topology.machines
        """The nodes as the planner sees them (a multi-GPU node with its GPUs)."""
        self.nodes = self.topology.devices
        """One per GPU: a single-GPU node as it is, each GPU of a multi-GPU node as ``node/i`` (what the
        baselines, which run each model on one GPU, place on)."""
        self.node_by_name = {n.name: n for n in self.nodes}
        self.models: dict[str, ModelRuntime] = {
            m.name: ModelRuntime(spec=m, demand=m.demand()) for m in models
        }
        unknown = sorted({r.model for r in requests} - set(self.models))
        if unknown:
            raise SimulationError(
                f"trace names models the scenario does not define: {', '.join(unknown[:5])}"
            )
        self.requests = sorted(requests, key=lambda r: (r.arrival_seconds, r.model))
        self.duration_seconds = duration_seconds
        self.tick_seconds = tick_seconds
        self.ttft_slo_seconds = ttft_slo_seconds
        self.queue_timeout_seconds = queue_timeout_seconds
        self.idle_after_seconds = idle_after_seconds
        self.preempted_wait_seconds = preempted_wait_seconds
        self.paced_decode = False
        self.predictor = Predictor()
        self.engine: EngineModel = engine if engine is not None else self.predictor
        """What serves the requests (decode steps, prefills): not necessarily what the planner believes."""
        self.counters = Counters()
        self.gate = RouterGate(models, ttft_slo_seconds, enabled=router_admission)
        """The router in front of the cluster: its admission rule, the same for every policy."""
        self.outcomes: list[RequestOutcome] = []
        self.now_seconds = 0.0
        self._memory_samples: list[float] = []
        self._usage: tuple[dict[str, int], dict[str, int]] | None = None

    # -- what policies see ----------------------------------------------------------------------------

    def current_placements(self) -> list[CurrentPlacement]:
        """Running and cached models, as the planner's input."""
        placements = []
        for name in sorted(self.models):
            runtime = self.models[name]
            kv_bytes = sum(
                int(a.request.prompt_tokens + a.tokens_done) * runtime.demand.kv_bytes_per_token
                for a in runtime.active
            )
            if runtime.node is not None:
                # idle as the operator sees it: no request in flight or queued, and none for a while
                idle = (
                    not runtime.queue
                    and not runtime.active
                    and self.now_seconds - max(runtime.last_used_seconds, runtime.last_active_seconds)
                    >= self.idle_after_seconds
                )
                unit = self.topology.unit(runtime.node)
                placements.append(
                    CurrentPlacement(
                        name,
                        unit.machine,
                        runtime.resident_fraction,
                        runtime.mode,
                        "idle" if idle else "loaded",
                        kv_bytes,
                        unit.gpus,
                    )
                )
            elif runtime.cached_node is not None:
                unit = self.topology.unit(runtime.cached_node)
                placements.append(
                    CurrentPlacement(name, unit.machine, 0.0, "stream", "preempted", kv_bytes, unit.gpus)
                )
        return placements

    def _unit_placement(self, name: str, target: Unit) -> CurrentPlacement | None:
        """What a model runs on now, in unit names (a host copy on the target's node resumes there)."""
        runtime = self.models[name]
        kv_bytes = sum(
            int(a.request.prompt_tokens + a.tokens_done) * runtime.demand.kv_bytes_per_token
            for a in runtime.active
        )
        if runtime.node is not None:
            return CurrentPlacement(
                name, runtime.node, runtime.resident_fraction, runtime.mode, "loaded", kv_bytes
            )
        if runtime.cached_node is not None:
            cached = self.topology.unit(runtime.cached_node)
            where = target.name if cached.machine == target.machine else cached.name
            return CurrentPlacement(name, where, 0.0, "stream", "preempted", kv_bytes)
        return None

    def observed_demand_tokens_per_second(self, name: str) -> float:
        """Requested output tokens/s over the last minute, plus what waits in the queue."""
        runtime = self.models[name]
        # Never average over less than half the window: a few early requests are not a rate.
        window = min(DEMAND_WINDOW_SECONDS, max(DEMAND_WINDOW_SECONDS / 2, self.now_seconds))
        requested = sum(tokens for _, tokens, _ in runtime.recent_arrivals)
        return requested / window

    def observed_step(self, name: str) -> ObservedPoint | None:
        """The model's last decode step as its worker reports it (``status.observedStep``), on the GPU type
        of the node it ran on; None before it decoded."""
        runtime = self.models[name]
        if runtime.last_decode is None:
            return None
        node_name, fraction, mode, batch, step_seconds = runtime.last_decode
        try:  # a GPU device, or the GPU set of a split
            node = self.topology.unit(node_name).node
        except KeyError:
            return None
        sequence = typical_sequence_tokens(runtime.demand)
        return ObservedPoint(node.gpu_type, fraction, mode, batch, sequence, step_seconds)

    def observed_prompts(self, name: str) -> tuple[float | None, int | None]:
        """Prompt tokens/s requested over the last minute and the mean prompt length (``None`` before any
        request arrived): the prefill work a planner can see coming."""
        runtime = self.models[name]
        if not runtime.recent_arrivals:
            return None, None
        window = min(DEMAND_WINDOW_SECONDS, max(DEMAND_WINDOW_SECONDS / 2, self.now_seconds))
        prompts = [prompt for _, _, prompt in runtime.recent_arrivals]
        return sum(prompts) / window, max(1, round(sum(prompts) / len(prompts)))

    def _usage_tables(self) -> tuple[dict[str, int], dict[str, int]]:
        """GPU bytes used per device and host bytes used per node, by running and cached models."""
        if self._usage is None:
            gpu = {n.name: 0 for n in self.nodes}
            host = {m.name: 0 for m in self.machines}
            for runtime in self.models.values():
                if runtime.node is not None:
                    unit = self.topology.unit(runtime.node)
                    needed = gpu_bytes_needed(runtime.demand, runtime.resident_fraction, runtime.mode)
                    for device, used in self.topology.footprint(unit, needed):
                        gpu[device] += used
                    host[unit.machine] += host_bytes_needed(runtime.demand, runtime.resident_fraction)
                elif runtime.cached_node is not None:
                    host[self.topology.unit(runtime.cached_node).machine] += cached_host_bytes(
                        runtime.demand, 0
                    )
            self._usage = (gpu, host)
        return self._usage

    def used_bytes(self, node_name: str) -> tuple[int, int]:
        """(GPU, host) bytes used on a device or GPU set (host: its whole node's) by running and cached
        models."""
        gpu, host = self._usage_tables()
        unit = self.topology.unit(node_name)
        return sum(gpu[d] for d in unit.devices), host[unit.machine]

    def free_bytes(self, node_name: str) -> tuple[int, int]:
        """(GPU, host) bytes still free on a device or GPU set (host: on its whole node)."""
        unit = self.topology.unit(node_name)
        gpu, host = self.used_bytes(node_name)
        return sum(unit.usable) - gpu, self.topology.usable_host(unit.machine) - host

    # -- what policies do -----------------------------------------------------------------------------

    def place(self, name: str, node_name: str, resident_fraction: float, mode: ExecutionMode) -> None:
        """Run a model on a node at a residency (load, resume, promote, demote, migrate as needed)."""
        runtime = self.models[name]
        unit = self.topology.unit(node_name)
        node = unit.node
        current = self._unit_placement(name, unit)
        nodes = {node.name: node}
        if current is not None and current.node != node.name:
            nodes[current.node] = self.topology.unit(current.node).node
        kind, cost = transition(runtime.demand, current, nodes, node, resident_fraction, mode)
        if kind is None:
            return
        if kind == "load" and runtime.active:
            # A cold load elsewhere: the saved KV cache is not there, so in-flight requests restart.
            self._restart_active(runtime)
        if kind == "load":
            self.counters.loads += 1
        elif kind == "resume":
            self.counters.resumes += 1
        elif kind == "migrate":
            self.counters.migrations += 1
        elif kind == "demote":
            self.counters.demotions += 1
        elif kind == "promote":
            self.counters.promotions += 1
        if kind in ("load", "resume", "migrate"):
            self.counters.reload_seconds += cost.seconds
        self._usage = None
        runtime.node = unit.name
        runtime.cached_node = None
        runtime.parked_since_seconds = None  # a resume continues the parked requests
        runtime.resident_fraction = resident_fraction
        runtime.mode = mode
        runtime.busy_until_seconds = max(self.now_seconds, runtime.busy_until_seconds) + cost.seconds
        runtime.last_active_seconds = runtime.busy_until_seconds

    def stage_in_host(self, name: str, node_name: str) -> None:
        """Before serving starts, put a model's weights in a node's pinned host memory (asleep there):
        its first request resumes it at link speed. Raises where the host memory does not hold them."""
        runtime = self.models[name]
        if runtime.node is not None or runtime.cached_node is not None:
            raise SimulationError(f"{name} is already placed or staged")
        if self.free_bytes(node_name)[1] < cached_host_bytes(runtime.demand, 0):
            raise SimulationError(f"{name} does not fit the host memory of {node_name}")
        self._usage = None
        runtime.cached_node = node_name

    def preempt(self, name: str, keep_cache: bool = True) -> None:
        """Stop a model; with ``keep_cache`` its weights and KV stay in host memory for a fast resume."""
        runtime = self.models[name]
        self._usage = None
        if runtime.node is None:
            if not keep_cache:
                runtime.cached_node = None
                self._restart_active(runtime)
            return
        self.counters.preemptions += 1
        if keep_cache:
            runtime.cached_node = runtime.node
            runtime.parked_since_seconds = self.now_seconds if runtime.active else None
        else:
            self.counters.evictions += 1
            runtime.cached_node = None
            self._restart_active(runtime)
        runtime.node = None
        runtime.resident_fraction = 0.0

    def evict(self, name: str) -> None:
        """Unload a model completely; in-flight requests restart when it comes back."""
        self.preempt(name, keep_cache=False)

    def _restart_active(self, runtime: ModelRuntime) -> None:
        for active in reversed(runtime.active):
            runtime.queue.appendleft(active.request)
            self.counters.restarted_requests += 1
        runtime.active.clear()
        runtime.parked_since_seconds = None

    def check_capacity(self) -> None:
        """Raise if any GPU or node is over-committed (a policy bug)."""
        for node in self.nodes:
            free_gpu, free_host = self.free_bytes(node.name)
            if free_gpu < 0 or free_host < 0:
                raise SimulationError(
                    f"{node.name} over-committed at t={self.now_seconds:.1f}s: "
                    f"free GPU {free_gpu} bytes, host {free_host} bytes"
                )

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, policy: Policy) -> list[RequestOutcome]:
        """Replay the trace under ``policy``; returns the outcome of every request."""
        self.paced_decode = bool(getattr(policy, "paces_decode", False))
        next_request = 0
        tick = self.tick_seconds
        steps = round(self.duration_seconds / tick)
        for step in range(steps):
            now = step * tick
            self.now_seconds = now
            while next_request < len(self.requests) and self.requests[next_request].arrival_seconds <= now:
                request = self.requests[next_request]
                runtime = self.models[request.model]
                runtime.queue.append(request)
                runtime.recent_arrivals.append(
                    (request.arrival_seconds, request.output_tokens, request.prompt_tokens)
                )
                runtime.last_used_seconds = request.arrival_seconds
                next_request += 1
            for runtime in self.models.values():
                while runtime.recent_arrivals and runtime.recent_arrivals[0][0] < now - DEMAND_WINDOW_SECONDS:
                    runtime.recent_arrivals.popleft()
            policy.step(self, now)
            self.check_capacity()
            self._expire_queues(now)
            self._route(now)
            self._serve(now)
            self._sample_memory()
        # Whatever has not finished by the end did not complete.
        for runtime in self.models.values():
            for active in runtime.active:
                self._record(active.request, None, None, dropped=False)
            for request in runtime.queue:
                self._record(request, None, None, dropped=False)
        return self.outcomes

    def _expire_queues(self, now: float) -> None:
        for runtime in self.models.values():
            parked = runtime.parked_since_seconds
            if runtime.node is None and parked is not None and now - parked >= self.preempted_wait_seconds:
                # The worker answered them 503 with Retry-After; the router holds them again and retries
                # (they keep their arrival time, so the queue timeout still counts from it).
                self._restart_active(runtime)
            kept: deque[Request] = deque()
            for request in runtime.queue:
                if now - request.arrival_seconds > self.queue_timeout_seconds:
                    if id(request) in runtime.admitted:
                        runtime.admitted.discard(id(request))
                        self.gate.release(request.model)
                    self._record(request, None, None, dropped=True)
                else:
                    kept.append(request)
            runtime.queue = kept

    def _route(self, now: float) -> None:
        """The router's gate: requests held for a model that is now ready (running, not loading) are
        admitted while it has room, the others refused (429: not served). A model that is not ready keeps
        them held, until the queue timeout."""
        for runtime in self.models.values():
            if runtime.node is None or runtime.busy_until_seconds > now or not runtime.queue:
                continue
            if len(runtime.admitted) == len(runtime.queue) + len(runtime.active):
                continue
            kept: deque[Request] = deque()
            for request in runtime.queue:
                if id(request) in runtime.admitted or self.gate.try_admit(request.model, now):
                    runtime.admitted.add(id(request))
                    kept.append(request)
                else:
                    self._record(request, None, None, dropped=True, refused=True)
            runtime.queue = kept

    def _serve(self, now: float) -> None:
        serving: list[ModelRuntime] = []
        for name in sorted(self.models):
            runtime = self.models[name]
            if runtime.node is None or runtime.busy_until_seconds > now:
                continue
            if runtime.queue or runtime.active:
                runtime.last_active_seconds = now
                serving.append(runtime)
        for runtimes, nodes in self._sharing(serving):
            for runtime, node in zip(runtimes, nodes, strict=True):
                self._admit(runtime, node)
            # Processor sharing, work-conserving: the GPU's time this tick is split max-min fairly, so a
            # model that needs less than an equal slice leaves the rest to the models that need more
            # (time-sliced processes on one GPU: an idle one takes no time).
            wanted = [
                self._work_seconds(runtime, node) for runtime, node in zip(runtimes, nodes, strict=True)
            ]
            budgets = self._shares(runtimes, nodes, wanted)
            share = len(runtimes)
            for runtime, node, budget in zip(runtimes, nodes, budgets, strict=True):
                if budget <= 0:
                    continue
                # GPU seconds of this model map to wall seconds stretched by how many share the GPU, or
                # less when it was given more than an equal slice
                stretch = min(float(share), self.tick_seconds / budget)
                self._serve_model(runtime, node, now, budget, stretch)

    def _sharing(self, serving: list[ModelRuntime]) -> list[tuple[list[ModelRuntime], list[NodeCapacity]]]:
        """The runtimes that take turns on one GPU (or overlapping GPU sets), each with the node it is served
        at: on a multi-GPU node, with its share of a host link the models streaming now share."""
        if not self.topology.multi_gpu:
            by_node: dict[str, list[ModelRuntime]] = {}
            for runtime in serving:
                by_node.setdefault(str(runtime.node), []).append(runtime)
            return [
                (runtimes, [self.node_by_name[name]] * len(runtimes)) for name, runtimes in by_node.items()
            ]
        groups = self.topology.serving_groups([(str(r.node), r.resident_fraction) for r in serving])
        return [([serving[i] for i in group], nodes) for group, nodes in groups]

    def _decode_step(self, runtime: ModelRuntime, node: NodeCapacity, batch: int) -> float:
        """Seconds of one decode step of the model's batch, its activations' hops between GPUs included."""
        step = self.engine.decode_step_seconds(
            runtime.demand, node, runtime.resident_fraction, runtime.mode, batch=batch
        )
        if self.topology.multi_gpu and runtime.node is not None:
            step += self.topology.hop_seconds(self.topology.unit(runtime.node), runtime.demand, batch)
        return step

    def _shares(
        self, runtimes: list[ModelRuntime], nodes: list[NodeCapacity], wanted: list[float]
    ) -> list[float]:
        """Each model's GPU seconds this tick. Unpaced: max-min fair. Paced (the residency worker): while a
        model on the GPU has requests waiting for a batch slot, the others run only at their SLO pace
        (times PACE_HEADROOM) and the time they leave goes to the waiting ones."""
        hungry = [i for i, runtime in enumerate(runtimes) if runtime.queue]
        if not self.paced_decode or not hungry or len(hungry) == len(runtimes):
            return fair_shares(wanted, self.tick_seconds)
        paced = [
            min(w, self._paced_seconds(r, node)) for r, node, w in zip(runtimes, nodes, wanted, strict=True)
        ]
        for i in hungry:
            paced[i] = min(wanted[i], paced[i])
        base = fair_shares(paced, self.tick_seconds)
        extra = fair_shares([wanted[i] - base[i] for i in hungry], self.tick_seconds - sum(base))
        for i, more in zip(hungry, extra, strict=True):
            base[i] += more
        return base

    def _paced_seconds(self, runtime: ModelRuntime, node: NodeCapacity) -> float:
        """GPU seconds that keep the model's batch at its SLO pace this tick, prefills first."""
        if not runtime.active:
            return 0.0
        prefill = sum(a.prefill_remaining_seconds for a in runtime.active if a.first_token_seconds is None)
        needed = max(a.request.output_tokens - a.tokens_done for a in runtime.active)
        steps = min(
            max(0.0, needed), runtime.spec.min_decode_tokens_per_second * PACE_HEADROOM * self.tick_seconds
        )
        step_seconds = self._decode_step(runtime, node, len(runtime.active))
        return prefill + steps * step_seconds

    def _admit(self, runtime: ModelRuntime, node: NodeCapacity) -> None:
        """Queued requests join the model's batch while it has room; each starts with its prefill."""
        demand = runtime.demand
        while runtime.queue and len(runtime.active) < demand.max_batch:
            request = runtime.queue.popleft()
            prefill = self.engine.prefill_seconds(
                demand, node, runtime.resident_fraction, runtime.mode, request.prompt_tokens
            )
            runtime.active.append(ActiveRequest(request, prefill))

    def _work_seconds(self, runtime: ModelRuntime, node: NodeCapacity) -> float:
        """GPU seconds the model could use this tick: its prefills, then decoding until the longest
        request is done (at the whole batch's step time, an upper bound as requests finish); all of the
        tick while requests wait, since each joins the batch as soon as a slot frees."""
        if runtime.queue:
            return float("inf")
        prefill = sum(a.prefill_remaining_seconds for a in runtime.active if a.first_token_seconds is None)
        needed = max((a.request.output_tokens - a.tokens_done for a in runtime.active), default=0.0)
        if not runtime.active:
            return 0.0
        step_seconds = self._decode_step(runtime, node, len(runtime.active))
        return prefill + max(0.0, needed) * step_seconds

    def _serve_model(
        self, runtime: ModelRuntime, node: NodeCapacity, now: float, budget: float, stretch: float
    ) -> None:
        """Continuous batching, as the worker's batch loop does it: a waiting request joins the batch as
        soon as a slot frees (its prefill runs before the batch's next step), not at the next tick; the
        batch decodes at the step time of its current size."""
        used = 0.0
        while used < budget - 1e-12:
            self._admit(runtime, node)
            if not runtime.active:
                return
            prefilling = [a for a in runtime.active if a.first_token_seconds is None]
            if prefilling:
                for active in prefilling:
                    take = min(active.prefill_remaining_seconds, budget - used)
                    used += take
                    active.prefill_remaining_seconds -= take
                    if active.prefill_remaining_seconds > 1e-12:
                        return  # the tick's GPU time is spent
                    active.first_token_seconds = now + used * stretch
                    active.tokens_done = 1.0
                    ttft = active.first_token_seconds - active.request.arrival_seconds
                    self.gate.first_token(runtime.spec.name, ttft, active.first_token_seconds)
                continue
            step_seconds = self._decode_step(runtime, node, len(runtime.active))
            runtime.last_decode = (
                node.name,
                runtime.resident_fraction,
                runtime.mode,
                len(runtime.active),
                step_seconds,
            )
            # Decode until the first request of the batch is done, or the tick's time is spent.
            to_first_done = min(a.request.output_tokens - a.tokens_done for a in runtime.active)
            steps = max(0.0, min(to_first_done, (budget - used) / step_seconds))
            used += steps * step_seconds
            finished: list[ActiveRequest] = []
            for active in runtime.active:
                active.tokens_done += steps
                if active.request.output_tokens - active.tokens_done <= 1e-9:
                    self._finish(active, now + used * stretch)
                    finished.append(active)
            if not finished:
                return
            runtime.active = [a for a in runtime.active if a not in finished]

    def _finish(self, active: ActiveRequest, done_at: float) -> None:
        assert active.first_token_seconds is not None
        request = active.request
        ttft = active.first_token_seconds - request.arrival_seconds
        tpot = (done_at - active.first_token_seconds) / max(1, request.output_tokens - 1)
        runtime = self.models[request.model]
        if id(request) in runtime.admitted:
            runtime.admitted.discard(id(request))
            self.gate.finish(request.model, done_at - request.arrival_seconds, done_at)
        self._record(request, ttft, tpot, dropped=False)

    def _record(
        self, request: Request, ttft: float | None, tpot: float | None, dropped: bool, refused: bool = False
    ) -> None:
        spec = self.models[request.model].spec
        completed = ttft is not None and tpot is not None
        met = (
            completed
            and ttft is not None
            and tpot is not None
            and ttft <= self.ttft_slo_seconds
            and tpot <= 1.0 / spec.min_decode_tokens_per_second + 1e-9
        )
        self.outcomes.append(
            RequestOutcome(
                model=request.model,
                arrival_seconds=request.arrival_seconds,
                output_tokens=request.output_tokens,
                completed=completed,
                ttft_seconds=ttft,
                tpot_seconds=tpot,
                met_slo=bool(met),
                dropped=dropped,
                refused=refused,
            )
        )

    def _sample_memory(self) -> None:
        total = sum(self.topology.usable_gpu(n.name) for n in self.nodes)
        used = sum(self._usage_tables()[0].values())
        self._memory_samples.append(used / total if total else 0.0)

    @property
    def gpu_memory_utilisation(self) -> float:
        """Time-averaged share of usable GPU memory holding model state."""
        return sum(self._memory_samples) / len(self._memory_samples) if self._memory_samples else 0.0
