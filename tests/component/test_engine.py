"""The torch engine on tiny random models, CPU, emulated GPU tier: numerics, residency, batching, preempt."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from residency.modelgen import make_model
from residency_worker.engine import (
    Engine,
    EngineError,
    ModelOptions,
    SamplingParams,
    cpu_kernels,
    make_gpu_tier,
)
from residency_worker.engine.generate import Request, RequestEvent

pytestmark = pytest.mark.component

PROMPTS = ["Hello world", "The scheduler places each model", "Resume copies the weights back", "0123"]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for arch in ("llama", "qwen2", "qwen3", "mistral", "phi3"):
        make_model(root / arch, arch, "tiny", seed=1, dtype="float32")
    return root


@pytest.fixture
def engine(models_root: Path) -> Iterator[Engine]:
    tier = make_gpu_tier(32 * 2**20, force_emulated=True)
    eng = Engine(tier, [models_root], node="test", calibration_bytes=2**20)
    yield eng
    eng.close()


def _options(fraction: float, mode: str = "stream", **kwargs: Any) -> ModelOptions:
    options = ModelOptions(
        dtype="float32",
        resident_fraction=fraction,
        decode_mode=mode,  # type: ignore[arg-type]
        max_sequence_length=128,
        max_batch_size=4,
    )
    return dataclasses.replace(options, **kwargs)


def _greedy_batch(
    engine: Engine, name: str, prompts: list[str], params: SamplingParams = GREEDY
) -> list[list[int]]:
    """Submits all prompts at once so they run as one batch, and returns each one's tokens."""
    requests = [engine.submit(name, p, params) for p in prompts]
    return [r.wait(60).token_ids for r in requests]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
def test_greedy_matches_transformers(engine: Engine, models_root: Path, arch: str) -> None:
    """The engine's own decoder math gives transformers' greedy tokens and logits, with the KV cache."""
    engine.load(arch, str(models_root / arch), _options(0.5, "stream"))
    reference = AutoModelForCausalLM.from_pretrained(models_root / arch, dtype=torch.float32)
    reference.eval()  # type: ignore[no-untyped-call]
    prompt_ids = engine.encode(arch, PROMPTS[1])
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0
        )[0, len(prompt_ids) :].tolist()
    assert engine.generate(arch, prompt_ids, GREEDY).token_ids == expected


# wide enough that the emulated tier multiplies from oneDNN's packed weights (cpu_kernels), the fused
# query/key/value and gate/up copies included; two layers keep it quick
WIDE = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 2}


@pytest.mark.parametrize(("arch", "heads", "kv_heads"), [("qwen2", 6, 2), ("qwen3", 6, 2), ("phi3", 6, 6)])
def test_greedy_matches_transformers_through_packed_fused_weights(
    tmp_path: Path, arch: str, heads: int, kv_heads: int
) -> None:
    if not cpu_kernels.available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear prepacking")
    shape = {**WIDE, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    model_dir = make_model(tmp_path / arch, arch, "tiny", seed=4, dtype="float32", overrides=shape)
    tier = make_gpu_tier(256 * 2**20, force_emulated=True)
    engine = Engine(tier, [tmp_path], node="test", calibration_bytes=2**20)
    try:
        engine.load(arch, str(model_dir), _options(1.0))
        views = engine.runner(arch).placed.gpu_views["layer.0"]
        packed = cpu_kernels.PACKED_SUFFIX
        assert f"self_attn.qkv_proj.weight{packed}" in views and f"mlp.gate_up_proj.weight{packed}" in views
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference.eval()  # type: ignore[no-untyped-call]
        for prompt in PROMPTS[:2]:
            prompt_ids = engine.encode(arch, prompt)
            with torch.no_grad():
                expected = reference.generate(
                    torch.tensor([prompt_ids]),
                    max_new_tokens=12,
                    do_sample=False,
                    min_new_tokens=12,
                    pad_token_id=0,
                )[0, len(prompt_ids) :].tolist()
            assert engine.generate(arch, prompt_ids, GREEDY).token_ids == expected
        assert _greedy_batch(engine, arch, PROMPTS) == [
            engine.generate(arch, p, GREEDY).token_ids for p in PROMPTS
        ]
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["stream", "cpu"])
def test_greedy_identical_across_residency_and_batching(engine: Engine, models_root: Path, mode: str) -> None:
    results = {}
    for fraction in (1.0, 0.5, 0.0):
        name = f"m{int(fraction * 100)}"
        report = engine.load(name, str(models_root / "qwen2"), _options(fraction, mode))
        assert report.residency.decode_mode == mode
        results[fraction] = _greedy_batch(engine, name, PROMPTS)
        alone = [engine.generate(name, p, GREEDY).token_ids for p in PROMPTS]
        assert results[fraction] == alone, "batching changed greedy output"
        engine.unload(name)
    assert results[1.0] == results[0.5] == results[0.0]
    assert all(len(tokens) == GREEDY.max_tokens for tokens in results[1.0])


