"""The report's measurements, all in one run on one device, each next to its baseline.

Sections (the study's findings, then the peers):
  curves        decode tokens/s against resident fraction, per shape, mode and sequence length  (a)
  preemption    KV save/restore at two context lengths vs the weight reload; reload ÷ pinned peak
                next to a naive per-tensor reload                                                (b)
  amplification reload and offloaded decode from pinned vs pageable host memory                  (c)
  peers         Accelerate `device_map` offload at the same GPU memory; full unload +
                `from_pretrained` as the evict baseline
The time budget is checked before each step: what does not fit is listed as skipped, never invented.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from residency.modelgen import PRESETS, make_model
from residency_worker.engine import Engine, ModelOptions, SamplingParams
from residency_worker.engine.generate import RequestEvent
from residency_worker.engine.profile import ProfileSettings, profile_model
from residency_worker.engine.tiers import GpuTier
from residency_worker.engine.types import ExecutionMode, TransferTiming, as_dict

Progress = Callable[[str], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """A model shape: a modelgen preset at its own depth (or `layers` deep), as `arch`."""

    preset: str
    arch: str
    layers: int | None = None

    @property
    def label(self) -> str:
        return self.preset if self.layers is None else f"{self.preset} ({self.layers} layers)"

    @property
    def slug(self) -> str:
        return self.preset if self.layers is None else f"{self.preset}-L{self.layers}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """`preset[:layers][@arch]`, e.g. `qwen2.5-0.5b`, `llama-3-8b:16`, `tiny@qwen2`."""
        spec, _, arch = text.partition("@")
        preset, _, layers = spec.partition(":")
        if preset not in PRESETS:
            raise ValueError(f"unknown shape {preset!r}: one of {', '.join(PRESETS)}")
        arch = arch or ("qwen2" if preset.startswith("qwen") else "llama")
        return cls(preset, arch, int(layers) if layers else None)


SECTIONS = ("preemption", "peers", "pageable", "curves")


@dataclass(frozen=True)
class ReportSettings:
    shapes: tuple[Shape, ...]
    fractions: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5, 0.25, 0.0)
    sequence_lengths: tuple[int, ...] = (512, 4096)
    modes: tuple[ExecutionMode, ...] = ("stream", "cpu")
    decode_tokens: int = 16
    trials: int = 2
    kv_tokens: tuple[int, ...] = (1024, 5120)
    reload_trials: int = 3
    peer_fraction: float = 0.5
    peer_sequence_length: int = 512
    peer_decode_tokens: int = 8
    bandwidth_bytes: int = 1 << 30
    dtype: str = "bfloat16"
    budget_seconds: float | None = None
    sections: tuple[str, ...] = SECTIONS

    @classmethod
    def quick(cls, shapes: tuple[Shape, ...] | None = None) -> ReportSettings:
        """A reduced grid of tiny shapes: checks the pipeline on a CPU in well under a minute."""
        return cls(
            shapes=shapes or (Shape("tiny", "llama"), Shape("small", "qwen2")),
            fractions=(1.0, 0.5, 0.0),
            sequence_lengths=(32, 128),
            decode_tokens=4,
            trials=1,
            kv_tokens=(64, 256),
            reload_trials=2,
            peer_sequence_length=32,
            peer_decode_tokens=4,
            bandwidth_bytes=32 << 20,
        )


@dataclass
class Preemption:
    kv_tokens: int
    kv_save: TransferTiming
    reload: TransferTiming
    kv_restore: TransferTiming
    preempt_seconds: float
    resume_seconds: float


@dataclass
class ShapeResult:
    shape: Shape
    weight_bytes: int = 0
    layers: int = 0
    kv_bytes_per_token: int = 0
    max_position_embeddings: int = 0
    make_seconds: float = 0.0
    curve_points: list[dict[str, Any]] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    reload_pinned: list[TransferTiming] = field(default_factory=list)  # resume with no KV in flight
    resume_seconds: list[float] = field(default_factory=list)
    naive_reload: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds)
    reload_pageable: list[TransferTiming] = field(default_factory=list)
    peer: dict[str, Any] = field(default_factory=dict)
    amplification: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shape"] = {**dataclasses.asdict(self.shape), "label": self.shape.label}
        return data


@dataclass
class Budget:
    """Wall-clock budget of the whole run; each step asks before it starts."""

    seconds: float | None
    started: float = field(default_factory=time.monotonic)
    skipped: list[str] = field(default_factory=list)

    @property
    def deadline(self) -> float | None:
        return None if self.seconds is None else self.started + self.seconds

    def allows(self, step: str) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped.append(f"{step}: time budget ({self.seconds:.0f} s) spent")
            return False
        return True


def _prompt(length: int, vocab: int, salt: int = 7) -> list[int]:
    return [(salt * i + 3) % vocab for i in range(length)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_shape(shape: Shape, root: Path, dtype: str, device: str) -> Path:
    """The shape's random model directory under `root`, made once and reused across runs."""
    directory = root / f"{shape.slug}-{shape.arch}-{dtype}"
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return directory
    overrides = {"num_hidden_layers": shape.layers} if shape.layers else None
    return make_model(
        directory, arch=shape.arch, preset=shape.preset, dtype=dtype, overrides=overrides, device=device
    )


