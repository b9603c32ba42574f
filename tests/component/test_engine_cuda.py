"""The engine on a real CUDA GPU (skipped without one): pinned transfers, streaming, preempt/resume."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from residency.modelgen import make_model
from residency_worker.engine import Engine, ModelOptions, SamplingParams, make_gpu_tier
from residency_worker.engine.generate import RequestEvent

pytestmark = [
    pytest.mark.component,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PROMPTS = ["Hello world", "The scheduler places each model", "0123"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = tmp_path_factory.mktemp("models")
    make_model(root / "llama", "llama", "tiny", seed=1, dtype="bfloat16")
    eng = Engine(make_gpu_tier(2 * 2**30), [root], node="gpu-test", calibration_bytes=64 * 2**20)
    yield eng
    eng.close()


def test_stream_mode_is_exact_on_the_gpu_and_transfers_are_pinned(engine: Engine) -> None:
    root = engine.models_roots[0]
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    outputs = []
    for fraction in (1.0, 0.5, 0.0):
        name = f"r{int(fraction * 100)}"
        report = engine.load(
            name,
            str(root / "llama"),
            ModelOptions(
                resident_fraction=fraction, decode_mode="stream", max_sequence_length=256, max_batch_size=4
            ),
        )
        assert not report.residency.emulated and report.host_to_device.path == "pinned"
        requests = [engine.submit(name, p, greedy) for p in PROMPTS]
        outputs.append([r.wait(60).token_ids for r in requests])
        engine.unload(name)
    assert outputs[0] == outputs[1] == outputs[2]
    peak = engine.node_report().host_to_device_peak
    assert peak is not None and peak.path == "pinned" and peak.gbps > 1


def test_preempt_resume_on_the_gpu_continues_exactly(engine: Engine) -> None:
    root = engine.models_roots[0]
    engine.load(
        "m",
        str(root / "llama"),
        ModelOptions(resident_fraction=0.5, decode_mode="stream", max_sequence_length=256, max_batch_size=4),
    )
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = [engine.generate("m", p, params).token_ids for p in PROMPTS]
    reached = threading.Event()

    def gate(event: RequestEvent) -> None:
        if event.token_id is not None:
            reached.set()

    requests = [
        engine.submit("m", p, params, on_event=gate if i == 0 else None) for i, p in enumerate(PROMPTS)
    ]
    assert reached.wait(30)
    before = torch.cuda.memory_allocated()
    preempt = engine.preempt("m")
    assert preempt.kv_save.path == "pinned" and torch.cuda.memory_allocated() < before
    resume = engine.resume("m")
    assert resume.reload.path == "pinned" and resume.reload.gbps > 0
    assert [r.wait(60).token_ids for r in requests] == expected
    engine.unload("m")