def test_prefill_and_decode_modes_may_differ(engine: Engine, models_root: Path) -> None:
    engine.load("ref", str(models_root / "llama"), _options(1.0))
    expected = _greedy_batch(engine, "ref", PROMPTS)
    engine.load("mixed", str(models_root / "llama"), _options(0.25, "cpu", prefill_mode="stream"))
    assert engine.residency("mixed").prefill_mode == "stream"
    assert _greedy_batch(engine, "mixed", PROMPTS) == expected
    engine.set_residency("mixed", decode_mode="stream", prefill_mode="cpu")
    assert _greedy_batch(engine, "mixed", PROMPTS) == expected


def test_auto_mode_is_measured(engine: Engine, models_root: Path) -> None:
    report = engine.load(
        "auto",
        str(models_root / "llama"),
        ModelOptions(dtype="float32", resident_fraction=0.5, max_sequence_length=128, max_batch_size=2),
    )
    assert {
        "decode_stream_seconds",
        "decode_cpu_seconds",
        "prefill_stream_seconds",
        "prefill_cpu_seconds",
    } <= set(report.mode_choice)
    assert all(seconds > 0 for seconds in report.mode_choice.values())
    assert report.residency.decode_mode in ("stream", "cpu")


class _Gate:
    """Counts a request's tokens and signals once `after` of them have arrived."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.count = 0
        self.reached = threading.Event()

    def __call__(self, event: RequestEvent) -> None:
        if event.token_id is not None:
            self.count += 1
            if self.count >= self.after:
                self.reached.set()


@pytest.mark.parametrize("mode", ["stream", "cpu"])
def test_preempt_resume_mid_generation_continues_exactly(
    engine: Engine, models_root: Path, mode: str
) -> None:
    long_greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    engine.load("m", str(models_root / "llama"), _options(0.5, mode))
    expected = _greedy_batch(engine, "m", PROMPTS[:3], long_greedy)
    gate = _Gate(after=5)
    requests = [
        engine.submit("m", p, long_greedy, on_event=gate if i == 0 else None)
        for i, p in enumerate(PROMPTS[:3])
    ]
    assert gate.reached.wait(30)
    report = engine.preempt("m")
    assert engine.status("m").state == "preempted"
    assert report.sequences_parked >= 1
    assert report.kv_save.moved_bytes > 0 and report.kv_save.seconds > 0 and report.kv_save.emulated
    owner = engine.runner("m").owner
    assert engine.tier.allocated_bytes(owner) == 0 and engine.tier.reserved_bytes(owner) == 0
    parked_tokens = len(requests[0].token_ids)
    assert not requests[0].done.wait(0.3), "a preempted model must not generate"
    assert len(requests[0].token_ids) == parked_tokens
    resumed = engine.resume("m")
    assert resumed.kv_restore.moved_bytes == report.kv_save.moved_bytes
    assert resumed.reload.moved_bytes == engine.residency("m").resident_weight_bytes
    assert [r.wait(60).token_ids for r in requests] == expected


def test_demote_promote_mid_generation_continues_exactly(engine: Engine, models_root: Path) -> None:
    long_greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    engine.load("m", str(models_root / "qwen2"), _options(1.0, "cpu"))
    expected = _greedy_batch(engine, "m", PROMPTS[:2], long_greedy)
    gate = _Gate(after=4)
    requests = [
        engine.submit("m", p, long_greedy, on_event=gate if i == 0 else None)
        for i, p in enumerate(PROMPTS[:2])
    ]
    assert gate.reached.wait(30)
    demoted = engine.set_residency("m", 0.0)
    assert demoted.resident_weight_bytes == 0 and demoted.offloaded_units
    promoted = engine.set_residency("m", 0.5, decode_mode="stream")
    assert 0.3 < promoted.resident_fraction < 0.7
    engine.set_residency("m", 1.0)
    assert [r.wait(60).token_ids for r in requests] == expected


def test_placement_that_does_not_fit_is_refused(models_root: Path) -> None:
    # the tiny model needs ~1.8 MB fully resident (weights, KV for 4x128 tokens, workspace), ~0.85 MB at 0.25
    tier = make_gpu_tier(1_200_000, force_emulated=True)
    engine = Engine(tier, [models_root], calibration_bytes=0)
    with pytest.raises(EngineError) as refused:
        engine.load("big", str(models_root / "llama"), _options(1.0))
    assert refused.value.reason == "PlacementDoesNotFit"
    assert tier.reserved_bytes() == 0 and tier.allocated_bytes() == 0
    engine.load(
        "small", str(models_root / "llama"), _options(0.25, "cpu")
    )  # the same model, partly resident, fits
    assert tier.reserved_bytes() <= tier.budget_bytes
    with pytest.raises(EngineError) as promote:
        engine.set_residency("small", 1.0)
    assert promote.value.reason == "PlacementDoesNotFit"
    assert engine.residency("small").requested_fraction == 0.25
    assert engine.generate("small", "Hello", GREEDY).finish_reason == "length"
    engine.close()


@pytest.mark.parametrize("fraction", [1.0, 0.6, 0.3, 0.0])
def test_reported_resident_bytes_equal_the_pool(engine: Engine, models_root: Path, fraction: float) -> None:
    engine.load("m", str(models_root / "llama"), _options(fraction, "cpu"))
    report = engine.residency("m")
    owner = engine.runner("m").owner
    pool = engine.tier.tensors(owner, "weights")
    assert report.resident_weight_bytes == sum(t.numel() * t.element_size() for t in pool)
    assert report.resident_weight_bytes == engine.tier.allocated_bytes(owner, "weights")
    assert report.resident_fraction == report.resident_weight_bytes / report.weight_bytes
    assert abs(report.resident_fraction - fraction) <= 0.2
    runner = engine.runner("m")
    for name in report.resident_units:  # every resident tensor the forward pass uses lies in the pool
        views = runner.placed.gpu_views[name]
        dense = {k: t for k, t in views.items() if not k.endswith(cpu_kernels.PACKED_SUFFIX)}
        assert all(engine.tier.owns(t) for t in dense.values())
        for key, packed in views.items():  # or is oneDNN's packed copy of some, with the same values
            if key.endswith(cpu_kernels.PACKED_SUFFIX):
                assert torch.equal(packed.to_dense(), cpu_kernels.dense_of(dense, key))
    for name in report.offloaded_units:
        assert name not in runner.placed.gpu_views
    assert engine.tier.reserved_bytes(owner) == report.gpu_reserved_bytes >= report.resident_weight_bytes


def test_timings_positive_with_correct_byte_counts(engine: Engine, models_root: Path) -> None:
    report = engine.load("m", str(models_root / "llama"), _options(0.6, "stream"))
    assert report.load_seconds > 0 and report.read_seconds > 0
    assert report.host_to_device.moved_bytes == report.residency.resident_weight_bytes > 0
    assert report.host_to_device.gbps > 0 and report.host_to_device.emulated
    assert report.host_to_device.path == "pageable"  # honest: no pinned memory without CUDA
    request = engine.submit("m", PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True))
    request.wait(60)
    preempt = engine.preempt("m")
    assert preempt.kv_save.moved_bytes == 0  # nothing in flight: no KV to save
    resume = engine.resume("m")
    assert resume.reload.moved_bytes == report.residency.resident_weight_bytes
    assert resume.reload.seconds > 0 and resume.reload.gbps > 0
    assert resume.reload.copies == len(report.residency.resident_units)  # one big copy per unit
    timings = engine.status("m").timings
    assert (
        timings.reload_seconds == resume.reload.seconds
        and timings.weight_bytes == report.residency.weight_bytes
    )
    assert timings.decode_tokens_per_second and timings.decode_tokens_per_second > 0
    assert timings.prefill_tokens_per_second and timings.prefill_tokens_per_second > 0
    node = engine.node_report()
    assert node.emulated and node.host_to_device_peak is not None and node.host_to_device_peak.gbps > 0


def test_kv_bytes_match_the_cached_tokens(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "llama"), _options(1.0, "stream"))
    gate = _Gate(after=3)
    prompt = engine.encode("m", PROMPTS[1])
    request = engine.submit("m", prompt, SamplingParams(max_tokens=60, ignore_eos=True), on_event=gate)
    assert gate.reached.wait(30)
    preempt = engine.preempt("m")
    cached_tokens = len(prompt) + len(request.token_ids) - 1  # the newest token's KV is written next step
    spec = engine.runner("m").spec
    per_token_bytes = spec.num_layers * spec.kv_elements_per_token_per_layer * 4
    assert preempt.kv_save.moved_bytes == cached_tokens * per_token_bytes
    engine.resume("m")
    request.wait(60)


def test_sampling_is_seeded_and_stop_sequences_cut(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "llama"), _options(0.5, "cpu"))
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    first = engine.generate("m", PROMPTS[0], sampled)
    assert engine.generate("m", PROMPTS[0], sampled).token_ids == first.token_ids
    full = engine.generate("m", PROMPTS[0], GREEDY).text
    stop = full[3:5]
    assert stop and full.find(stop) >= 0
    cut = engine.generate("m", PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]


def test_queue_bound_and_unknown_model(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "llama"), _options(1.0, max_queue=2))
    engine.preempt("m")  # requests pile up while preempted
    for _ in range(2):
        engine.submit("m", PROMPTS[0], GREEDY)
    with pytest.raises(EngineError) as full:
        engine.submit("m", PROMPTS[0], GREEDY)
    assert full.value.reason == "QueueFull" and full.value.retry_after_seconds
    engine.resume("m")
    with pytest.raises(EngineError) as missing:
        engine.submit("nope", PROMPTS[0], GREEDY)
    assert missing.value.reason == "ModelNotLoaded"


def test_unload_fails_requests_clearly(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "llama"), _options(1.0))
    engine.preempt("m")
    request = engine.submit("m", PROMPTS[0], GREEDY)
    engine.unload("m")
    with pytest.raises(EngineError) as gone:
        request.wait(10)
    assert gone.value.reason == "ModelUnloaded"
    assert engine.tier.reserved_bytes() == 0


def test_bad_model_directories_are_refused(engine: Engine, models_root: Path, tmp_path: Path) -> None:
    import json
    import shutil

    def variant(name: str) -> Path:
        path = models_root / name
        if not path.exists():
            shutil.copytree(models_root / "llama", path)
        return path

    remote = variant("remote")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (remote / "config.json").write_text(json.dumps(config))
    gpt2 = variant("gpt2")
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "auto_map": None} | {}))
    config.pop("auto_map")
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    no_config = variant("noconfig")
    (no_config / "config.json").unlink(missing_ok=True)
    corrupt = variant("corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    outside = tmp_path / "outside"
    shutil.copytree(models_root / "llama", outside)
    link = models_root / "link"
    if not link.exists():
        link.symlink_to(outside)
    expected = {
        remote: "RemoteCodeNotAllowed",
        gpt2: "UnsupportedArchitecture",
        no_config: "ConfigMissing",
        corrupt: "WeightsCorrupt",
        outside: "PathNotAllowed",
        link: "PathNotAllowed",
    }
    engine.load("good", str(models_root / "llama"), _options(1.0))
    for path, reason in expected.items():
        with pytest.raises(EngineError) as refused:
            engine.load(path.name, str(path), _options(1.0))
        assert refused.value.reason == reason, refused.value.message
        assert refused.value.message
    assert engine.names() == ["good"]
    assert engine.generate("good", PROMPTS[0], GREEDY).finish_reason == "length"


def test_request_objects_report_errors(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "llama"), _options(1.0))
    with pytest.raises(EngineError) as empty:
        engine.submit("m", [], GREEDY)
    assert empty.value.reason == "InvalidRequest"
    with pytest.raises(EngineError):
        engine.submit("m", [10**6], GREEDY)
    long_prompt = engine.submit("m", [1] * 120, SamplingParams(max_tokens=50, ignore_eos=True)).wait(60)
    assert long_prompt.finish_reason == "length" and len(long_prompt.token_ids) == 128 - 120
    assert isinstance(long_prompt, Request)


def test_sliding_window_and_sharded_checkpoints(engine: Engine, models_root: Path, tmp_path: Path) -> None:
    """Mistral with a window shorter than the text matches transformers; a sharded checkpoint loads."""
    from residency import modelgen

    windowed = make_model(
        models_root / "mistral-w6",
        "mistral",
        "tiny",
        seed=4,
        dtype="float32",
        overrides={"sliding_window": 6},
    )
    engine.load("w", str(windowed), _options(0.5, "cpu"))
    reference = AutoModelForCausalLM.from_pretrained(
        windowed, dtype=torch.float32, attn_implementation="eager"
    )
    prompt_ids = engine.encode("w", PROMPTS[1])
    assert len(prompt_ids) > 6
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0
        )[0, len(prompt_ids) :].tolist()
    assert engine.generate("w", prompt_ids, GREEDY).token_ids == expected
    original = modelgen._SHARD_BYTES
    modelgen._SHARD_BYTES = 150_000
    try:
        sharded = make_model(models_root / "sharded", "llama", "tiny", seed=1, dtype="float32")
    finally:
        modelgen._SHARD_BYTES = original
    assert (sharded / "model.safetensors.index.json").is_file()
    engine.load("sharded", str(sharded), _options(0.5))
    engine.load("whole", str(models_root / "llama"), _options(0.5))
    assert _greedy_batch(engine, "sharded", PROMPTS) == _greedy_batch(engine, "whole", PROMPTS)


def test_profile_measures_every_point(engine: Engine, models_root: Path, tmp_path: Path) -> None:
    from residency_worker.engine.profile import ProfileSettings, plot_profile, profile_model

    settings = ProfileSettings(
        dtype="float32", fractions=(1.0, 0.5, 0.0), sequence_lengths=(8, 24), decode_tokens=4, trials=2
    )
    steps: list[str] = []
    result = profile_model(engine, str(models_root / "qwen2"), settings, progress=steps.append)
    assert len(result.points) == settings.points == 12
    # every point is visited once a round (a warm-up round, then one per trial), interleaved
    assert len(steps) == settings.visits == 12 * 3
    assert steps[0].startswith("warm-up 1 of 1: r=1.00 stream seq=8: ")
    assert steps[12].startswith("trial 1 of 2: r=1.00 stream seq=8: ")
    assert all(p.trials == 2 for p in result.points)
    assert result.emulated and not result.skipped and engine.names() == []
    assert all(p.decode_tokens_per_second > 0 and p.prefill_tokens_per_second > 0 for p in result.points)
    assert {p.execution_mode for p in result.points} == {"stream", "cpu"}
    assert sorted({p.achieved_resident_fraction for p in result.points}) == [
        0.0,
        pytest.approx(0.5, abs=0.1),
        1.0,
    ]
    document = result.to_json()
    assert document["emulated"] is True and len(document["points"]) == 12
    assert set(document["points"][0]) == {
        "residentFraction",
        "executionMode",
        "sequenceLength",
        "batchSize",
        "decodeTokensPerSecond",
        "prefillTokensPerSecond",
        "trials",
    }
    plot_profile(result, tmp_path / "profile.png")
    assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_sizes_parse_like_kubernetes_quantities() -> None:
    from residency_worker.engine.tiers import parse_bytes

    assert parse_bytes("8GiB") == 8 * 2**30 == parse_bytes("8Gi")
    assert parse_bytes("512Mi") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="budget"):
        make_gpu_tier(None, force_emulated=True)


def test_requests_join_a_running_batch(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "llama"), _options(0.5, "stream"))
    long_params = SamplingParams(max_tokens=60, ignore_eos=True)
    expected_long = engine.generate("m", PROMPTS[0], long_params).token_ids
    expected_short = engine.generate("m", PROMPTS[1], GREEDY).token_ids
    gate = _Gate(after=3)
    running = engine.submit("m", PROMPTS[0], long_params, on_event=gate)
    assert gate.reached.wait(30)
    joined = engine.submit("m", PROMPTS[1], GREEDY)
    joined.wait(60)
    assert not running.done.is_set(), "the late request finished while the first was still decoding"
    assert joined.finished_at is not None and joined.first_token_at is not None
    assert running.wait(60).token_ids == expected_long and joined.token_ids == expected_short


def test_a_head_bigger_than_a_layer_streams_in_layer_sized_chunks(engine: Engine, models_root: Path) -> None:
    """Small models with big vocabularies: the head streams through layer-sized slots, logits stay exact."""
    from residency_worker.engine.placement import head_pieces, plan_residency, streamed_pieces

    wide = make_model(
        models_root / "wide-vocab",
        "qwen2",
        "tiny",
        seed=5,
        dtype="float32",
        overrides={"intermediate_size": 32, "tie_word_embeddings": True},
    )
    reference = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32)
    prompt_ids = None
    outputs = []
    for fraction, mode in ((1.0, "stream"), (0.0, "stream"), (0.0, "cpu"), (0.3, "stream")):
        name = f"w{int(fraction * 10)}{mode}"
        engine.load(name, str(wide), _options(fraction, mode))
        runner = engine.runner(name)
        pieces = head_pieces(runner.weights)
        assert len(pieces) > 2, "the head must split into more than one chunk of rows"
        largest_layer = max(u.numel for u in runner.weights.units if u.name.startswith("layer."))
        streamed = streamed_pieces(runner.weights, plan_residency(runner.weights, fraction))
        assert all(p.numel <= largest_layer for p in streamed)
        if runner.placed.stager is not None:
            assert runner.placed.stager.slot_numel <= largest_layer
        prompt_ids = engine.encode(name, PROMPTS[2])
        outputs.append(_greedy_batch(engine, name, PROMPTS))
        engine.unload(name)
    assert all(o == outputs[0] for o in outputs)
    assert prompt_ids is not None
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0
        )[0, len(prompt_ids) :].tolist()
    assert outputs[0][2] == expected


def test_demand_counts_the_window_s_requests(engine: Engine, models_root: Path) -> None:
    """What the worker reports as the model's demand (status.demand): output tokens of finished requests,
    the expected output of unfinished ones, prompt tokens, over the window; requests that ended without a
    token are left out; old requests fall out."""
    engine.load("d", str(models_root / "llama"), _options(1.0))
    runner = engine.runner("d")
    idle = runner.demand()
    assert idle.decode_tokens_per_second == 0 and idle.typical_prompt_tokens is None

    def queued(prompt: str, max_tokens: int) -> Request:
        """A request in the queue that the batch loop cannot start while the caller holds the lock."""
        request = Request(engine.encode("d", prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        runner.scheduler.waiting.append(request)
        runner._arrivals.append((time.monotonic(), request))
        return request

    with runner._cv:  # re-entrant: demand() and cancel() take it too
        # before any request finished, an unfinished one counts its max_tokens, as far as the model's
        # sequence length (128 here) leaves room after its prompt
        huge = queued(PROMPTS[0], 10**6)
        seen = runner.demand()
        expected = 128 - len(huge.prompt_ids)
        assert seen.decode_tokens_per_second * seen.window_seconds == pytest.approx(expected)
        runner.cancel(huge)
    assert huge.wait(60).finish_reason == "cancelled"
    assert runner.demand().decode_tokens_per_second == 0  # ended without a token: not demand

    done = [engine.submit("d", p, SamplingParams(max_tokens=10, ignore_eos=True)) for p in PROMPTS[:3]]
    for request in done:
        request.wait(60)
    prompts = [len(engine.encode("d", p)) for p in PROMPTS[:3]]
    seen = runner.demand(window_seconds=60.0)
    # a young runner averages over at least half the window: a few early requests are not a rate
    span = seen.window_seconds
    assert 30.0 <= span <= 60.0 and seen.age_seconds > 0
    assert seen.decode_tokens_per_second == pytest.approx(30 / span)
    assert seen.prompt_tokens_per_second == pytest.approx(sum(prompts) / span)
    assert seen.typical_prompt_tokens == round(sum(prompts) / 3)
    with runner._cv:
        # an unfinished request counts as the window's typical output (10), not its max_tokens (100)
        pending = queued(PROMPTS[3], 100)
        now = runner.demand()
        assert now.decode_tokens_per_second == pytest.approx(40 / now.window_seconds)
        runner.cancel(pending)
    assert pending.wait(60).finish_reason == "cancelled"
    # a window shorter than the time since these arrived holds none of them (and loses none for later)
    time.sleep(0.3)
    assert runner.demand(window_seconds=0.2).decode_tokens_per_second == 0
    assert runner.demand().decode_tokens_per_second * runner.demand().window_seconds == pytest.approx(30)


def test_decode_steps_are_observed_at_the_placement_they_ran(engine: Engine, models_root: Path) -> None:
    """The runner's window (status.observedStep): decode steps at the running batch, their context, and the
    residency and mode they ran at; once it decodes after a demotion, old steps are out."""
    engine.load("w", str(models_root / "llama"), _options(1.0))
    runner = engine.runner("w")
    assert runner.observed_steps.summary() is None  # nothing decoded yet
    prompts = [engine.encode("w", p) for p in PROMPTS[:2]]
    _greedy_batch(engine, "w", PROMPTS[:2], SamplingParams(max_tokens=24, ignore_eos=True))
    seen = runner.observed_steps.summary()
    assert seen is not None
    assert seen.batch == 2 and seen.mode == "stream" and seen.resident_fraction == 1.0
    assert seen.steps >= 16 and seen.step_seconds > 0
    shortest, longest = min(map(len, prompts)), max(map(len, prompts))
    assert shortest < seen.sequence_tokens < longest + 24  # the mean context of the decoding sequences
    engine.set_residency("w", 0.5, decode_mode="cpu")
    kept = runner.observed_steps.summary()  # until it decodes again: the old steps, labelled where they ran
    assert kept is not None and (kept.resident_fraction, kept.mode) == (1.0, "stream")
    _greedy_batch(engine, "w", PROMPTS[:1], SamplingParams(max_tokens=24, ignore_eos=True))
    seen = runner.observed_steps.summary()
    assert seen is not None and seen.batch == 1 and seen.mode == "cpu" and 0 < seen.resident_fraction < 1


def _seconds_per_token(request: Request) -> float:
    assert request.first_token_at is not None and request.finished_at is not None
    return (request.finished_at - request.first_token_at) / max(1, len(request.token_ids) - 1)


def test_a_model_ahead_of_its_slo_yields_the_gpu_to_a_neighbour_with_requests_waiting(
    engine: Engine, models_root: Path
) -> None:
    """Two models on one GPU tier. While `busy` (batch of one, no SLO) has requests waiting for its slot,
    `paced` (SLO 8 tok/s) decodes at 1.25x its SLO, no faster, and still meets it; once nobody waits, it
    decodes at full speed again. The time it held back shows in its timings."""
    engine.load("paced", str(models_root / "qwen2"), _options(1.0, min_decode_tokens_per_second=8.0))
    engine.load("busy", str(models_root / "llama"), _options(1.0, max_batch_size=1, max_queue=64))
    # alone: far faster than its SLO
    alone = engine.generate("paced", PROMPTS[0], SamplingParams(max_tokens=24, ignore_eos=True))
    assert _seconds_per_token(alone) < 1 / 30
    long = SamplingParams(max_tokens=100, ignore_eos=True)
    backlog = [engine.submit("busy", PROMPTS[1], long) for _ in range(40)]
    deadline = time.monotonic() + 30
    while engine.status("busy").queue_depth == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    stamps: list[float] = []
    paced = engine.submit(
        "paced",
        PROMPTS[0],
        SamplingParams(max_tokens=16, ignore_eos=True),
        on_event=lambda event: stamps.append(time.perf_counter()) if event.token_id is not None else None,
    )
    paced.wait(60)
    assert engine.status("busy").queue_depth > 0, "busy must still have requests waiting at the end"
    # the median gap: on a busy machine one late-scheduled emission shortens the mean of a few gaps
    per_token = statistics.median(b - a for a, b in itertools.pairwise(stamps[1:]))
    assert 0.8 / (1.25 * 8.0) <= per_token <= 1 / 8.0, per_token  # paced to 10 tok/s, within its SLO of 8
    assert engine.status("paced").timings.paced_seconds > 0.5
    assert engine.status("busy").timings.paced_seconds == 0.0  # a hungry model never waits
    for request in backlog:
        request.cancel()
    while engine.status("busy").queue_depth or engine.status("busy").active_sequences:
        time.sleep(0.01)
    again = engine.generate("paced", PROMPTS[0], SamplingParams(max_tokens=24, ignore_eos=True))
    assert _seconds_per_token(again) < 1 / 30


def test_a_paced_model_still_starts_a_new_request_at_once(engine: Engine, models_root: Path) -> None:
    """Pacing holds back decode steps, not prompts: a request that can join the batch of a held model (SLO
    1 tok/s: a step every 0.8 s while `busy` has requests waiting) gets its first token at once."""
    engine.load("slow", str(models_root / "qwen2"), _options(1.0, min_decode_tokens_per_second=1.0))
    engine.load("busy", str(models_root / "llama"), _options(1.0, max_batch_size=1, max_queue=64))
    backlog = [
        engine.submit("busy", PROMPTS[1], SamplingParams(max_tokens=100, ignore_eos=True)) for _ in range(40)
    ]
    deadline = time.monotonic() + 30
    while engine.status("busy").queue_depth == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    # each `second` below also advances `first` by a step or two, unpaced (its prefill, and a decode step
    # that is due by then): `first` asks for enough tokens that it is still running, paced, at the end
    first = engine.submit("slow", PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))
    time.sleep(1.0)  # a step or two in: held for the next one
    waits = []
    for _ in range(3):
        second = engine.submit("slow", PROMPTS[2], SamplingParams(max_tokens=2, ignore_eos=True))
        deadline = time.monotonic() + 10
        while second.first_token_at is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert second.first_token_at is not None
        waits.append(second.first_token_at - second.submitted_at)
        time.sleep(0.3)
    assert engine.status("busy").queue_depth > 0 and not first.done.is_set(), "still paced throughout"
    assert min(waits) < 0.2, waits  # held to the next step it would be 0.4 s on average, up to 0.8 s
    first.cancel()
    for request in backlog:
        request.cancel()


def _wait_for(condition: Callable[[], bool], timeout_seconds: float = 10.0) -> float:
    """Seconds until `condition()` held (fails the test after `timeout_seconds`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_seconds, "condition not met in time"
        time.sleep(0.002)
    return time.monotonic() - start


@pytest.mark.parametrize("ends", ["finished", "failed"])
def test_a_batch_that_ends_after_its_waiting_request_was_cancelled_leaves_no_neighbour_paced(
    engine: Engine, models_root: Path, ends: str
) -> None:
    """`busy` (batch of one) is hungry: a request runs, one waits. The waiting one's client hangs up during
    the step that ends the batch (it finishes, or the step fails). `busy` then has nothing to do, so `paced`
    beside it must decode at full speed, not at its SLO pace."""
    engine.load("paced", str(models_root / "qwen2"), _options(1.0, min_decode_tokens_per_second=2.0))
    engine.load("busy", str(models_root / "llama"), _options(1.0, max_batch_size=1))
    busy = engine._runner("busy")
    forward = busy._forward
    waiting: list[Request] = []

    def last_step(step: Any) -> Any:
        if not step.prefills and waiting and busy._hungry:
            busy.cancel(waiting.pop())  # the client of the waiting request goes away during this step
            if ends == "failed":
                raise RuntimeError("device error (injected)")
            for sequence in step.decoding:
                sequence.max_tokens = sequence.generated + 1  # this step ends the batch
        return forward(step)

    busy._forward = last_step  # type: ignore[method-assign]
    running = engine.submit("busy", PROMPTS[1], SamplingParams(max_tokens=60, ignore_eos=True))
    waiting.append(engine.submit("busy", PROMPTS[1], SamplingParams(max_tokens=60, ignore_eos=True)))
    _wait_for(running.done.is_set)
    _wait_for(lambda: not waiting)
    assert busy.queue_depth == 0 and busy.active_sequences == 0
    _wait_for(lambda: not engine.tier.pacer.others_hungry(engine._runner("paced").owner), timeout_seconds=1.0)
    alone = engine.generate("paced", PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True))
    assert _seconds_per_token(alone) < 1 / 30
    assert engine.status("paced").timings.paced_seconds == 0.0