def engine_decode_rate(engine: Engine, name: str, prompt: list[int], tokens: int, trials: int) -> float:
    """Median decode tokens/s of one sequence after `prompt` (one warm-up request first)."""
    engine.generate(name, prompt, SamplingParams(max_tokens=2, ignore_eos=True), timeout_seconds=None)
    rates = []
    for _ in range(trials):
        request = engine.generate(
            name, prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), timeout_seconds=None
        )
        assert request.first_token_at is not None and request.finished_at is not None
        rates.append((tokens - 1) / max(request.finished_at - request.first_token_at, 1e-9))
    return float(statistics.median(rates))


def naive_reload(tier: GpuTier, model_dir: Path) -> tuple[int, float]:
    """What a plain reload does: a pageable state dict, copied tensor by tensor (`.to(device)`)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    moved_bytes = sum(t.numel() * t.element_size() for t in state.values())
    tier.synchronize()
    start = time.perf_counter()
    if tier.device.type == "cuda":
        on_device = {name: t.to(tier.device) for name, t in state.items()}
    else:  # the emulated "device" is a separate CPU pool: a per-tensor copy is the honest equivalent
        on_device = {name: t.clone() for name, t in state.items()}
    tier.synchronize()
    seconds = time.perf_counter() - start
    del on_device, state
    return moved_bytes, seconds


def measure_curves(
    engine: Engine,
    model_dir: Path,
    result: ShapeResult,
    settings: ReportSettings,
    budget: Budget,
    progress: Progress,
) -> None:
    """Finding (a): the sensitivity curves, through the same profiler `residency profile` uses.

    Prefill streams offloaded layers in both modes (it is compute-bound, and computing a long
    prompt on the host would only measure the CPU); the mode under test is the decode mode.
    """
    profile = profile_model(
        engine,
        str(model_dir),
        ProfileSettings(
            dtype=settings.dtype,
            fractions=settings.fractions,
            sequence_lengths=settings.sequence_lengths,
            modes=settings.modes,
            decode_tokens=settings.decode_tokens,
            trials=settings.trials,
            prefill_mode="stream",
            deadline=budget.deadline,
        ),
        progress=lambda text: progress(f"{result.shape.label}: {text}"),
    )
    result.curve_points = [as_dict(p) for p in profile.points]
    budget.skipped.extend(f"{result.shape.label} curve {s}" for s in profile.skipped)


def _load(
    engine: Engine,
    name: str,
    model_dir: Path,
    settings: ReportSettings,
    fraction: float,
    max_sequence_length: int,
) -> None:
    """Loads `model_dir` as `name` for one sequence at a time, streaming whatever is offloaded."""
    engine.load(
        name,
        str(model_dir),
        ModelOptions(
            dtype=settings.dtype,
            resident_fraction=fraction,
            decode_mode="stream",
            prefill_mode="stream",
            max_batch_size=1,
            max_sequence_length=max_sequence_length,
            max_queue=1,
        ),
    )


def measure_preemption(
    engine: Engine, model_dir: Path, result: ShapeResult, settings: ReportSettings, budget: Budget
) -> None:
    """Finding (b): preempt with a sequence in flight at each context length, then resume."""
    longest = min(max(settings.kv_tokens), result.max_position_embeddings - 80)
    name = f"preempt-{result.shape.slug}"
    _load(engine, name, model_dir, settings, 1.0, longest + 72)
    try:
        vocab = engine.runner(name).spec.vocab_size
        for tokens in settings.kv_tokens:
            tokens = min(tokens, longest)
            if not budget.allows(f"{result.shape.label} preemption at {tokens} tokens"):
                continue
            started = threading.Event()

            def on_event(event: RequestEvent, flag: threading.Event = started) -> None:
                if event.token_id is not None:
                    flag.set()

            request = engine.submit(
                name, _prompt(tokens, vocab), SamplingParams(max_tokens=64, ignore_eos=True), on_event
            )
            started.wait(600)
            preempt = engine.preempt(name)
            resume = engine.resume(name)
            request.wait(600)
            result.preemptions.append(
                Preemption(
                    kv_tokens=tokens,
                    kv_save=preempt.kv_save,
                    reload=resume.reload,
                    kv_restore=resume.kv_restore,
                    preempt_seconds=preempt.seconds,
                    resume_seconds=resume.seconds,
                )
            )
        for _ in range(settings.reload_trials):  # the weights alone: the number the evict baseline meets
            engine.preempt(name)
            resume = engine.resume(name)
            result.reload_pinned.append(resume.reload)
            result.resume_seconds.append(resume.seconds)
    finally:
        engine.unload(name)
    gc.collect()
    for _ in range(settings.reload_trials):
        result.naive_reload.append(naive_reload(engine.tier, model_dir))
        engine.tier.empty_cache()


def measure_pageable(
    engine: Engine, model_dir: Path, result: ShapeResult, settings: ReportSettings, ours_stream: float | None
) -> None:
    """Finding (c): the same reload and streamed decode with the host cache left pageable."""
    name = f"pageable-{result.shape.slug}"
    _load(
        engine,
        name,
        model_dir,
        settings,
        1.0,
        settings.peer_sequence_length + settings.peer_decode_tokens + 8,
    )
    try:
        for _ in range(settings.reload_trials):
            engine.preempt(name)
            result.reload_pageable.append(engine.resume(name).reload)
        engine.set_residency(name, settings.peer_fraction, decode_mode="stream", prefill_mode="stream")
        vocab = engine.runner(name).spec.vocab_size
        rate = engine_decode_rate(
            engine,
            name,
            _prompt(settings.peer_sequence_length, vocab),
            settings.peer_decode_tokens,
            settings.trials,
        )
    finally:
        engine.unload(name)
    pinned = statistics.median(t.gbps for t in result.reload_pinned) if result.reload_pinned else None
    pageable = statistics.median(t.gbps for t in result.reload_pageable)
    result.amplification = {
        "reload_gbps_pinned": pinned,
        "reload_gbps_pageable": pageable,
        "decode_stream_pinned": ours_stream,
        "decode_stream_pageable": rate,
        "resident_fraction": settings.peer_fraction,
    }


def hf_model(model_dir: Path, tier: GpuTier, dtype: torch.dtype, gpu_bytes: int | None) -> tuple[Any, str]:
    """transformers' model: Accelerate offload at `gpu_bytes` on a GPU, whole on the device otherwise."""
    from transformers import AutoModelForCausalLM

    if tier.device.type != "cuda":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        return model, "transformers on the CPU (emulated: no GPU to offload to)"
    if gpu_bytes is None:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map={"": tier.device.index or 0}
        )
        return model, "transformers, whole model on the GPU"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        device_map="auto",
        max_memory={tier.device.index or 0: max(gpu_bytes, 1), "cpu": 1 << 40},
    )
    label = f"Accelerate device_map offload, GPU limit {gpu_bytes / 2**30:.2f} GiB"
    if execution_device(model).type == "cpu":
        # Accelerate fills devices in module order: when the first module (the embedding) exceeds the GPU
        # limit, every module lands on the CPU and the model runs there.
        label += " (Accelerate placed every module on the CPU: its first exceeds the limit)"
    return model, label


