"""The engine's fast path on tiny random models: batched attention over the KV pool, chunked prefill,
device-side sampling, and CUDA graphs (on a GPU only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config

from residency.modelgen import make_model
from residency_worker.engine import Engine, ModelOptions, SamplingParams, make_gpu_tier
from residency_worker.engine import model as decoder
from residency_worker.engine.generate import RequestEvent
from residency_worker.engine.sampler import SampleRow, make_generator, sample

pytestmark = pytest.mark.component

PROMPTS = ["Hello world", "The scheduler places each model", "Resume copies the weights back", "0123"]
LONG_PROMPT = " ".join(f"word{i}" for i in range(12))
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
ATOL = 1e-5
"""float32: the batched call and the per-sequence reference sum the same products in another order."""


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_model(root / "qwen2", "qwen2", "tiny", seed=1, dtype="float32")
    make_model(root / "mistral", "mistral", "tiny", seed=2, dtype="float32", overrides={"sliding_window": 6})
    return root


@pytest.fixture
def engine(models_root: Path) -> Iterator[Engine]:
    tier = make_gpu_tier(32 * 2**20, force_emulated=True)
    eng = Engine(tier, [models_root], node="test", calibration_bytes=2**20)
    yield eng
    eng.close()


def _options(fraction: float = 1.0, mode: str = "stream", **kwargs: Any) -> ModelOptions:
    options = ModelOptions(
        dtype="float32",
        resident_fraction=fraction,
        decode_mode=mode,  # type: ignore[arg-type]
        max_sequence_length=128,
        max_batch_size=4,
    )
    return dataclasses.replace(options, **kwargs)


# -- batched decode attention against a per-sequence reference ------------------------------------------
def _reference_decode(
    q: torch.Tensor, kv: torch.Tensor, slots: list[int], positions: list[int], window: int | None
) -> torch.Tensor:
    """What the engine computed before: one SDPA call per sequence over its own cached tokens."""
    outputs = []
    for row, (slot, position) in enumerate(zip(slots, positions, strict=True)):
        first = 0 if window is None else max(0, position + 1 - window)
        keys = kv[0, slot : slot + 1, :, first : position + 1]
        values = kv[1, slot : slot + 1, :, first : position + 1]
        outputs.append(
            F.scaled_dot_product_attention(
                q[row : row + 1, :, None], keys, values, enable_gqa=q.shape[1] != kv.shape[2]
            )[:, :, 0]
        )
    return torch.cat(outputs)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("dense", [True, False])
def test_batched_decode_attention_equals_one_call_per_sequence(
    window: int | None, heads: int, kv_heads: int, dense: bool
) -> None:
    """Mixed lengths, sliding windows, grouped-query heads; dense (every occupied slot decodes) or not (slot 1
    is prefilling and must neither be written nor change the others)."""
    torch.manual_seed(0)
    head_dim, capacity = 8, 32
    lengths = [5, 17, 9, 1]
    slots = [0, 1, 2, 3] if dense else [0, 2, 3]
    kv = torch.randn(2, len(lengths), kv_heads, capacity, head_dim)
    untouched = kv[:, 1].clone()
    positions = [lengths[s] for s in slots]
    q = torch.randn(len(slots), heads, head_dim)
    k = torch.randn(len(slots), kv_heads, head_dim)
    v = torch.randn(len(slots), kv_heads, head_dim)
    layout = decoder.StepLayout(
        decode_slots=tuple(slots),
        decode_positions=tuple(positions),
        chunks=(),
        occupied=len(lengths),
        attend_tokens=max(positions) + 1,
    )
    rotary = decoder.Rotary(Qwen2Config(hidden_size=head_dim * heads, num_attention_heads=heads), capacity)
    step = decoder.StepTensors.build(layout, rotary, torch.device("cpu"), q.dtype)
    batched = decoder._decode_attention(q, k, v, kv, step, window)
    for row, slot in enumerate(slots):  # the new token's keys and values landed at its position
        assert torch.equal(kv[0, slot, :, positions[row]], k[row])
        assert torch.equal(kv[1, slot, :, positions[row]], v[row])
    if not dense:
        assert torch.equal(kv[:, 1], untouched)
    expected = _reference_decode(q, kv, slots, positions, window)
    torch.testing.assert_close(batched, expected, atol=ATOL, rtol=1e-5)


def test_a_prompt_chunk_attends_like_the_whole_prompt() -> None:
    """A prompt prefilled in chunks (each attending to the cached earlier tokens) gives the same outputs as
    one causal pass over the whole prompt, with and without a sliding window."""
    torch.manual_seed(1)
    heads, kv_heads, head_dim, length = 4, 2, 8, 11
    q = torch.randn(length, heads, head_dim)
    k = torch.randn(length, kv_heads, head_dim)
    v = torch.randn(length, kv_heads, head_dim)
    for window in (None, 4):
        whole_kv = torch.zeros(2, 1, kv_heads, 16, head_dim)
        whole = decoder._chunk_attention(q, k, v, whole_kv, decoder.PromptChunk(0, 0, length), window)
        chunked_kv = torch.zeros(2, 1, kv_heads, 16, head_dim)
        pieces = []
        for start, stop in ((0, 3), (3, 4), (4, 11)):
            chunk = decoder.PromptChunk(0, start, stop - start)
            pieces.append(
                decoder._chunk_attention(
                    q[start:stop], k[start:stop], v[start:stop], chunked_kv, chunk, window
                )
            )
        torch.testing.assert_close(torch.cat(pieces), whole, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(chunked_kv, whole_kv)


# -- the engine ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
@pytest.mark.parametrize(("fraction", "mode"), [(1.0, "stream"), (0.5, "stream"), (0.5, "cpu"), (0.0, "cpu")])
def test_chunked_prefill_gives_the_tokens_of_an_unchunked_one(
    engine: Engine, models_root: Path, arch: str, fraction: float, mode: str
) -> None:
    engine.load("whole", str(models_root / arch), _options(fraction, mode, prefill_chunk_tokens=128))
    engine.load("chunked", str(models_root / arch), _options(fraction, mode, prefill_chunk_tokens=5))
    prompts = [LONG_PROMPT, *PROMPTS]
    whole = [r.wait(60).token_ids for r in [engine.submit("whole", p, GREEDY) for p in prompts]]
    chunked = [r.wait(60).token_ids for r in [engine.submit("chunked", p, GREEDY) for p in prompts]]
    assert chunked == whole


def test_running_streams_keep_producing_tokens_while_a_long_prompt_prefills(
    engine: Engine, models_root: Path
) -> None:
    """With 5-token chunks, a prompt of ~80 tokens takes many steps; the stream already decoding gets one
    token in each of them instead of waiting for the whole prefill."""
    engine.load("m", str(models_root / "qwen2"), _options(prefill_chunk_tokens=5, max_sequence_length=256))
    order: list[str] = []

    def tracer(label: str) -> Any:
        def on_event(event: RequestEvent) -> None:
            if event.token_id is not None:
                order.append(label)

        return on_event

    running = engine.submit(
        "m", PROMPTS[0], SamplingParams(max_tokens=60, ignore_eos=True), on_event=tracer("a")
    )
    while len(running.token_ids) < 2:
        running.done.wait(0.01)
    long_prompt = engine.encode("m", LONG_PROMPT + " " + LONG_PROMPT)
    assert len(long_prompt) > 40
    arriving = engine.submit(
        "m", long_prompt, SamplingParams(max_tokens=2, ignore_eos=True), on_event=tracer("b")
    )
    arriving.wait(60)
    running.wait(60)
    before_first_b = order.index("b")
    tokens_of_a_during_prefill = order[:before_first_b].count("a") - 2
    chunks = -(-len(long_prompt) // 5)
    assert tokens_of_a_during_prefill >= chunks - 2  # one per chunk step (the first may have been queued)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "qwen2"), _options(0.5, "cpu"))
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=11, ignore_eos=True)
    alone = engine.generate("m", PROMPTS[1], seeded).token_ids
    batch = [engine.submit("m", PROMPTS[1], seeded)] + [
        engine.submit("m", p, SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True))
        for i, p in enumerate(PROMPTS)
    ]
    assert batch[0].wait(60).token_ids == alone
    other_seed = engine.generate("m", PROMPTS[1], dataclasses.replace(seeded, seed=12)).token_ids
    assert other_seed != alone  # 16 tokens from a ~1000-word vocabulary: equal only by a broken sampler
    top1 = engine.generate("m", PROMPTS[1], dataclasses.replace(seeded, top_k=1)).token_ids
    assert top1 == engine.generate("m", PROMPTS[1], SamplingParams(max_tokens=16, ignore_eos=True)).token_ids


def test_logprobs_are_those_of_the_model_distribution(engine: Engine, models_root: Path) -> None:
    engine.load("m", str(models_root / "qwen2"), _options())
    events: list[RequestEvent] = []
    request = engine.submit(
        "m", PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3), on_event=events.append
    )
    request.wait(60)
    tokens = [e for e in events if e.token_id is not None]
    assert len(tokens) == 4
    for event in tokens:
        assert event.logprob is not None and event.logprob <= 0
        assert len(event.top_logprobs) == 3
        assert event.top_logprobs[0][0] == event.token_id  # greedy: the chosen token is the likeliest
        assert event.top_logprobs[0][1] == pytest.approx(event.logprob)
        values = [value for _, value in event.top_logprobs]
        assert values == sorted(values, reverse=True)
    plain = engine.submit(
        "m", PROMPTS[0], SamplingParams(max_tokens=2, ignore_eos=True), on_event=events.append
    )
    plain.wait(60)
    assert events[-1].logprob is None and events[-1].top_logprobs == ()


def test_the_kv_pool_is_one_preallocated_reservation(engine: Engine, models_root: Path) -> None:
    """The pool is allocated once at placement (slots x length of every GPU layer) and requests take slots
    of it: serving allocates no further KV memory."""
    engine.load("m", str(models_root / "qwen2"), _options(1.0))
    runner = engine.runner("m")
    report = engine.residency("m")
    kv_before = engine.tier.allocated_bytes(runner.owner, "kv")
    assert kv_before == report.kv_reserved_bytes > 0
    requests = [engine.submit("m", p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in PROMPTS]
    while runner.active_sequences < 4 and not requests[0].done.is_set():
        requests[0].done.wait(0.005)
    assert engine.tier.allocated_bytes(runner.owner, "kv") == kv_before
    for request in requests:
        request.wait(60)
    assert runner.active_sequences == 0


@pytest.mark.parametrize("mode", ["stream", "cpu"])
def test_preempt_during_a_chunked_prefill_resumes_exactly(
    engine: Engine, models_root: Path, mode: str
) -> None:
    """A preemption that lands between two chunks of a prompt saves the chunks done so far; the prompt then
    continues from there, and every request gives the tokens it gives without a preemption."""
    options = _options(0.5, mode, prefill_chunk_tokens=4)
    engine.load("m", str(models_root / "qwen2"), options)
    prompts = [LONG_PROMPT, PROMPTS[1], PROMPTS[2]]
    long_greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    expected = [r.wait(60).token_ids for r in [engine.submit("m", p, long_greedy) for p in prompts]]
    runner = engine.runner("m")
    requests = [engine.submit("m", p, long_greedy) for p in prompts]
    while not any(s.prefilling and s.cached_tokens > 0 for s in list(runner.scheduler.running)):
        assert not requests[0].done.is_set(), "the long prompt finished before it was caught mid-prefill"
        requests[0].done.wait(0.001)
    report = engine.preempt("m")
    assert report.sequences_parked >= 1
    engine.resume("m")
    assert [r.wait(60).token_ids for r in requests] == expected


# -- CUDA graphs (a GPU only) ---------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize(("fraction", "mode"), [(1.0, "stream"), (0.5, "stream"), (0.5, "cpu")])
def test_cuda_graph_decode_gives_the_eager_tokens(models_root: Path, fraction: float, mode: str) -> None:
    tier = make_gpu_tier(2 * 2**30)
    engine = Engine(tier, [models_root], node="gpu", calibration_bytes=2**20)
    try:
        engine.load("graphs", str(models_root / "qwen2"), _options(fraction, mode, cuda_graphs=True))
        engine.load("eager", str(models_root / "qwen2"), _options(fraction, mode, cuda_graphs=False))
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        ours = [r.wait(60).token_ids for r in [engine.submit("graphs", p, params) for p in PROMPTS]]
        eager = [r.wait(60).token_ids for r in [engine.submit("eager", p, params) for p in PROMPTS]]
        assert ours == eager
        executor = engine.runner("graphs").executor
        assert executor is not None
        if mode == "stream":
            assert executor.graph_replays > 0
        engine.set_residency("graphs", 0.25)  # graphs are captured again for the new placement
        again = [r.wait(60).token_ids for r in [engine.submit("graphs", p, params) for p in PROMPTS]]
        assert again == eager
    finally:
        engine.close()


# -- the sampler --------------------------------------------------------------------------------------
def _draws(logits: torch.Tensor, params: SamplingParams, count: int) -> list[int]:
    """`count` rows sampled in one batched call, each from its own generator (seeds 0 .. count-1)."""
    rows = [
        SampleRow(
            dataclasses.replace(params, seed=seed),
            make_generator(dataclasses.replace(params, seed=seed), torch.device("cpu")),
        )
        for seed in range(count)
    ]
    return sample(logits.expand(count, -1).contiguous(), rows).token_ids


def test_the_sampler_draws_from_the_filtered_distribution() -> None:
    """Frequencies over 4000 seeded draws follow softmax(logits / T); top-k and top-p never let a token
    outside their cut through; greedy rows take the argmax in the same batch."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
    draws = _draws(logits, SamplingParams(temperature=1.0), 4000)
    frequencies = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]), atol=0.03, rtol=0)
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_k=2), 500)) == {0, 1}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.8), 500)) == {0, 1, 2}  # 0.5+0.25 < 0.8
    assert set(_draws(logits, SamplingParams(temperature=1e-9), 200)) == {0}  # tiny temperature: no NaN
    hot = _draws(logits, SamplingParams(temperature=2.0), 4000)
    assert hot.count(0) / len(hot) < 0.45  # flatter than T=1
    mixed = [
        SampleRow(SamplingParams(), None),
        SampleRow(
            SamplingParams(temperature=1.0, seed=3),
            make_generator(SamplingParams(temperature=1.0, seed=3), torch.device("cpu")),
        ),
    ]
    assert sample(torch.stack([logits, logits]), mixed).token_ids[0] == 0
