"""One loaded model: the thread that owns it, its admin operations, and what it serves.

A single thread per model owns all of the model's state. Requests wait in a bounded queue; the
``scheduler`` decides what each step runs (decode, chunked prefill, batching), the ``executor`` runs it
over the weights the ``residency`` placed and the model's KV pool, and sampling happens on the device.
Admin operations — preempt, resume, change of residency or mode — are queued as commands and run
between two steps, so they never race a forward pass and never drop a request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from residency.split import GpuShares, scaled_shares
from residency_worker.engine import model as decoder
from residency_worker.engine.demand import observed_demand
from residency_worker.engine.executor import Executor
from residency_worker.engine.generate import Detokenizer, Request, RequestEvent, check_request
from residency_worker.engine.kvpool import KVPool
from residency_worker.engine.loading import LoadedWeights
from residency_worker.engine.modes import choose_modes
from residency_worker.engine.observed import StepWindow
from residency_worker.engine.pacing import hold_all, pace_interval_seconds
from residency_worker.engine.placement import BudgetNeed, ResidencyPlan, plan_residency
from residency_worker.engine.residency import PlacedWeights
from residency_worker.engine.sampler import make_generator, sample
from residency_worker.engine.scheduler import Scheduler, Sequence, Step
from residency_worker.engine.tiers import GpuTier
from residency_worker.engine.transfer import timed_copy_groups
from residency_worker.engine.types import (
    EngineError,
    ExecutionMode,
    ModelState,
    ModelTimings,
    ObservedDemand,
    PreemptReport,
    ResidencyReport,
    ResumeReport,
    TransferTiming,
)

log = logging.getLogger(__name__)

DEMAND_WINDOW_SECONDS = 60.0
"""Traffic is averaged over this window (the simulator's ``engine.DEMAND_WINDOW_SECONDS``)."""
T = TypeVar("T")
_runner_ids = itertools.count(1)
ModeChoice = Literal["stream", "cpu", "auto"]
PREFILL_CHUNK_TOKENS_GPU = 512
PREFILL_CHUNK_TOKENS_CPU = 128
"""Prompt tokens one step prefills beside the decoding sequences (a longer prompt takes several steps):
a CPU computes a token's prefill far slower, so its chunks are smaller to keep inter-token latency."""


@dataclass(frozen=True)
class ModelOptions:
    """How to serve one model on this node."""

    dtype: str = "bfloat16"
    resident_fraction: float = 1.0
    decode_mode: ModeChoice = "auto"
    prefill_mode: ModeChoice | None = None  # None: follow the decode mode's choice
    max_batch_size: int = 8
    max_sequence_length: int = 2048
    max_queue: int = 64
    reload_streams: int = 2
    min_resident_fraction: float = 0.0  # 1 - offload.maxFraction: never keep less than this resident
    min_decode_tokens_per_second: float | None = None  # the SLO: paced to it while a neighbour is hungry
    prefill_chunk_tokens: int | None = None  # None: 512 on a GPU, 128 on the CPU
    cuda_graphs: bool = True  # decode steps replay CUDA graphs on a GPU (eager on the CPU)
    cpu_prepack: bool = True  # emulated tier: resident layers also kept in oneDNN's layout (cpu_kernels)
    gpus: GpuShares = ()  # (GPU index, share) in pipeline order; empty: GPU 0 holds resident_fraction


class ModelRunner:
    """Serves one model from its placement; all public methods are thread-safe."""

    def __init__(
        self, name: str, weights: LoadedWeights, tiers: list[GpuTier], options: ModelOptions
    ) -> None:
        self.name = name
        # unique per runner: an unloading runner of the same name gives back only its own reservation
        self.owner = f"model/{name}/{next(_runner_ids)}"
        self.weights = weights
        self.node_tiers = tiers  # every GPU of the node, by index; the plan says which ones it uses
        self.failure: EngineError | None = None  # why the model failed (its GPU was lost)
        # after a failed step: probes the node's GPUs, fails the models of a lost one; True when it did
        self.on_step_failure: Callable[[Exception], bool] | None = None
        self.options = options
        self.spec = weights.spec
        self.state: ModelState = "loading"
        self.last_request_time = time.time()  # wall clock: reported for idle scale-to-zero
        self._started_monotonic = time.monotonic()
        self._arrivals: deque[tuple[float, Request]] = deque()  # accepted requests of the demand window
        self.timings = ModelTimings(weight_bytes=weights.weight_bytes, emulated=tiers[0].emulated)
        self.observed_steps = StepWindow()  # the decode steps the planner refines its curve with
        max_positions = min(options.max_sequence_length, self.spec.max_position_embeddings)
        self.max_sequence_length = max_positions
        self.rotary = decoder.Rotary(weights.config, max_positions)
        decode_mode: ExecutionMode = "stream" if options.decode_mode == "auto" else options.decode_mode
        prefill = options.prefill_mode or options.decode_mode
        self.placed = PlacedWeights(
            weights,
            tiers,
            self.owner,
            plan_residency(weights, options.resident_fraction, options.min_resident_fraction, options.gpus),
            decode_mode,
            "stream" if prefill == "auto" else prefill,
            reload_streams=options.reload_streams,
            cpu_prepack=options.cpu_prepack,
        )
        chunk = options.prefill_chunk_tokens or (
            PREFILL_CHUNK_TOKENS_GPU if tiers[0].device.type == "cuda" else PREFILL_CHUNK_TOKENS_CPU
        )
        self.scheduler = Scheduler(options.max_batch_size, chunk)
        self.pool: KVPool | None = None
        self.executor: Executor | None = None
        self._commands: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cv = threading.Condition()  # re-entrant (an RLock underneath)
        self._stopping = False
        self._resumed = threading.Event()
        self._thread: threading.Thread | None = None
        self.pace_interval_seconds = pace_interval_seconds(options.min_decode_tokens_per_second)
        self._last_decode_start = 0.0
        self._hungry = False
        self._hungry_tiers: list[GpuTier] = []  # the pacers told it is hungry (its GPUs when it became so)
        eos = weights.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if weights.tokenizer.eos_token_id is not None:
            eos_ids.add(int(weights.tokenizer.eos_token_id))
        self._eos_ids = frozenset(eos_ids)

    @property
    def plan(self) -> ResidencyPlan:
        return self.placed.plan

    @property
    def tier(self) -> GpuTier:
        """The last GPU of the model's pipeline (the only one of a single-GPU model)."""
        return self.placed.tier

    @property
    def decode_mode(self) -> ExecutionMode:
        return self.placed.decode_mode

    @property
    def prefill_mode(self) -> ExecutionMode:
        return self.placed.prefill_mode

    # -- placement ----------------------------------------------------------------------------------
    def _need(
        self, plan: ResidencyPlan, decode_mode: ExecutionMode, prefill_mode: ExecutionMode
    ) -> dict[GpuTier, BudgetNeed]:
        return self.placed.need(
            plan,
            decode_mode,
            prefill_mode,
            max_batch_size=self.options.max_batch_size,
            max_sequence_length=self.max_sequence_length,
        )

    def _open_pool(self) -> None:
        """The KV pool, preallocated for max_batch_size slots of max_sequence_length tokens."""
        spec = self.spec
        self.pool = KVPool(
            self.node_tiers[0],
            self.owner,
            num_layers=spec.num_layers,
            slots=self.options.max_batch_size,
            kv_heads=spec.num_kv_heads,
            capacity=self.max_sequence_length,
            head_dim=spec.head_dim,
            dtype=self.weights.dtype,
            gpu_layers=self.placed.kv_homes(),
        )
        self.executor = Executor(self.placed, self.pool, self.rotary, cuda_graphs=self.options.cuda_graphs)

    def place(self) -> TransferTiming:
        """Reserves the GPU budget, uploads resident units, opens staging and the KV pool; refuses what
        does not fit."""
        self._reserve(self._need(self.plan, self.decode_mode, self.prefill_mode))
        try:
            timing = self.placed.upload(self.placed.resident_units())
            self.placed.open_stager()
            self._open_pool()
        except Exception:
            self.placed.drop_all()
            if self.pool is not None:
                self.pool.release()
            self._unreserve()
            raise
        self.timings.load_transfer = timing
        self.timings.host_to_device_gbps = timing.gbps if timing.moved_bytes else None
        self.state = "ready"
        self._resumed.set()
        return timing

    def _reserve(self, needs: dict[GpuTier, BudgetNeed], *, grow_only: bool = False) -> None:
        self.placed.reserve(needs, grow_only=grow_only)

    def _unreserve(self, keep: set[GpuTier] | None = None) -> None:
        self.placed.unreserve(keep)

    def residency(self) -> ResidencyReport:
        needs = self._need(self.plan, self.decode_mode, self.prefill_mode)
        resident_bytes = self.placed.resident_weight_bytes()
        return ResidencyReport(
            model=self.name,
            requested_fraction=self.plan.requested_fraction,
            resident_fraction=resident_bytes / self.plan.weight_bytes,
            resident_weight_bytes=resident_bytes,
            weight_bytes=self.plan.weight_bytes,
            resident_units=[u.name for u in self.weights.units if u.name in self.plan.resident],
            offloaded_units=[u.name for u in self.weights.units if u.name not in self.plan.resident],
            decode_mode=self.decode_mode,
            prefill_mode=self.prefill_mode,
            gpu_reserved_bytes=sum(tier.reserved_bytes(self.owner) for tier in self.node_tiers),
            kv_reserved_bytes=sum(n.kv_bytes for n in needs.values()) if self.state == "ready" else 0,
            emulated=self.tier.emulated,
            gpus=self.placed.gpu_residency(),
        )

    # -- steps --------------------------------------------------------------------------------------
    def _forward(self, step: Step) -> Any:
        """Runs one step and samples its rows on the device (the step's one device→host transfer)."""
        assert self.executor is not None
        logits = self.executor.forward(step.layout, step.token_ids, step.sample_rows, step.mode)
        return sample(logits, self.scheduler.sample_rows(step))

    def _run_step(self, step: Step) -> None:
        assert self.pool is not None
        if not step.prefills:
            self._last_decode_start = time.monotonic()
        start = time.perf_counter()
        result = self._forward(step)
        elapsed = max(time.perf_counter() - start, 1e-9)  # the sampled ids came back: the device is done
        if step.prefills:
            prompt_tokens = step.layout.tokens - step.layout.decode_rows
            self.timings.prefill_tokens_per_second = prompt_tokens / elapsed
        elif step.decoding:
            self.timings.decode_tokens_per_second = len(step.decoding) / elapsed
            positions = step.layout.decode_positions
            self.observed_steps.record(
                len(step.decoding),
                1 + sum(positions) / max(1, len(positions)),
                elapsed,
                self.plan.resident_fraction,
                step.mode,
            )
        self.scheduler.complete(step, result, self.pool)

    def choose_modes(self) -> dict[str, float]:
        """Resolves "auto" modes by timing a short prefill and a few decode steps in each mode (``modes``)."""
        return choose_modes(self)

    def forward_step(self, step: Step) -> Any:
        """One step's sampled tokens, outside the serving loop (the mode measurement runs it)."""
        return self._forward(step)

    def new_sequence(self, request: Request) -> Sequence:
        return self._new_sequence(request)

    # -- sequences ----------------------------------------------------------------------------------
    def _new_sequence(self, request: Request) -> Sequence:
        capacity = min(len(request.prompt_ids) + request.params.max_tokens, self.max_sequence_length)
        return Sequence(
            request=request,
            detokenizer=Detokenizer(self.weights.tokenizer, request.params.stop),
            generator=make_generator(request.params, self.tier.device),
            max_tokens=capacity - len(request.prompt_ids),
            eos_ids=frozenset() if request.params.ignore_eos else self._eos_ids,
        )

    def _admit_waiting(self) -> None:
        """Moves waiting requests into free KV slots (their prefill runs in the coming steps)."""
        scheduler = self.scheduler
        while not scheduler.batch_full():
            with self._cv:
                if not scheduler.waiting:
                    return
                request = scheduler.waiting.popleft()
            if request.cancelled:
                request.emit(RequestEvent(None, "", "cancelled"))
                continue
            try:
                sequence = self._new_sequence(request)
            except Exception as exc:  # the request is off the queue: it must still get its answer
                log.exception("model %s: cannot start a request", self.name)
                error = EngineError("InferenceFailed", f"cannot start the request on {self.name}: {exc}")
                request.emit(RequestEvent(None, "", "error", error))
                continue
            scheduler.admit(sequence)

    def _update_hungry(self) -> None:
        """Hungry: ready, requests wait and the batch is full (a preempted model's parked batch uses no GPU).
        Called with ``_cv`` held before each step; the loop also clears it before it sleeps."""
        self._set_hungry(
            self.state == "ready" and bool(self.scheduler.waiting) and self.scheduler.batch_full()
        )

    def _set_hungry(self, hungry: bool) -> None:
        if hungry != self._hungry:
            self._hungry = hungry
            if hungry:  # every GPU of its pipeline: a neighbour on any of them yields to it
                self._hungry_tiers = self.placed.tiers()
            for tier in self._hungry_tiers:
                tier.pacer.set_hungry(self.owner, hungry)

    def _pace(self) -> bool:
        """Before a decode step: while another model on the GPU has requests waiting for a batch slot, wait
        until this model's next step is due at its SLO pace (see ``pacing``). False when the wait ended for
        something to do first (an admin command, or a waiting request: see ``_other_work``) or because the SLO
        changed; the caller then runs the loop again and this step comes after."""
        interval = self.pace_interval_seconds
        if interval is None or self._hungry:
            return True

        def interrupted() -> bool:  # something to do first, or the SLO changed under the wait
            return self._other_work() or self.pace_interval_seconds != interval

        due = self._last_decode_start + interval
        pacers = [tier.pacer for tier in self.placed.tiers()]
        self.timings.paced_seconds += hold_all(pacers, self.owner, due, interrupted=interrupted)
        return not interrupted()

    def _other_work(self) -> bool:
        """An admin command waits, or a request does: one that can join the batch goes first, and one that
        cannot makes this model hungry, which it must say at once (and then is never held). Reads without the
        lock: a stale answer only ends or prolongs one wait."""
        return bool(self._commands) or self._stopping or bool(self.scheduler.waiting)

    def set_decode_slo(self, min_decode_tokens_per_second: float | None) -> None:
        """Changes the SLO the model is paced to (a wait in progress ends, and the next one uses it)."""
        self.pace_interval_seconds = pace_interval_seconds(min_decode_tokens_per_second)

    def _step(self) -> None:
        self.scheduler.drop_cancelled(self.pool)
        self._admit_waiting()
        with self._cv:
            self._update_hungry()
        step = self.scheduler.next_step(self.decode_mode, self.prefill_mode)
        if step is None:
            return
        # a prefill is never held (a new request joins its batch at once); a decode step may be paced,
        # and then the command or new request goes first, and this step comes after
        if step.prefills or self._pace():
            self._run_step(step)

    # -- the loop and its commands ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (
                    self._commands or self._stopping or (self.state == "ready" and self.scheduler.has_work())
                ):
                    self._set_hungry(False)  # nothing to do (a batch that ended or failed after its waiting
                    self._cv.wait()  # requests were cancelled must not leave its neighbours paced)
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            for command, future in commands:
                try:
                    future.set_result(command())
                except BaseException as exc:  # delivered to the caller that queued the command
                    future.set_exception(exc)
            if stopping:
                self._shutdown()
                return
            if self.state != "ready":
                continue
            try:
                self._step()
            except Exception as exc:
                log.exception("model %s: inference step failed", self.name)
                if (
                    self.on_step_failure is not None
                    and self.on_step_failure(exc)
                    and self.failure is not None
                ):
                    continue  # a GPU of it is gone (a CUDA error, a driver reset): it failed with that reason
                self._fail_active(EngineError("InferenceFailed", f"inference on {self.name} failed: {exc}"))

    def _fail_active(self, error: EngineError) -> None:
        self.scheduler.fail_all(error)

    def call(self, command: Callable[[], T]) -> T:
        """Runs `command` on the model's thread between two steps and returns its result."""
        if self._thread is None or threading.current_thread() is self._thread:
            return command()
        future: Future[T] = Future()
        with self._cv:
            if self._stopping:
                raise EngineError("ModelNotLoaded", f"model {self.name} is unloading")
            self._commands.append((command, future))
            self._cv.notify_all()
        return future.result()

    def submit(self, request: Request) -> Request:
        check_request(request, self.name, self.max_sequence_length, self.spec.vocab_size)
        with self._cv:
            if self.failure is not None:
                raise EngineError(self.failure.reason, self.failure.message)
            if self._stopping or self.state in ("unloaded", "failed"):
                raise EngineError("ModelNotLoaded", f"model {self.name} is not loaded")
            if len(self.scheduler.waiting) >= self.options.max_queue:
                raise EngineError(
                    "QueueFull",
                    f"model {self.name} has {len(self.scheduler.waiting)} requests waiting",
                    retry_after_seconds=1.0,
                )
            self.scheduler.waiting.append(request)
            self.last_request_time = time.time()
            now = time.monotonic()
            self._arrivals.append((now, request))
            # pruned here too, so a runner nobody asks for its demand keeps only the window's requests
            while self._arrivals and self._arrivals[0][0] < now - DEMAND_WINDOW_SECONDS:
                self._arrivals.popleft()
            self._cv.notify_all()
        return request

    def demand(self, window_seconds: float = DEMAND_WINDOW_SECONDS) -> ObservedDemand:
        """Output and prompt tokens/s asked of the model over the last window, as the simulator's
        ``observed_demand_tokens_per_second`` counts them: every request accepted, finished ones by the
        tokens they produced, unfinished ones by what they will likely produce (the mean of the window's
        finished ones; before any finished, their ``max_tokens`` as far as the sequence length allows).
        A request that ended without a token (cancelled, failed: e.g. sent while the model was preempted)
        served nothing and its retry counts on its own: it is left out. Requests refused because the queue
        was full are not counted (their retries would be counted again); the queue depth reports them.
        ``window_seconds`` is at most :data:`DEMAND_WINDOW_SECONDS` (older requests are not kept)."""
        window_seconds = min(window_seconds, DEMAND_WINDOW_SECONDS)
        now = time.monotonic()
        with self._cv:
            while self._arrivals and self._arrivals[0][0] < now - DEMAND_WINDOW_SECONDS:
                self._arrivals.popleft()
            requests = [request for at, request in self._arrivals if at >= now - window_seconds]
        return observed_demand(
            requests, now - self._started_monotonic, window_seconds, self.max_sequence_length
        )

    def cancel(self, request: Request) -> None:
        """Drops a request: at once if it is still queued, otherwise at the next step."""
        request.cancel()
        with self._cv:
            try:
                self.scheduler.waiting.remove(request)
            except ValueError:
                return  # already running (dropped at the next step) or finished
        request.emit(RequestEvent(None, "", "cancelled"))

    @property
    def queue_depth(self) -> int:
        with self._cv:
            return len(self.scheduler.waiting)

    @property
    def active_sequences(self) -> int:
        return len(self.scheduler.running)

    def wait_until_ready(self, timeout_seconds: float) -> bool:
        return self._resumed.wait(timeout_seconds)

    # -- admin operations (run on the model's thread) ------------------------------------------------
    def preempt(self) -> PreemptReport:
        return self.call(self._preempt)

    def _preempt(self) -> PreemptReport:
        if self.state != "ready":
            raise EngineError("InvalidState", f"model {self.name} is {self.state}, not ready")
        assert self.pool is not None and self.executor is not None
        start = time.perf_counter()
        pairs = self.pool.save_pairs(self.scheduler.used_tokens())
        kv_save = timed_copy_groups(
            self.pool.group_by_tier(pairs, device_side=1), what="kv", direction="device_to_host"
        )
        released_bytes = sum(tier.allocated_bytes(self.owner) for tier in self.node_tiers)
        self.executor.drop_graphs()
        self.pool.drop_gpu()
        self.placed.drop_all()
        self._unreserve()
        self._resumed.clear()  # before the state: whoever sees "preempted" must find the event clear
        self.state = "preempted"
        self._set_hungry(False)
        self.timings.kv_save_seconds = kv_save.seconds
        self.timings.kv_save_transfer = kv_save
        self.timings.kv_bytes = kv_save.moved_bytes
        parked = len(self.scheduler.running)
        return PreemptReport(self.name, kv_save, parked, released_bytes, time.perf_counter() - start)

    def resume(self) -> ResumeReport:
        return self.call(self._resume)

    def _resume(self) -> ResumeReport:
        if self.state != "preempted":
            raise EngineError("InvalidState", f"model {self.name} is {self.state}, not preempted")
        assert self.pool is not None and self.executor is not None
        start = time.perf_counter()
        # refuses, and stays preempted, if it no longer fits (on any of its GPUs)
        self._reserve(self._need(self.plan, self.decode_mode, self.prefill_mode))
        try:
            reload = self.placed.upload(self.placed.resident_units())
            self.placed.open_stager()
            self.pool.retarget(self.placed.kv_homes())  # its GPUs may have changed while preempted
            pairs = self.pool.restore_pairs()
            kv_restore = timed_copy_groups(
                self.pool.group_by_tier(pairs, device_side=0), what="kv", direction="host_to_device"
            )
        except Exception:  # leave it cleanly preempted: saved KV and host weights are untouched
            self.pool.drop_gpu()
            self.placed.drop_all()
            self._unreserve()
            raise
        self.pool.restored()
        # the plan, mode or GPUs may have changed while preempted
        self.pool.rehome(self.placed.kv_homes(), self.scheduler.used_tokens())
        self.state = "ready"
        self._resumed.set()
        self.timings.reload_seconds = reload.seconds
        self.timings.reload_transfer = reload
        self.timings.host_to_device_gbps = (
            reload.gbps if reload.moved_bytes else self.timings.host_to_device_gbps
        )
        self.timings.kv_restore_seconds = kv_restore.seconds
        self.timings.kv_restore_transfer = kv_restore
        with self._cv:
            self._cv.notify_all()
        parked = len(self.scheduler.running)
        return ResumeReport(self.name, reload, kv_restore, parked, time.perf_counter() - start)

    def set_residency(
        self,
        fraction: float | None = None,
        decode_mode: ExecutionMode | None = None,
        prefill_mode: ExecutionMode | None = None,
        gpus: GpuShares | None = None,
    ) -> ResidencyReport:
        return self.call(lambda: self._set_residency(fraction, decode_mode, prefill_mode, gpus))

    def _set_residency(
        self,
        fraction: float | None,
        decode_mode: ExecutionMode | None,
        prefill_mode: ExecutionMode | None,
        gpus: GpuShares | None = None,
    ) -> ResidencyReport:
        """Demotes or promotes live: moves whole units (between GPUs too) and re-homes KV, between two steps.
        Without ``gpus`` the model keeps its GPUs, their shares scaled to the new fraction."""
        fraction = self.plan.requested_fraction if fraction is None else fraction
        if gpus is None:
            gpus = scaled_shares(self.plan.gpu_shares(), fraction)
        plan = plan_residency(self.weights, fraction, self.options.min_resident_fraction, gpus)
        new_decode = decode_mode or self.decode_mode
        new_prefill = prefill_mode or self.prefill_mode
        needs = self._need(plan, new_decode, new_prefill)
        if self.state != "ready":  # preempted: takes effect at resume, where the budget is checked
            self.placed.plan, self.placed.decode_mode, self.placed.prefill_mode = (
                plan,
                new_decode,
                new_prefill,
            )
            return self.residency()
        assert self.pool is not None and self.executor is not None
        start = time.perf_counter()
        self._reserve(needs, grow_only=True)
        self.executor.drop_graphs()
        self._set_hungry(False)  # its GPUs may change: it says so again, to the new ones, at the next step
        self.placed.drop(self.placed.moved_units(plan))
        self.placed.close_stager()
        self.placed.plan, self.placed.decode_mode, self.placed.prefill_mode = plan, new_decode, new_prefill
        self.pool.rehome(self.placed.kv_homes(), self.scheduler.used_tokens())
        timing = self.placed.upload(
            [u for u in self.weights.units if u.name in plan.resident and u.name not in self.placed.gpu_flats]
        )
        self.placed.open_stager()
        self._reserve(needs)
        self._unreserve(keep=set(needs))
        self.timings.residency_change_transfer = timing
        log.info(
            "model %s: residency set to %.3f (achieved %.3f; decode %s, prefill %s) in %.3f s",
            self.name,
            plan.requested_fraction,
            plan.resident_fraction,
            new_decode,
            new_prefill,
            time.perf_counter() - start,
        )
        return self.residency()

    def uses(self, tier: GpuTier) -> bool:
        return self.placed.uses(tier)

    def fail_gpu(self, error: EngineError) -> None:
        """A GPU of the model is gone: its requests end with ``error``, it gives back what it holds on the
        other GPUs, and it stays ``failed`` (with the reason) until unloaded: placed again, elsewhere."""
        self.call(lambda: self._fail_gpu(error))

    def _fail_gpu(self, error: EngineError) -> None:
        if self.state in ("unloaded", "failed"):
            return
        self.failure = error  # from here on, a new request is refused with it
        self._set_hungry(False)
        if self.executor is not None:
            self.executor.drop_graphs()
        if self.pool is not None:
            self.pool.release()
        self.placed.drop_all()
        self._unreserve()
        # failed and holding nothing before any request hears of it: whoever it answers sees the end state
        self.state = "failed"
        self._fail_active(error)
        with self._cv:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
        for request in waiting:
            request.emit(RequestEvent(None, "", "error", error))
        self._resumed.set()  # whoever waits for a resume gets the answer: failed

    def unload(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join()
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        self._set_hungry(False)  # first: whatever fails below must not leave the neighbours paced
        error = EngineError("ModelUnloaded", f"model {self.name} was unloaded")
        self._fail_active(error)
        with self._cv:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
        for request in waiting:
            request.emit(RequestEvent(None, "", "error", error))
        if self.executor is not None:
            self.executor.drop_graphs()
        if self.pool is not None:
            self.pool.release()
        self.placed.drop_all()
        self._unreserve()
        self.state = "unloaded"
        self._resumed.set()  # wake anyone waiting for a resume: the answer is now "gone"