def execution_device(model: Any) -> torch.device:
    """Where a transformers model computes: with an Accelerate device map, its first GPU (offloaded modules
    are copied there for their forward), or the CPU when the map holds no GPU; else its parameters'."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
        return (
            torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0])
            if gpus
            else torch.device("cpu")
        )
    return torch.device(model.device)


def generate_seconds(
    model: Any, ids: torch.Tensor, tokens: int, *, device: torch.device, static_cache: bool = False
) -> float:
    """Seconds of greedy `generate` for exactly `tokens` new tokens (the device synchronised around it);
    ``static_cache``: transformers' preallocated KV cache instead of its dynamic one."""
    extra = {"cache_implementation": "static"} if static_cache else {}
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )
    _synchronize(device)
    return time.perf_counter() - start


def hf_decode_rate(model: Any, prompt: list[int], tokens: int, trials: int) -> float:
    """Decode tokens/s of `generate`: (time of N new tokens - time of 1) / (N - 1), median of trials."""
    device = execution_device(model)
    ids = torch.tensor([prompt], device=device)

    def timed(new_tokens: int) -> float:
        return generate_seconds(model, ids, new_tokens, device=device)

    timed(2)
    rates = [(tokens - 1) / max(timed(tokens) - timed(1), 1e-9) for _ in range(trials)]
    return float(statistics.median(rates))


