"""One loaded model: its placement, its forward pass across tiers, and the loop that batches its requests.

A single thread per model owns all of the model's state. Requests wait in a bounded queue and join the
running batch at the next decode step (after their own prefill); admin operations — preempt, resume,
change of residency or mode — are queued as commands and run between two steps, so they never race a
forward pass and never drop a request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from residency_worker.engine import model as decoder
from residency_worker.engine.generate import (
    SEED_MAX,
    SEED_MIN,
    Detokenizer,
    Request,
    RequestEvent,
    make_generator,
    sample,
    token_logprobs,
)
from residency_worker.engine.kvcache import KVCache
from residency_worker.engine.loading import LoadedWeights, Unit
from residency_worker.engine.pacing import pace_interval_seconds
from residency_worker.engine.placement import (
    BudgetNeed,
    ResidencyPlan,
    budget_need,
    gpu_kv_layers,
    head_matrix_name,
    head_pieces,
    head_rows_per_chunk,
    plan_residency,
    streamed_pieces,
    unit_piece,
)
from residency_worker.engine.tiers import GpuTier
from residency_worker.engine.transfer import Stager, timed_copies, upload_units
from residency_worker.engine.types import (
    EngineError,
    ExecutionMode,
    ModelState,
    ModelTimings,
    ObservedDemand,
    PreemptReport,
    ResidencyReport,
    ResumeReport,
    SamplingParams,
    TransferTiming,
)

log = logging.getLogger(__name__)

DEMAND_WINDOW_SECONDS = 60.0
"""Traffic is averaged over this window (the simulator's ``engine.DEMAND_WINDOW_SECONDS``)."""
T = TypeVar("T")
_runner_ids = itertools.count(1)
ModeChoice = Literal["stream", "cpu", "auto"]


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


@dataclass
class _Sequence:
    request: Request
    cache: KVCache
    detokenizer: Detokenizer
    generator: torch.Generator | None
    max_tokens: int
    cached_tokens: int = 0
    last_token: int = 0
    generated: int = 0
    eos_ids: frozenset[int] = field(default_factory=frozenset)


class ModelRunner:
    """Serves one model from its placement; all public methods are thread-safe."""

    def __init__(self, name: str, weights: LoadedWeights, tier: GpuTier, options: ModelOptions) -> None:
        self.name = name
        # unique per runner: an unloading runner of the same name gives back only its own reservation
        self.owner = f"model/{name}/{next(_runner_ids)}"
        self.weights = weights
        self.tier = tier
        self.options = options
        self.spec = weights.spec
        self.state: ModelState = "loading"
        self.last_request_time = time.time()  # wall clock: reported for idle scale-to-zero
        self._started_monotonic = time.monotonic()
        self._arrivals: deque[tuple[float, Request]] = deque()  # accepted requests of the demand window
        self.timings = ModelTimings(weight_bytes=weights.weight_bytes, emulated=tier.emulated)
        max_positions = min(options.max_sequence_length, self.spec.max_position_embeddings)
        self.max_sequence_length = max_positions
        self.rotary = decoder.Rotary(weights.config, max_positions)
        self.plan: ResidencyPlan = plan_residency(
            weights, options.resident_fraction, options.min_resident_fraction
        )
        self.decode_mode: ExecutionMode = "stream" if options.decode_mode == "auto" else options.decode_mode
        prefill = options.prefill_mode or options.decode_mode
        self.prefill_mode: ExecutionMode = "stream" if prefill == "auto" else prefill
        self._gpu_flats: dict[str, torch.Tensor] = {}
        self._gpu_views: dict[str, decoder.Weights] = {}
        self._host_views = {u.name: u.views(weights.host_unit(u)) for u in weights.units}
        self._layer_units = [weights.unit(f"layer.{i}") for i in range(self.spec.num_layers)]
        self._layer_pieces = {u.name: unit_piece(u) for u in self._layer_units}
        self._head_pieces = head_pieces(weights)
        self._head_matrix = head_matrix_name(weights)
        self._head_rows = head_rows_per_chunk(weights)
        self._embed_unit = weights.unit("head" if self.spec.tie_word_embeddings else "embed")
        self._stager: Stager | None = None
        self._waiting: deque[Request] = deque()
        self._active: list[_Sequence] = []
        self._commands: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._resumed = threading.Event()
        self._thread: threading.Thread | None = None
        self.pace_interval_seconds = pace_interval_seconds(options.min_decode_tokens_per_second)
        self._last_decode_start = 0.0
        self._hungry = False
        eos = weights.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if weights.tokenizer.eos_token_id is not None:
            eos_ids.add(int(weights.tokenizer.eos_token_id))
        self._eos_ids = frozenset(eos_ids)

    # -- placement ----------------------------------------------------------------------------------
    def _need(
        self, plan: ResidencyPlan, decode_mode: ExecutionMode, prefill_mode: ExecutionMode
    ) -> BudgetNeed:
        return budget_need(
            self.weights,
            plan,
            decode_mode=decode_mode,
            prefill_mode=prefill_mode,
            max_batch_size=self.options.max_batch_size,
            max_sequence_length=self.max_sequence_length,
        )

    def _open_stager(self) -> None:
        streamed = streamed_pieces(self.weights, self.plan)
        if streamed and "stream" in (self.decode_mode, self.prefill_mode):
            slot_numel = max(p.numel for p in streamed)
            self._stager = Stager(self.tier, self.owner, self.weights, slot_numel)

    def _close_stager(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _upload(self, units: list[Unit]) -> TransferTiming:
        flats, timing = upload_units(
            self.tier, self.owner, self.weights, units, streams=self.options.reload_streams
        )
        self._gpu_flats.update(flats)
        for unit in units:
            self._gpu_views[unit.name] = unit.views(flats[unit.name])
        return timing

    def _drop_weights(self, names: set[str]) -> None:
        for name in names:
            self.tier.release(self._gpu_flats.pop(name))
            self._gpu_views.pop(name, None)

    def place(self) -> TransferTiming:
        """Reserves the GPU budget, uploads resident units and opens staging; refuses what does not fit."""
        need = self._need(self.plan, self.decode_mode, self.prefill_mode)
        self.tier.reserve(self.owner, need.total_bytes)
        try:
            resident = [u for u in self.weights.units if u.name in self.plan.resident]
            timing = self._upload(resident)
            self._open_stager()
        except Exception:
            self.tier.unreserve(self.owner)
            raise
        self.timings.load_transfer = timing
        self.timings.host_to_device_gbps = timing.gbps if timing.moved_bytes else None
        self.state = "ready"
        self._resumed.set()
        return timing

    def residency(self) -> ResidencyReport:
        need = self._need(self.plan, self.decode_mode, self.prefill_mode)
        resident_bytes = sum(self.weights.unit_bytes(self.weights.unit(n)) for n in list(self._gpu_flats))
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
            gpu_reserved_bytes=self.tier.reserved_bytes(self.owner),
            kv_reserved_bytes=need.kv_bytes if self.state == "ready" else 0,
            emulated=self.tier.emulated,
        )

    # -- the forward pass ---------------------------------------------------------------------------
    def _layer_weights(self, unit: Unit, mode: ExecutionMode) -> tuple[decoder.Weights, torch.device, bool]:
        """A layer's tensors, the device it computes on, and whether they came through the stager."""
        if unit.name in self._gpu_views:
            return self._gpu_views[unit.name], self.tier.device, False
        if mode == "stream":
            assert self._stager is not None, "stream mode without staging buffers"
            return self._stager.acquire(self._layer_pieces[unit.name]), self.tier.device, True
        return self._host_views[unit.name], torch.device("cpu"), False

    def _logits(self, last: torch.Tensor, mode: ExecutionMode) -> torch.Tensor:
        """Float32 logits [B, vocab], computed in the same row chunks wherever the head lives."""
        norm_piece, *row_pieces = self._head_pieces
        if "head" in self._gpu_views or mode == "cpu":
            resident = "head" in self._gpu_views
            device = self.tier.device if resident else torch.device("cpu")
            views = self._gpu_views["head"] if resident else self._host_views["head"]
            normed = decoder.final_norm(views["norm.weight"], self.spec, last.to(device))
            matrix = views[self._head_matrix]
            chunks = [
                decoder.logits_chunk(matrix[start : start + self._head_rows], normed)
                for start in range(0, matrix.shape[0], self._head_rows)
            ]
            return torch.cat(chunks, dim=-1)
        assert self._stager is not None, "stream mode without staging buffers"
        last = last.to(self.tier.device, non_blocking=True)
        normed = decoder.final_norm(self._stager.acquire(norm_piece)["norm.weight"], self.spec, last)
        self._stager.release(norm_piece)
        chunks = []
        for piece in row_pieces:
            chunks.append(decoder.logits_chunk(self._stager.acquire(piece)["weight"], normed))
            self._stager.release(piece)
        return torch.cat(chunks, dim=-1)

    def _forward(self, sequences: list[_Sequence], *, prefill: bool) -> torch.Tensor:
        """Float32 CPU logits [B, vocab] for the next token of each sequence."""
        mode = self.prefill_mode if prefill else self.decode_mode
        if prefill:
            token_rows = [sequences[0].request.prompt_ids]
            position_list = [0]
        else:
            token_rows = [[s.last_token] for s in sequences]
            position_list = [s.cached_tokens for s in sequences]
        steps = len(token_rows[0])
        if mode == "stream" and self._stager is not None:
            self._stager.begin(streamed_pieces(self.weights, self.plan))
        if self._embed_unit.name in self._gpu_views:
            embed_weights, device = self._gpu_views[self._embed_unit.name], self.tier.device
        else:  # a row gather: cheaper on the host than moving the table
            embed_weights, device = self._host_views[self._embed_unit.name], torch.device("cpu")
        hidden = decoder.embed(embed_weights, torch.tensor(token_rows, device=device))
        base = torch.tensor(position_list, dtype=torch.long)[:, None] + torch.arange(steps)[None, :]
        positions: dict[torch.device, torch.Tensor] = {}
        caches = [s.cache for s in sequences]
        for index, unit in enumerate(self._layer_units):
            weights, device, staged = self._layer_weights(unit, mode)
            if hidden.device != device:
                hidden = hidden.to(device, non_blocking=device.type == "cuda")
            if device not in positions:
                positions[device] = base.to(device)
            hidden = decoder.layer(
                weights,
                self.spec,
                index,
                hidden,
                positions[device],
                position_list,
                caches,
                self.rotary,
                prefill=prefill,
            )
            if staged:
                assert self._stager is not None
                self._stager.release(self._layer_pieces[unit.name])
        return self._logits(hidden[:, -1], mode).cpu()

    def choose_modes(self) -> dict[str, float]:
        """Resolves "auto" modes by timing a short prefill and a few decode steps in each mode.

        Runs before the model serves (on the caller's thread); each mode gets an untimed warm-up
        pass first, so one-off costs (kernel selection, first-touch memory) do not decide.
        """
        decode_choice = self.options.decode_mode
        prefill_choice = self.options.prefill_mode or decode_choice
        if "auto" not in (decode_choice, prefill_choice) or not streamed_pieces(self.weights, self.plan):
            return {}
        prompt_tokens = max(1, min(32, self.max_sequence_length // 2))
        measured: dict[str, float] = {}
        for mode in ("stream", "cpu"):
            self._set_residency(None, mode, mode)
            for timed in (False, True):
                request = Request(prompt_ids=[0] * prompt_tokens, params=SamplingParams(max_tokens=5))
                sequence = self._new_sequence(request)
                start = time.perf_counter()
                logits = self._forward([sequence], prefill=True)
                prefill_seconds = time.perf_counter() - start
                sequence.cached_tokens = prompt_tokens
                sequence.last_token = int(logits[0].argmax())
                start = time.perf_counter()
                for _ in range(3):
                    self._forward([sequence], prefill=False)
                    sequence.cached_tokens += 1
                sequence.cache.release()
                if timed:
                    measured[f"prefill_{mode}_seconds"] = prefill_seconds
                    measured[f"decode_{mode}_seconds"] = (time.perf_counter() - start) / 3

        def faster(phase: str) -> ExecutionMode:
            return (
                "stream" if measured[f"{phase}_stream_seconds"] <= measured[f"{phase}_cpu_seconds"] else "cpu"
            )

        decode: ExecutionMode = faster("decode") if decode_choice == "auto" else decode_choice
        prefill: ExecutionMode = faster("prefill") if prefill_choice == "auto" else prefill_choice
        self._set_residency(None, decode, prefill)
        log.info("model %s: measured modes %s → decode %s, prefill %s", self.name, measured, decode, prefill)
        return measured

    # -- sequences ----------------------------------------------------------------------------------
    def _gpu_kv_layers(self) -> set[int]:
        return set(gpu_kv_layers(self.weights, self.plan, self.decode_mode))

    def _new_sequence(self, request: Request) -> _Sequence:
        spec = self.spec
        capacity = min(len(request.prompt_ids) + request.params.max_tokens, self.max_sequence_length)
        # everything that may fail on the request's own values comes before the KV reservation
        detokenizer = Detokenizer(self.weights.tokenizer, request.params.stop)
        generator = make_generator(request.params)
        cache = KVCache(
            self.tier,
            self.owner,
            (2, spec.num_kv_heads, capacity, spec.head_dim),
            self.weights.dtype,
            self._gpu_kv_layers(),
            spec.num_layers,
        )
        return _Sequence(
            request=request,
            cache=cache,
            detokenizer=detokenizer,
            generator=generator,
            max_tokens=capacity - len(request.prompt_ids),
            eos_ids=frozenset() if request.params.ignore_eos else self._eos_ids,
        )

    def _accept(self, sequence: _Sequence, logits: torch.Tensor) -> bool:
        """Samples and emits the next token; True when the sequence has finished."""
        token = sample(logits, sequence.request.params, sequence.generator)
        sequence.last_token = token
        sequence.generated += 1
        delta, stopped = sequence.detokenizer.push(token)
        finish: str | None = None
        if stopped or token in sequence.eos_ids:
            finish = "stop"
        elif sequence.generated >= sequence.max_tokens:
            finish = "length"
        if finish is not None and not stopped:
            delta += sequence.detokenizer.flush()
        event = RequestEvent(token, delta, finish)
        top = sequence.request.params.logprobs
        if top is not None:  # only when asked: a log_softmax over the vocabulary per token
            logprob, best = token_logprobs(logits, token, top)
            event = RequestEvent(token, delta, finish, logprob=logprob, top_logprobs=best)
        sequence.request.emit(event)
        return finish is not None

    def _finish(self, sequence: _Sequence) -> None:
        sequence.cache.release()

    def _prefill(self, request: Request) -> _Sequence | None:
        """Runs one new request's prompt; it joins the batch unless it finished (or failed) already."""
        try:
            sequence = self._new_sequence(request)
        except EngineError as exc:
            request.emit(RequestEvent(None, "", "error", exc))
            return None
        except Exception as exc:  # the request is off the queue: it must still get its answer
            log.exception("model %s: cannot start a request", self.name)
            error = EngineError("InferenceFailed", f"cannot start the request on {self.name}: {exc}")
            request.emit(RequestEvent(None, "", "error", error))
            return None
        start = time.perf_counter()
        try:
            logits = self._forward([sequence], prefill=True)
            elapsed = time.perf_counter() - start
            self.timings.prefill_tokens_per_second = len(request.prompt_ids) / max(elapsed, 1e-9)
            sequence.cached_tokens = len(request.prompt_ids)
            finished = self._accept(sequence, logits[0])
        except Exception as exc:
            log.exception("model %s: prefill failed", self.name)
            self._finish(sequence)
            error = EngineError("InferenceFailed", f"prefill on {self.name} failed: {exc}")
            request.emit(RequestEvent(None, "", "error", error))
            return None
        if finished:
            self._finish(sequence)
            return None
        return sequence

    def _update_hungry(self) -> None:
        """Hungry: ready, requests wait and the batch is full (a preempted model's parked batch uses no GPU).
        Called with ``_cv`` held before each step; the loop also clears it before it sleeps."""
        self._set_hungry(
            self.state == "ready" and bool(self._waiting) and len(self._active) >= self.options.max_batch_size
        )

    def _set_hungry(self, hungry: bool) -> None:
        if hungry != self._hungry:
            self._hungry = hungry
            self.tier.pacer.set_hungry(self.owner, hungry)

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
        self.timings.paced_seconds += self.tier.pacer.hold(self.owner, due, interrupted=interrupted)
        return not interrupted()

    def _other_work(self) -> bool:
        """An admin command waits, or a request does: one that can join the batch goes first, and one that
        cannot makes this model hungry, which it must say at once (and then is never held). Reads without the
        lock: a stale answer only ends or prolongs one wait."""
        return bool(self._commands) or self._stopping or bool(self._waiting)

    def set_decode_slo(self, min_decode_tokens_per_second: float | None) -> None:
        """Changes the SLO the model is paced to (a wait in progress ends, and the next one uses it)."""
        self.pace_interval_seconds = pace_interval_seconds(min_decode_tokens_per_second)

    def _decode(self) -> None:
        self._last_decode_start = time.monotonic()
        start = time.perf_counter()
        logits = self._forward(self._active, prefill=False)
        elapsed = time.perf_counter() - start
        self.timings.decode_tokens_per_second = len(self._active) / max(elapsed, 1e-9)
        still_running = []
        for row, sequence in enumerate(self._active):
            sequence.cached_tokens += 1
            try:
                finished = self._accept(sequence, logits[row])
            except Exception as exc:  # one request's sampling fails: only that request fails
                log.exception("model %s: sampling failed", self.name)
                self._finish(sequence)
                error = EngineError("InferenceFailed", f"sampling on {self.name} failed: {exc}")
                sequence.request.emit(RequestEvent(None, "", "error", error))
                continue
            if finished:
                self._finish(sequence)
            else:
                still_running.append(sequence)
        self._active = still_running

    def _step(self) -> None:
        for sequence in [s for s in self._active if s.request.cancelled]:
            self._finish(sequence)
            sequence.request.emit(RequestEvent(None, "", "cancelled"))
        self._active = [s for s in self._active if not s.request.cancelled]
        while len(self._active) < self.options.max_batch_size:
            with self._cv:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            if request.cancelled:
                request.emit(RequestEvent(None, "", "cancelled"))
                continue
            started = self._prefill(request)
            if started is not None:
                self._active.append(started)
        with self._cv:
            self._update_hungry()
        if self._active and self._pace():  # else the command or new request goes first, then this step
            self._decode()

    # -- the loop and its commands ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (
                    self._commands
                    or self._stopping
                    or (self.state == "ready" and (self._waiting or self._active))
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
                self._fail_active(EngineError("InferenceFailed", f"inference on {self.name} failed: {exc}"))

    def _fail_active(self, error: EngineError) -> None:
        for sequence in self._active:
            self._finish(sequence)
            sequence.request.emit(RequestEvent(None, "", "error", error))
        self._active = []

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
        prompt_tokens = len(request.prompt_ids)
        if prompt_tokens == 0:
            raise EngineError("InvalidRequest", "the prompt is empty")
        if prompt_tokens >= self.max_sequence_length:
            raise EngineError(
                "InvalidRequest",
                f"the prompt has {prompt_tokens} tokens; {self.name} accepts at "
                f"most {self.max_sequence_length - 1}",
            )
        if request.params.max_tokens < 1:
            raise EngineError("InvalidRequest", "max_tokens must be at least 1")
        seed = request.params.seed
        if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
            raise EngineError("InvalidRequest", f"seed must lie in [{SEED_MIN}, {SEED_MAX}]")
        vocab = self.spec.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise EngineError("InvalidRequest", f"prompt token ids must lie in [0, {vocab})")
        with self._cv:
            if self._stopping or self.state in ("unloaded", "failed"):
                raise EngineError("ModelNotLoaded", f"model {self.name} is not loaded")
            if len(self._waiting) >= self.options.max_queue:
                raise EngineError(
                    "QueueFull",
                    f"model {self.name} has {len(self._waiting)} requests waiting",
                    retry_after_seconds=1.0,
                )
            self._waiting.append(request)
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
        # one read per request: the batch loop may finish one meanwhile
        seen = [(r.finish_reason, len(r.token_ids), len(r.prompt_ids), r.params.max_tokens) for r in requests]
        counted = [row for row in seen if row[0] is None or row[1] > 0]
        finished = [produced for reason, produced, _, _ in counted if reason is not None]
        typical_output = sum(finished) / len(finished) if finished else None
        output_tokens = 0.0
        for reason, produced, prompt, max_tokens in counted:
            if reason is not None:
                output_tokens += produced
                continue
            limit = max(1, min(max_tokens, self.max_sequence_length - prompt))
            expected = limit if typical_output is None else min(limit, typical_output)
            output_tokens += max(produced, expected)
        prompt_tokens = sum(prompt for _, _, prompt, _ in counted)
        # never average over less than half the window: a few early requests are not a rate
        span = min(window_seconds, max(window_seconds / 2, now - self._started_monotonic))
        return ObservedDemand(
            decode_tokens_per_second=output_tokens / span,
            prompt_tokens_per_second=prompt_tokens / span,
            typical_prompt_tokens=max(1, round(prompt_tokens / len(counted))) if counted else None,
            window_seconds=span,
            age_seconds=now - self._started_monotonic,
        )

    def cancel(self, request: Request) -> None:
        """Drops a request: at once if it is still queued, otherwise at the next step."""
        request.cancel()
        with self._cv:
            try:
                self._waiting.remove(request)
            except ValueError:
                return  # already running (dropped at the next step) or finished
        request.emit(RequestEvent(None, "", "cancelled"))

    @property
    def queue_depth(self) -> int:
        with self._cv:
            return len(self._waiting)

    @property
    def active_sequences(self) -> int:
        return len(self._active)

    def wait_until_ready(self, timeout_seconds: float) -> bool:
        return self._resumed.wait(timeout_seconds)

    # -- admin operations (run on the model's thread) ------------------------------------------------
    def preempt(self) -> PreemptReport:
        return self.call(self._preempt)

    def _preempt(self) -> PreemptReport:
        if self.state != "ready":
            raise EngineError("InvalidState", f"model {self.name} is {self.state}, not ready")
        start = time.perf_counter()
        pairs = [p for s in self._active for p in s.cache.save_pairs(s.cached_tokens)]
        kv_save = timed_copies(self.tier, pairs, what="kv", direction="device_to_host")
        released_bytes = self.tier.allocated_bytes(self.owner)
        for sequence in self._active:
            sequence.cache.drop_gpu()
        self._drop_weights(set(self._gpu_flats))
        self._close_stager()
        self.tier.unreserve(self.owner)
        self.tier.empty_cache()
        self._resumed.clear()  # before the state: whoever sees "preempted" must find the event clear
        self.state = "preempted"
        self._set_hungry(False)
        self.timings.kv_save_seconds = kv_save.seconds
        self.timings.kv_save_transfer = kv_save
        self.timings.kv_bytes = kv_save.moved_bytes
        return PreemptReport(
            self.name, kv_save, len(self._active), released_bytes, time.perf_counter() - start
        )

    def resume(self) -> ResumeReport:
        return self.call(self._resume)

    def _resume(self) -> ResumeReport:
        if self.state != "preempted":
            raise EngineError("InvalidState", f"model {self.name} is {self.state}, not preempted")
        start = time.perf_counter()
        need = self._need(self.plan, self.decode_mode, self.prefill_mode)
        self.tier.reserve(self.owner, need.total_bytes)  # refuses, and stays preempted, if it no longer fits
        resident = [u for u in self.weights.units if u.name in self.plan.resident]
        try:
            reload = self._upload(resident)
            self._open_stager()
            pairs = [p for s in self._active for p in s.cache.restore_pairs()]
            kv_restore = timed_copies(self.tier, pairs, what="kv", direction="host_to_device")
        except Exception:  # leave it cleanly preempted: saved KV and host weights are untouched
            for sequence in self._active:
                sequence.cache.drop_gpu()
            self._drop_weights(set(self._gpu_flats))
            self._close_stager()
            self.tier.unreserve(self.owner)
            raise
        gpu_layers = self._gpu_kv_layers()  # the plan or mode may have changed while preempted
        for sequence in self._active:
            sequence.cache.restored()
            sequence.cache.rehome(gpu_layers, sequence.cached_tokens)
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
        return ResumeReport(self.name, reload, kv_restore, len(self._active), time.perf_counter() - start)

    def set_residency(
        self,
        fraction: float | None = None,
        decode_mode: ExecutionMode | None = None,
        prefill_mode: ExecutionMode | None = None,
    ) -> ResidencyReport:
        return self.call(lambda: self._set_residency(fraction, decode_mode, prefill_mode))

    def _set_residency(
        self, fraction: float | None, decode_mode: ExecutionMode | None, prefill_mode: ExecutionMode | None
    ) -> ResidencyReport:
        """Demotes or promotes live: moves whole units and re-homes KV, between two decode steps."""
        plan = plan_residency(
            self.weights,
            self.plan.requested_fraction if fraction is None else fraction,
            self.options.min_resident_fraction,
        )
        new_decode = decode_mode or self.decode_mode
        new_prefill = prefill_mode or self.prefill_mode
        need = self._need(plan, new_decode, new_prefill)
        if self.state != "ready":  # preempted: takes effect at resume, where the budget is checked
            self.plan, self.decode_mode, self.prefill_mode = plan, new_decode, new_prefill
            return self.residency()
        start = time.perf_counter()
        self.tier.reserve(self.owner, max(need.total_bytes, self.tier.reserved_bytes(self.owner)))
        removed = set(self._gpu_flats) - plan.resident
        added = [u for u in self.weights.units if u.name in plan.resident and u.name not in self._gpu_flats]
        self._drop_weights(removed)
        self._close_stager()
        self.plan, self.decode_mode, self.prefill_mode = plan, new_decode, new_prefill
        gpu_layers = self._gpu_kv_layers()
        for sequence in self._active:
            sequence.cache.rehome(gpu_layers, sequence.cached_tokens)
        timing = self._upload(added)
        self._open_stager()
        self.tier.reserve(self.owner, need.total_bytes)
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
            waiting = list(self._waiting)
            self._waiting.clear()
        for request in waiting:
            request.emit(RequestEvent(None, "", "error", error))
        self._drop_weights(set(self._gpu_flats))
        self._close_stager()
        self.tier.unreserve(self.owner)
        self.tier.empty_cache()
        self.state = "unloaded"
        self._resumed.set()  # wake anyone waiting for a resume: the answer is now "gone"
