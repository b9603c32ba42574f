"""A model split by layers across several EMULATED GPUs (separate CPU memory pools) plus host memory: the
same greedy tokens as the unsplit model, preempt/resume and live GPU changes lose nothing, budgets per GPU,
GPU loss."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from residency.modelgen import make_model
from residency_worker.engine import Engine, EngineError, ModelOptions, SamplingParams
from residency_worker.engine.generate import RequestEvent
from residency_worker.engine.tiers import make_gpu_tiers

pytestmark = pytest.mark.component

PROMPTS = ["Hello world", "The scheduler places each model", "Resume copies the weights back"]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
LONG = SamplingParams(max_tokens=40, ignore_eos=True)
MIB = 2**20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    return make_model(
        root / "llama8", "llama", "tiny", seed=3, dtype="float32", overrides={"num_hidden_layers": 8}
    )


@pytest.fixture
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine(
        make_gpu_tiers([16 * MIB], emulated_count=3), [model_dir.parent], node="split", calibration_bytes=0
    )
    yield eng
    eng.close()


def _options(
    fraction: float, mode: str = "stream", gpus: tuple[tuple[int, float], ...] = (), **kw: Any
) -> ModelOptions:
    options = ModelOptions(
        dtype="float32",
        resident_fraction=fraction,
        decode_mode=mode,  # type: ignore[arg-type]
        prefill_mode="stream",
        max_sequence_length=128,
        max_batch_size=4,
        gpus=gpus,
    )
    return dataclasses.replace(options, **kw)


def _batch(engine: Engine, name: str, params: SamplingParams = GREEDY) -> list[list[int]]:
    requests = [engine.submit(name, prompt, params) for prompt in PROMPTS]
    return [request.wait(60).token_ids for request in requests]


class _Gate:
    """Set once a request has produced ``after`` tokens (the moment to preempt or move it)."""

    def __init__(self, after: int) -> None:
        self.after, self.count, self.reached = after, 0, threading.Event()

    def __call__(self, event: RequestEvent) -> None:
        if event.token_id is not None:
            self.count += 1
            if self.count >= self.after:
                self.reached.set()


@pytest.mark.parametrize(
    ("gpus", "mode"),
    [
        (((0, 0.3), (1, 0.3)), "stream"),
        (((0, 0.25), (1, 0.25), (2, 0.25)), "cpu"),
        (((2, 0.2), (0, 0.4), (1, 0.2)), "stream"),
    ],
)
def test_split_greedy_tokens_equal_unsplit(
    engine: Engine, model_dir: Path, gpus: tuple[tuple[int, float], ...], mode: str
) -> None:
    """An issue goal: split across 2 and 3 emulated GPUs plus host, greedy tokens equal the unsplit ones."""
    engine.load("whole", str(model_dir), _options(1.0))
    expected = _batch(engine, "whole")
    engine.unload("whole")
    fraction = sum(share for _, share in gpus)
    engine.load("split", str(model_dir), _options(fraction, mode, gpus))
    report = engine.residency("split")
    assert [gpu.index for gpu in report.gpus] == [index for index, _ in gpus]
    owner = engine.runner("split").owner
    unit_fraction = max(
        engine.runner("split").weights.unit_bytes(u) for u in engine.runner("split").weights.units
    )
    for gpu, (index, share) in zip(report.gpus, gpus, strict=True):
        held = engine.tiers[index].allocated_bytes(owner, "weights")
        assert held > 0, f"GPU {index} holds nothing of its share {share}"
        assert gpu.resident_fraction == held / report.weight_bytes  # measured from the tier itself
        # each GPU holds its share to within half of the largest unit
        assert abs(held - share * report.weight_bytes) <= unit_fraction / 2 + 1
        assert engine.tiers[index].reserved_bytes(owner) == gpu.reserved_bytes > 0
    assert report.offloaded_units, "a remainder stays in host memory"
    assert abs(sum(g.resident_fraction for g in report.gpus) - report.resident_fraction) < 1e-9
    assert _batch(engine, "split") == expected


def test_split_layers_are_contiguous_in_pipeline_order(engine: Engine, model_dir: Path) -> None:
    engine.load("m", str(model_dir), _options(0.9, "stream", ((1, 0.45), (0, 0.45))))
    runner = engine.runner("m")
    homes = runner.placed.flat_homes()
    layers = [i for i in range(8) if f"layer.{i}" in homes]
    gpu_of = [homes[f"layer.{i}"].index for i in layers]
    assert gpu_of == sorted(gpu_of, key=[1, 0].index), "GPU 1 (first in the pipeline) holds the first layers"
    assert set(gpu_of) == {0, 1}
    if "head" in homes:
        assert homes["head"].index == 0, "the head goes with the last GPU of the pipeline"
    # each layer's KV lives with its layer
    for layer in layers:
        assert runner.pool is not None and runner.pool.home(layer) is homes[f"layer.{layer}"]


def test_split_preempt_resume_mid_generation_loses_nothing(engine: Engine, model_dir: Path) -> None:
    gpus = ((0, 0.3), (1, 0.3), (2, 0.2))
    engine.load("m", str(model_dir), _options(0.8, "stream", gpus))
    expected = _batch(engine, "m", LONG)
    gate = _Gate(after=5)
    requests = [engine.submit("m", p, LONG, on_event=gate if i == 0 else None) for i, p in enumerate(PROMPTS)]
    assert gate.reached.wait(30)
    owner = engine.runner("m").owner
    preempted = engine.preempt("m")
    assert preempted.kv_save.moved_bytes > 0
    for tier in engine.tiers:  # every GPU of the split gave its memory back
        assert tier.allocated_bytes(owner) == 0 and tier.reserved_bytes(owner) == 0
    parked = len(requests[0].token_ids)
    assert not requests[0].done.wait(0.3) and len(requests[0].token_ids) == parked
    resumed = engine.resume("m")
    assert resumed.kv_restore.moved_bytes == preempted.kv_save.moved_bytes
    assert all(engine.tiers[index].allocated_bytes(owner, "weights") > 0 for index, _ in gpus)
    assert [r.wait(60).token_ids for r in requests] == expected


@pytest.mark.parametrize(
    "moved",
    [((2, 0.5), (0, 0.3)), ((1, 0.0),)],
    ids=["other-gpus", "one-gpu-nothing-resident"],
)
def test_split_moved_while_preempted_resumes_where_it_was_sent(
    engine: Engine, model_dir: Path, moved: tuple[tuple[int, float], ...]
) -> None:
    engine.load("m", str(model_dir), _options(0.6, "stream", ((0, 0.3), (1, 0.3))))
    expected = _batch(engine, "m", LONG)
    gate = _Gate(after=5)
    requests = [engine.submit("m", p, LONG, on_event=gate if i == 0 else None) for i, p in enumerate(PROMPTS)]
    assert gate.reached.wait(30)
    engine.preempt("m")
    fraction = sum(share for _, share in moved)
    engine.set_residency("m", fraction, gpus=moved, decode_mode="cpu" if fraction == 0 else "stream")
    resumed = engine.resume("m")
    assert resumed.kv_restore.moved_bytes > 0
    owner = engine.runner("m").owner
    used = {index for index, _ in moved}
    assert all(engine.tiers[i].reserved_bytes(owner) == 0 for i in range(3) if i not in used)
    assert [gpu.index for gpu in engine.residency("m").gpus] == [index for index, _ in moved]
    assert [r.wait(60).token_ids for r in requests] == expected


def test_split_changes_gpus_live_mid_generation(engine: Engine, model_dir: Path) -> None:
    """Promote/demote of a split: new shares, another GPU set, then one GPU — same tokens all the way."""
    engine.load("m", str(model_dir), _options(0.6, "stream", ((0, 0.3), (1, 0.3))))
    expected = _batch(engine, "m", LONG)
    gate = _Gate(after=4)
    requests = [engine.submit("m", p, LONG, on_event=gate if i == 0 else None) for i, p in enumerate(PROMPTS)]
    assert gate.reached.wait(30)
    owner = engine.runner("m").owner
    moved = engine.set_residency("m", 0.9, gpus=((2, 0.5), (1, 0.4)))
    assert [gpu.index for gpu in moved.gpus] == [2, 1]
    assert engine.tiers[0].reserved_bytes(owner) == 0, "the GPU it left holds nothing of it"
    single = engine.set_residency("m", 0.5, gpus=((1, 0.5),), decode_mode="cpu")
    assert [gpu.index for gpu in single.gpus] == [1]
    assert engine.tiers[2].reserved_bytes(owner) == 0
    assert [r.wait(60).token_ids for r in requests] == expected


def test_over_budget_share_is_refused_up_front_on_every_gpu(model_dir: Path) -> None:
    tiers = make_gpu_tiers([16 * MIB, 1 * MIB], emulated_count=2)
    engine = Engine(tiers, [model_dir.parent], node="tight", calibration_bytes=0)
    try:
        with pytest.raises(EngineError) as refused:
            engine.load("m", str(model_dir), _options(0.8, "stream", ((0, 0.4), (1, 0.4))))
        assert refused.value.reason == "PlacementDoesNotFit" and "GPU 1" in refused.value.message
        assert tiers[0].reserved_bytes() == 0 and tiers[1].reserved_bytes() == 0, "all or nothing"
        with pytest.raises(EngineError) as unknown:
            engine.load("m", str(model_dir), _options(0.5, "stream", ((0, 0.25), (3, 0.25))))
        assert unknown.value.reason == "InvalidRequest" and "GPU 3 does not exist" in unknown.value.message
        engine.load("m", str(model_dir), _options(0.8, "stream", ((0, 0.8),)))  # the same on the roomy GPU
        assert _batch(engine, "m")
    finally:
        engine.close()


def test_lost_gpu_fails_its_models_and_the_others_keep_serving(engine: Engine, model_dir: Path) -> None:
    engine.load("alone", str(model_dir), _options(0.6, "stream"))  # GPU 0
    engine.load("split", str(model_dir), _options(0.6, "stream", ((1, 0.3), (2, 0.3))))
    before = _batch(engine, "alone")
    waiting = engine.submit("split", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
    split_owner = engine.runner("split").owner
    failed = engine.inject_gpu_fault(2, "Xid 79: GPU has fallen off the bus (injected)")
    assert failed == ["split"]
    status = engine.status("split")
    assert status.state == "failed"
    failure = engine.runner("split").failure
    assert failure is not None and failure.reason == "GpuLost" and "GPU 2" in failure.message
    assert engine.tiers[1].reserved_bytes(split_owner) == 0, "the split gave back its other GPU"
    waiting.done.wait(30)
    assert waiting.finish_reason == "error"
    with pytest.raises(EngineError) as refused:
        engine.submit("split", PROMPTS[0], GREEDY)
    assert refused.value.reason == "GpuLost"
    assert _batch(engine, "alone") == before, "the model on another GPU keeps serving"
    report = engine.node_report()
    assert [gpu.lost is not None for gpu in report.gpus] == [False, False, True]
    assert report.budget_bytes == 2 * 16 * MIB
    with pytest.raises(EngineError) as lost:
        engine.set_residency("alone", 0.6, gpus=((2, 0.6),))
    assert lost.value.reason == "GpuLost"
    engine.unload("split")
    engine.load("split", str(model_dir), _options(0.6, "stream", ((1, 0.6),)))  # placed again, elsewhere
    assert _batch(engine, "split")


def test_a_cuda_error_in_a_step_fails_the_lost_gpus_model_with_gpu_lost(
    engine: Engine, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step path: a step that raises a CUDA error probes the GPUs; the one found lost fails its models
    (reason GpuLost, not InferenceFailed) and a model on another GPU is untouched. (Emulated: the fault flag
    stands in for the driver's answer; the step's error is raised by hand.)"""
    engine.load("alone", str(model_dir), _options(0.5, "stream"))
    engine.load("split", str(model_dir), _options(0.6, "stream", ((1, 0.3), (2, 0.3))))
    runner = engine.runner("split")
    assert runner.executor is not None

    def broken(*args: Any, **kwargs: Any) -> Any:
        engine.tiers[1].fault = "Xid 48: double bit ECC error (injected)"
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner.executor, "forward", broken)
    request = engine.submit("split", PROMPTS[0], GREEDY)
    assert request.done.wait(30) and request.finish_reason == "error"
    assert runner.state == "failed" and runner.failure is not None and runner.failure.reason == "GpuLost"
    assert engine.tiers[1].lost and engine.tiers[2].lost is None
    assert engine.generate("alone", PROMPTS[0], GREEDY).token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_split_greedy_tokens_equal_unsplit(model_dir: Path) -> None:
    """On real GPUs: split across two CUDA GPUs plus host (one GPU plus host where the machine has one)."""
    count = min(torch.cuda.device_count(), 2)
    engine = Engine(
        make_gpu_tiers([512 * MIB], devices=list(range(count))), [model_dir.parent], calibration_bytes=0
    )
    try:
        engine.load("whole", str(model_dir), _options(1.0))
        expected = _batch(engine, "whole")
        engine.unload("whole")
        gpus = ((0, 0.3), (1, 0.3)) if count == 2 else ((0, 0.6),)
        engine.load("split", str(model_dir), _options(0.6, "stream", gpus))
        devices = {tier.device for tier in engine.runner("split").placed.flat_homes().values()}
        assert len(devices) == count
        assert _batch(engine, "split") == expected
    finally:
        engine.close()