def measure_peers(
    engine: Engine, model_dir: Path, result: ShapeResult, settings: ReportSettings, budget: Budget
) -> None:
    """Ours at the peer fraction (both modes) next to Accelerate offload with the same GPU bytes; then
    a full `from_pretrained` onto the GPU (the evict baseline) next to our resume."""
    name = f"peer-{result.shape.slug}"
    _load(
        engine,
        name,
        model_dir,
        settings,
        settings.peer_fraction,
        settings.peer_sequence_length + settings.peer_decode_tokens + 8,
    )
    ours: dict[str, float] = {}
    try:
        residency = engine.residency(name)
        prompt = _prompt(settings.peer_sequence_length, engine.runner(name).spec.vocab_size)
        for mode in settings.modes:
            engine.set_residency(name, settings.peer_fraction, decode_mode=mode, prefill_mode="stream")
            ours[mode] = engine_decode_rate(
                engine, name, prompt, settings.peer_decode_tokens, settings.trials
            )
    finally:
        engine.unload(name)
    gc.collect()
    engine.tier.empty_cache()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[settings.dtype]
    peer: dict[str, Any] = {
        "resident_fraction": residency.resident_fraction,
        "resident_weight_bytes": residency.resident_weight_bytes,
        "ours_tokens_per_second": ours,
    }
    if budget.allows(f"{result.shape.label} Accelerate offload baseline"):
        model, label = hf_model(model_dir, engine.tier, dtype, residency.resident_weight_bytes)
        peer["accelerate_label"] = label
        peer["accelerate_tokens_per_second"] = hf_decode_rate(
            model, prompt, settings.peer_decode_tokens, settings.trials
        )
        del model
        gc.collect()
        engine.tier.empty_cache()
    if budget.allows(f"{result.shape.label} from_pretrained reload baseline"):
        seconds = []
        for _ in range(max(1, settings.reload_trials - 1)):
            _synchronize(engine.tier.device)
            start = time.perf_counter()
            model, label = hf_model(model_dir, engine.tier, dtype, None)
            _synchronize(engine.tier.device)
            seconds.append(time.perf_counter() - start)
            del model
            gc.collect()
            engine.tier.empty_cache()
        peer["from_pretrained_label"] = label
        peer["from_pretrained_seconds"] = seconds
    result.peer = peer


def run_shape(
    shape: Shape,
    models_root: Path,
    engine: Engine,
    pageable_engine: Engine,
    settings: ReportSettings,
    budget: Budget,
    progress: Progress,
    *,
    sections: tuple[str, ...],
) -> ShapeResult:
    """The named sections of one shape, in the order of SECTIONS."""
    from residency.modeldir import inspect_model_dir, read_config

    result = ShapeResult(shape)
    start = time.perf_counter()
    model_dir = make_shape(
        shape, models_root, settings.dtype, "cuda" if engine.tier.device.type == "cuda" else "cpu"
    )
    result.make_seconds = time.perf_counter() - start
    info = inspect_model_dir(str(model_dir), [models_root], settings.dtype)
    result.weight_bytes = info.weight_bytes
    result.layers = info.num_layers
    result.kv_bytes_per_token = info.kv_bytes_per_token
    result.max_position_embeddings = int(read_config(model_dir).get("max_position_embeddings", 2048))
    steps: list[tuple[str, Callable[[], None]]] = [
        ("preemption", lambda: measure_preemption(engine, model_dir, result, settings, budget)),
        ("peers", lambda: measure_peers(engine, model_dir, result, settings, budget)),
        (
            "pageable",
            lambda: measure_pageable(
                pageable_engine,
                model_dir,
                result,
                settings,
                result.peer.get("ours_tokens_per_second", {}).get("stream"),
            ),
        ),
    ]
    steps.append(("curves", lambda: measure_curves(engine, model_dir, result, settings, budget, progress)))
    for step, run in steps:
        if step not in sections:
            continue
        if budget.allows(f"{shape.label} {step}"):
            progress(f"{shape.label}: {step}")
            try:
                run()
            except Exception as exc:  # one broken step must not cost the rest of a scarce GPU run
                log.exception("report step %s of %s failed", step, shape.label)
                budget.skipped.append(f"{shape.label} {step}: FAILED {type(exc).__name__}: {exc}")
                for name in engine.names() + pageable_engine.names():
                    (engine if name in engine.names() else pageable_engine).unload(name)
                gc.collect()
                engine.tier.empty_cache()
    return result
