"""make_model: random HF model directories that transformers and the engine's checks accept, offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from residency import modelgen
from residency.modeldir import inspect_model_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", modelgen.ARCHES)
def test_tiny_model_loads_with_transformers(tmp_path: Path, arch: str) -> None:
    out = modelgen.make_model(tmp_path / arch, arch=arch, preset="tiny", seed=3, dtype="float32")
    config = AutoConfig.from_pretrained(out, trust_remote_code=False)
    assert config.model_type == arch and config.num_hidden_layers == 4 and config.hidden_size == 64
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)  # type: ignore[no-untyped-call]
    ids = tokenizer("Hello world").input_ids
    assert tokenizer.decode(ids) == "Hello world"
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id == config.eos_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "hi" in chat
    info = inspect_model_dir(str(out), [tmp_path], "float32")
    assert info.num_layers == 4
    # float32: the parameters plus at most 127 elements of alignment padding per tensor
    padding_bytes = info.weight_bytes - info.parameter_count * 4
    with safe_open(next(out.glob("*.safetensors")), "pt") as weights:
        tensor_count = len(list(weights.keys()))
    assert 0 <= padding_bytes <= tensor_count * 127 * 4


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    first = modelgen.make_model(tmp_path / "a", seed=5, dtype="bfloat16")
    second = modelgen.make_model(tmp_path / "b", seed=5, dtype="bfloat16")
    third = modelgen.make_model(tmp_path / "c", seed=6, dtype="bfloat16")
    assert _digest(first / "model.safetensors") == _digest(second / "model.safetensors")
    assert _digest(first / "model.safetensors") != _digest(third / "model.safetensors")
    assert json.loads((first / "config.json").read_text())["dtype"] == "bfloat16"


def test_large_presets_are_sharded_with_an_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modelgen, "_SHARD_BYTES", 200_000)
    out = modelgen.make_model(tmp_path / "sharded", arch="qwen2", preset="tiny", dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / shard).is_file() for shard in shards)
    assert not (out / "model.safetensors").exists()
    assert inspect_model_dir(str(out), [tmp_path], "float32").num_layers == 4


def test_real_shapes_of_the_presets() -> None:
    assert modelgen.PRESETS["qwen2.5-0.5b"]["hidden_size"] == 896
    assert modelgen.PRESETS["llama-3-8b"]["num_key_value_heads"] == 8


def test_unknown_arch_or_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch"):
        modelgen.make_model(tmp_path / "x", arch="gpt2")
    with pytest.raises(ValueError, match="preset"):
        modelgen.make_model(tmp_path / "x", preset="huge")
