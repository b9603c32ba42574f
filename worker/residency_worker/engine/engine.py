"""The node's engine: the models it serves, on the node's GPU tiers (one per GPU it drives), with the admin
operations the agent calls."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from residency.split import GpuShares, check_shares
from residency_worker.engine.generate import Request, RequestEvent
from residency_worker.engine.loading import load_weights, validate_model_dir
from residency_worker.engine.runner import ModelOptions, ModelRunner
from residency_worker.engine.tiers import GpuTier, measure_host_to_device_peak, nvml_memory_bytes
from residency_worker.engine.types import (
    EngineError,
    ExecutionMode,
    GpuReport,
    LoadReport,
    ModelStatus,
    NodeReport,
    PreemptReport,
    ResidencyReport,
    ResumeReport,
    SamplingParams,
)

log = logging.getLogger(__name__)
Listener = Callable[[str, str, object], None]
UNLOAD_WAIT_SECONDS = 300.0
"""How long a load waits for an unload of the same name (a long forward step of a big model) to finish."""

__all__ = ["Engine", "ModelOptions", "RequestEvent"]


class Engine:
    """Loads, places, serves, preempts and resumes models on one node's GPU tiers (``tiers[i]`` is GPU i)."""

    def __init__(
        self,
        tier: GpuTier | Sequence[GpuTier],
        models_roots: list[Path],
        *,
        node: str = "local",
        calibration_bytes: int = 256 * 2**20,
        remote_code_roots: list[Path] | None = None,
    ) -> None:
        self.tiers = [tier] if isinstance(tier, GpuTier) else list(tier)
        if not self.tiers:
            raise ValueError("an engine needs at least one GPU tier")
        for index, each in enumerate(self.tiers):
            each.index = index  # the worker numbers its GPUs 0..n-1 in the order it was given them
        self.tier = self.tiers[0]  # GPU 0: where a placement that names no GPUs runs
        self.node = node
        self.models_roots = [Path(r) for r in models_roots]
        # roots under which the admin allows models with custom code (trust_remote_code); none by default
        self.remote_code_roots = [Path(r) for r in remote_code_roots or []]
        self._models: dict[str, ModelRunner] = {}
        self._lock = threading.Lock()
        self._loading: set[str] = set()
        # names whose runner is gone from _models but still finishing its step and giving back memory
        self._unloading: set[str] = set()
        self._unloaded = threading.Condition(self._lock)
        self._listeners: list[Listener] = []
        if calibration_bytes > 0:
            for each in self.tiers:
                peak = measure_host_to_device_peak(each, calibration_bytes)
                log.info(
                    "GPU %d host→device peak: %.2f GB/s (%s%s)",
                    each.index,
                    peak.gbps,
                    peak.path,
                    ", emulated" if each.emulated else "",
                )

    # -- lifecycle ----------------------------------------------------------------------------------
    def load(self, name: str, path: str, options: ModelOptions | None = None) -> LoadReport:
        """Validates, reads into the host cache, places and serves `name`; refuses what does not fit."""
        options = options or ModelOptions()
        if not 0.0 <= options.resident_fraction <= 1.0:
            raise EngineError("InvalidRequest", "resident_fraction must lie in [0, 1]")
        self._check_gpus_of(options.gpus, options.resident_fraction)
        _check_slo(options.min_decode_tokens_per_second)
        with self._lock:
            if name in self._unloading:
                log.info("load of %s waits for its previous runner to finish unloading", name)
            # a load that overlapped the unload would place beside the old runner's memory, counted twice
            if not self._unloaded.wait_for(lambda: name not in self._unloading, UNLOAD_WAIT_SECONDS):
                raise EngineError(
                    "InvalidState",
                    f"model {name!r} is still unloading after {UNLOAD_WAIT_SECONDS:.0f} s; retry later",
                )
            if name in self._models or name in self._loading:
                raise EngineError("ModelAlreadyLoaded", f"a model named {name!r} is already loaded")
            self._loading.add(name)
        try:
            start = time.perf_counter()
            try:
                directory, trust_remote_code = validate_model_dir(
                    path, self.models_roots, options.dtype, self.remote_code_roots
                )
                weights = load_weights(directory, options.dtype, self.tier, trust_remote_code)
                runner = ModelRunner(name, weights, self.tiers, options)
                runner.on_step_failure = self._step_failed
            except EngineError:
                raise
            except Exception as exc:  # a directory that passed the checks and still cannot be read
                log.exception("cannot load %s from %s", name, path)
                raise EngineError("LoadFailed", f"cannot load {name} from {path}: {exc}") from exc
            host_to_device = runner.place()
            try:
                mode_seconds = runner.choose_modes()
            except Exception:
                runner.unload()  # gives back its reservation and GPU buffers
                raise
            load_seconds = time.perf_counter() - start
            runner.timings.load_seconds = load_seconds
            runner.start()
            with self._lock:
                self._models[name] = runner
        finally:
            with self._lock:
                self._loading.discard(name)
        log.info(
            "loaded %s from %s in %.2f s (resident %.3f)",
            name,
            directory,
            load_seconds,
            runner.plan.resident_fraction,
        )
        report = LoadReport(
            model=name,
            path=str(directory),
            model_type=weights.spec.model_type,
            dtype=options.dtype,
            load_seconds=load_seconds,
            read_seconds=weights.read_seconds,
            host_to_device=host_to_device,
            residency=runner.residency(),
            mode_choice=mode_seconds,
        )
        self._notify(name, "load", report)
        return report

    def unload(self, name: str) -> None:
        """Stops serving `name` and returns once its runner has given back all of its memory."""
        with self._lock:
            runner = self._models.pop(name, None)
            if runner is None:
                raise EngineError("ModelNotLoaded", f"no model named {name!r} is loaded on this node")
            self._unloading.add(name)
        try:
            runner.unload()
        finally:
            with self._lock:
                self._unloading.discard(name)
                self._unloaded.notify_all()

    def close(self) -> None:
        for name in list(self._models):
            self.unload(name)

    # -- admin --------------------------------------------------------------------------------------
    def preempt(self, name: str) -> PreemptReport:
        """Saves in-flight KV to host memory, releases the model's GPU memory and parks its requests."""
        report = self._runner(name).preempt()
        self._notify(name, "preempt", report)
        return report

    def resume(self, name: str) -> ResumeReport:
        """Reloads the resident weights and restores KV; parked requests continue where they stopped."""
        report = self._runner(name).resume()
        self._notify(name, "resume", report)
        return report

    def add_listener(self, listener: Listener) -> None:
        """Calls `listener(model, operation, report)` after each load, preempt, resume, residency change."""
        self._listeners.append(listener)

    def _notify(self, name: str, operation: str, report: object) -> None:
        for listener in self._listeners:
            listener(name, operation, report)

    def set_residency(
        self,
        name: str,
        fraction: float | None = None,
        *,
        decode_mode: ExecutionMode | None = None,
        prefill_mode: ExecutionMode | None = None,
        gpus: GpuShares | None = None,
    ) -> ResidencyReport:
        """Changes what stays resident, the modes, or the GPUs (``gpus``: (index, share) in pipeline order;
        None keeps the model's GPUs, their shares scaled to ``fraction``)."""
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise EngineError("InvalidRequest", "resident fraction must lie in [0, 1]")
        if gpus is not None:
            if fraction is None:
                fraction = sum(share for _, share in gpus)
            self._check_gpus_of(gpus, fraction)
        report = self._runner(name).set_residency(fraction, decode_mode, prefill_mode, gpus or None)
        self._notify(name, "set_residency", report)
        return report

    def set_decode_slo(self, name: str, min_decode_tokens_per_second: float | None) -> None:
        """Changes the decode SLO `name` is paced to while a model beside it has requests waiting (``None``:
        never paced); no weights move."""
        _check_slo(min_decode_tokens_per_second)
        runner = self._runner(name)
        if runner.options.min_decode_tokens_per_second != min_decode_tokens_per_second:
            runner.options = dataclasses.replace(
                runner.options, min_decode_tokens_per_second=min_decode_tokens_per_second
            )
            runner.set_decode_slo(min_decode_tokens_per_second)

    def set_budget(self, budget_bytes: int, gpu: int | None = None) -> NodeReport:
        """Changes a GPU memory budget at runtime (e.g. part of the GPU is handed to another tenant): GPU
        ``gpu``'s, or without one every GPU's (a node of one GPU: its budget).

        What is placed stays, even above a smaller budget; every later reservation must fit the new one.
        """
        if budget_bytes <= 0:
            raise EngineError("InvalidRequest", "the GPU memory budget must be positive")
        if gpu is not None and not 0 <= gpu < len(self.tiers):
            raise EngineError(
                "InvalidRequest", f"GPU {gpu} does not exist on this node ({len(self.tiers)} GPUs)"
            )
        for tier in self.tiers if gpu is None else [self.tiers[gpu]]:
            tier.budget_bytes = budget_bytes
            log.warning("GPU %d memory budget set to %d bytes at runtime", tier.index, budget_bytes)
        return self.node_report()

    # -- GPUs ---------------------------------------------------------------------------------------
    def gpu_budget_bytes(self) -> int:
        """The budgets of the GPUs still usable, together."""
        return sum(tier.budget_bytes for tier in self.tiers if tier.lost is None)

    def _check_gpus_of(self, gpus: GpuShares, fraction: float) -> None:
        try:
            check_shares(gpus, len(self.tiers), fraction)
        except ValueError as exc:
            raise EngineError("InvalidRequest", str(exc)) from exc
        lost = [index for index, _ in gpus or ((0, fraction),) if self.tiers[index].lost is not None]
        if lost:
            raise EngineError("GpuLost", f"GPU {lost[0]} is lost ({self.tiers[lost[0]].lost})")

    def lose_gpu(self, index: int, reason: str) -> list[str]:
        """GPU ``index`` is gone (a CUDA error, a driver reset): nothing is placed on it any more, and every
        model using it fails with reason ``GpuLost`` (it must be placed again); the models on the other GPUs
        keep serving. Returns the names of the models that failed."""
        tier = self.tiers[index]
        if tier.lost is None:
            tier.lost = reason
            log.error("GPU %d (%s) is lost: %s", index, tier.gpu_name, reason)
        error = EngineError(
            "GpuLost", f"GPU {index} ({tier.gpu_name}) of node {self.node} was lost: {reason}; place it again"
        )
        with self._lock:
            runners = [r for r in self._models.values() if r.uses(tier) and r.state != "failed"]
        for runner in runners:
            runner.fail_gpu(error)
            self._notify(runner.name, "gpu_lost", error)
        return [runner.name for runner in runners]

    def check_gpus(self, *, deep: bool = False) -> bool:
        """Probes every GPU not yet known lost (``deep``: its CUDA context too, see ``GpuTier.probe``); a GPU
        that fails its probe is lost (:meth:`lose_gpu`). True when one was found lost now."""
        found = False
        for tier in self.tiers:
            if tier.lost is None and (reason := tier.probe(deep=deep)) is not None:
                self.lose_gpu(tier.index, reason)
                found = True
        return found

    def _step_failed(self, error: Exception) -> bool:
        """A model's step raised: was it a GPU that went away? (A CUDA error that is no OOM probes deeply.)"""
        text = str(error)
        cuda_error = ("CUDA error" in text or type(error).__name__ == "AcceleratorError") and (
            "out of memory" not in text
        )
        return self.check_gpus(deep=cuda_error)

    def inject_gpu_fault(self, index: int, reason: str = "injected fault") -> list[str]:
        """Fault injection (admin only): GPU ``index`` behaves as after an Xid error — its next probe fails.
        Probes at once; returns the models that failed."""
        if not 0 <= index < len(self.tiers):
            raise EngineError(
                "InvalidRequest", f"GPU {index} does not exist on this node ({len(self.tiers)} GPUs)"
            )
        self.tiers[index].fault = reason
        with self._lock:
            before = {name for name, r in self._models.items() if r.state == "failed"}
        self.check_gpus()
        with self._lock:
            return sorted(
                name for name, r in self._models.items() if r.state == "failed" and name not in before
            )

    # -- inference ----------------------------------------------------------------------------------
    def submit(
        self,
        name: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        on_event: Callable[[RequestEvent], None] | None = None,
    ) -> Request:
        """Queues a generation; events arrive on `on_event` (called on the model's thread) as tokens come."""
        runner = self._runner(name)
        prompt_ids = self.encode(name, prompt) if isinstance(prompt, str) else list(prompt)
        request = Request(
            prompt_ids=prompt_ids,
            params=params or SamplingParams(),
            on_event=on_event,
        )
        return runner.submit(request)

    def generate(
        self,
        name: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        timeout_seconds: float | None = 300.0,
    ) -> Request:
        """Blocking convenience: submit and wait; raises the request's EngineError if it failed."""
        return self.submit(name, prompt, params).wait(timeout_seconds)

    def encode(self, name: str, text: str) -> list[int]:
        tokenizer = self._runner(name).weights.tokenizer
        _check_text(text)
        try:
            ids: list[int] = tokenizer(text).input_ids
        except Exception as exc:  # the text is the client's: its failure is a bad request, not ours
            raise EngineError("InvalidRequest", f"the prompt cannot be tokenized: {exc}") from exc
        return ids

    def chat_prompt(self, name: str, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self._runner(name).weights.tokenizer
        for message in messages:
            _check_text(message["content"])
        if getattr(tokenizer, "chat_template", None):
            try:
                ids: list[int] = tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=True
                )
            except Exception as exc:  # e.g. the template refuses this order of roles
                refusal = f"the chat template refuses these messages: {exc}"
                raise EngineError("InvalidRequest", refusal) from exc
            return ids
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self.encode(name, text)

    def token_texts(self, name: str, token_ids: list[int]) -> list[str]:
        """Each token's own text (as OpenAI's logprobs show tokens)."""
        tokenizer = self._runner(name).weights.tokenizer
        return [str(tokenizer.decode([token_id])) for token_id in token_ids]

    def wait_until_ready(self, name: str, timeout_seconds: float) -> bool:
        return self._runner(name).wait_until_ready(timeout_seconds)

    # -- reports ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def runner(self, name: str) -> ModelRunner:
        return self._runner(name)

    def status(self, name: str) -> ModelStatus:
        runner = self._runner(name)
        return ModelStatus(
            name=name,
            path=str(runner.weights.path),
            state=runner.state,
            queue_depth=runner.queue_depth,
            active_sequences=runner.active_sequences,
            residency=runner.residency(),
            timings=runner.timings,
        )

    def residency(self, name: str) -> ResidencyReport:
        return self._runner(name).residency()

    def node_report(self) -> NodeReport:
        """The node's GPUs: each one's, and their sums (a lost GPU's budget is no longer counted)."""
        nvml = nvml_memory_bytes(self.tier.device)
        gpus = [
            GpuReport(
                index=tier.index,
                device=str(tier.device),
                gpu_name=tier.gpu_name,
                budget_bytes=tier.budget_bytes,
                reserved_bytes=tier.reserved_bytes(),
                allocated_bytes=tier.allocated_bytes(),
                host_to_device_peak=tier.host_to_device_peak,
                lost=tier.lost,
            )
            for tier in self.tiers
        ]
        live = [gpu for gpu in gpus if gpu.lost is None]
        return NodeReport(
            nvml_used_bytes=nvml[0] if nvml else None,
            nvml_total_bytes=nvml[1] if nvml else None,
            node=self.node,
            device=str(self.tier.device),
            gpu_name=self.tier.gpu_name,
            emulated=self.tier.emulated,
            budget_bytes=sum(gpu.budget_bytes for gpu in live),
            reserved_bytes=sum(gpu.reserved_bytes for gpu in gpus),
            allocated_bytes=sum(gpu.allocated_bytes for gpu in gpus),
            host_to_device_peak=self.tier.host_to_device_peak,
            gpus=gpus,
        )

    def _runner(self, name: str) -> ModelRunner:
        with self._lock:
            runner = self._models.get(name)
        if runner is None:
            raise EngineError("ModelNotLoaded", f"no model named {name!r} is loaded on this node")
        return runner


def _check_text(text: str) -> None:
    """Refuses text that is not valid Unicode (a lone UTF-16 surrogate, which JSON can smuggle in)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EngineError(
            "InvalidRequest", f"the prompt is not valid Unicode: lone surrogate at character {exc.start}"
        ) from exc


def _check_slo(min_decode_tokens_per_second: float | None) -> None:
    slo = min_decode_tokens_per_second
    if slo is not None and not (math.isfinite(slo) and slo > 0):
        raise EngineError(
            "InvalidRequest", f"the decode SLO must be a positive number of tokens/s, got {slo}"
        )