def test_a_held_model_that_gets_more_requests_than_its_batch_holds_says_so_at_once(
    engine: Engine, models_root: Path
) -> None:
    """`held` (batch of one, SLO 0.5 tok/s: a step every 1.6 s while `busy` is hungry) gets a second request
    mid-hold. It is hungry now, so it stops waiting and says so at once, and from then on its neighbour is the
    one that yields; before, it sat out the rest of its 1.6 s."""
    engine.load(
        "held", str(models_root / "qwen2"), _options(1.0, min_decode_tokens_per_second=0.5, max_batch_size=1)
    )
    held = engine._runner("held")
    engine.load("busy", str(models_root / "llama"), _options(1.0, max_batch_size=1, max_queue=64))
    backlog = [
        engine.submit("busy", PROMPTS[1], SamplingParams(max_tokens=100, ignore_eos=True)) for _ in range(20)
    ]
    _wait_for(lambda: engine._runner("busy")._hungry)
    first = engine.submit("held", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    _wait_for(lambda: len(first.token_ids) >= 2)  # decoding, and held before each step
    time.sleep(0.1)
    second = engine.submit("held", PROMPTS[2], SamplingParams(max_tokens=4, ignore_eos=True))
    assert _wait_for(lambda: held._hungry) < 0.3
    assert engine.tier.pacer.others_hungry(engine._runner("busy").owner)
    for request in [*backlog, first, second]:
        request.cancel()


def test_a_changed_slo_ends_a_hold_in_progress(engine: Engine, models_root: Path) -> None:
    """`held` has SLO 0.1 tok/s (a step every 8 s while `busy` is hungry); its SLO is removed mid-hold, and
    its next token comes at once rather than up to 8 s later."""
    engine.load("held", str(models_root / "qwen2"), _options(1.0, min_decode_tokens_per_second=0.1))
    engine.load("busy", str(models_root / "llama"), _options(1.0, max_batch_size=1, max_queue=64))
    backlog = [
        engine.submit("busy", PROMPTS[1], SamplingParams(max_tokens=100, ignore_eos=True)) for _ in range(20)
    ]
    _wait_for(lambda: engine._runner("busy")._hungry)
    request = engine.submit("held", PROMPTS[0], SamplingParams(max_tokens=20, ignore_eos=True))
    _wait_for(lambda: len(request.token_ids) >= 2)  # the next step is 8 s away
    time.sleep(0.2)
    tokens = len(request.token_ids)
    engine.set_decode_slo("held", None)
    assert _wait_for(lambda: len(request.token_ids) > tokens, timeout_seconds=5.0) < 1.0
    for queued in [*backlog, request]:
        queued.cancel()
