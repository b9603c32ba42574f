"""Random-initialised Hugging Face model directories with real shapes, for tests, demos and benchmarks.

Everything is made locally: the config from transformers' native config classes, the weights from a
seeded generator, and a byte-level BPE tokenizer trained with `tokenizers` on a built-in text. Nothing
is downloaded. `AutoTokenizer.from_pretrained` and `AutoModelForCausalLM.from_pretrained` load the result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ARCHES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
PRESETS: dict[str, dict[str, Any]] = {
    # a few layers, hidden 64: fast enough for component tests on two CPU cores
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=None,
    ),
    # a few MiB of weights: big enough that partial residency shows in the demo, small enough for a CPU
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        vocab_size=None,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "qwen2.5-3b": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SHARD_BYTES = 2 * 2**30

_CORPUS = """\
The scheduler places each model on a node and decides how much of it stays resident in GPU memory.
Layers that do not fit live in host memory and are streamed to the device or computed on the CPU.
When a more important model needs the room, a running model is preempted: its key value cache is
saved to pinned host memory, its weights are released, and its requests wait until it resumes.
Resuming copies the weights back in a few large transfers and restores the cache, and the text
continues exactly where it stopped. Small models are the most sensitive to lost residency; long
sequences and slow links make every transfer cost more. Measure, then report: bytes, seconds and
gigabytes per second for every copy, and say when the hardware was emulated.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump. Sphinx of black quartz, judge my vow. 0123456789 + - * / = ( ) [ ] { } , . ;
Hello world! How are you today? I am a small language model with random weights, so my words are
random too, but they are the same words every time for the same prompt when decoding greedily.
"""


def _tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token=None,
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(arch: str, preset: dict[str, Any], vocab_size: int, eos_id: int, dtype: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
        "phi3": Phi3Config,
    }
    fields = {k: v for k, v in preset.items() if k != "vocab_size"}
    extra: dict[str, Any] = {}
    if arch == "mistral":
        extra["sliding_window"] = None
    if arch == "phi3":
        extra["pad_token_id"] = eos_id
    return classes[arch](
        **{**extra, **fields},
        vocab_size=vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype=dtype,
        rms_norm_eps=1e-6,
    )


def make_model(
    out_dir: Path,
    arch: str = "llama",
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "bfloat16",
    overrides: Mapping[str, Any] | None = None,
    device: str = "cpu",
) -> Path:
    """Writes config.json, safetensors weights and a tokenizer for a random model; returns `out_dir`.

    `overrides` replaces preset config fields, e.g. {"num_hidden_layers": 4} for real widths at a
    benchmark-friendly depth. `device="cuda"` draws the random numbers on the GPU (billions of them
    in seconds; a seeded CUDA generator gives other, equally deterministic, values than the CPU one).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if arch not in ARCHES:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHES)}")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    shape = {**PRESETS[preset], **(overrides or {})}
    tokenizer = _tokenizer(384 if shape["vocab_size"] is None else 1024)
    vocab_size = shape["vocab_size"] or len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = _config(arch, shape, vocab_size, eos_id, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)  # type: ignore[no-untyped-call]
    generator = torch.Generator(device=device).manual_seed(seed)
    std = 0.02 if preset != "tiny" else 0.2  # tiny models need larger weights for non-degenerate text
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shards: list[dict[str, torch.Tensor]] = []
    for name, parameter in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            tensor = torch.ones(parameter.shape, dtype=torch_dtype)
        else:
            drawn = torch.randn(parameter.shape, generator=generator, device=device, dtype=torch.float32)
            tensor = (drawn * std).to(torch_dtype).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > _SHARD_BYTES:
            shards.append(shard)
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += nbytes
    shards.append(shard)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
    else:
        weight_map: dict[str, str] = {}
        for i, part in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, str(out_dir / file_name), metadata=metadata)
            weight_map.update(dict.fromkeys(part, file_name))
        total = sum(t.numel() * t.element_size() for part in shards for t in part.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return out_dir
