"""Model directory checks shared by operator and worker: roots, config, remote code, weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from residency.modeldir import ModelDirError, inspect_model_dir
from residency_operator.conditions import Verdict
from residency_operator.validation import pending_verdict, validate_model

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 2,
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def make_dir(root: Path, name: str = "m", config: dict[str, object] | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config or CONFIG))
    (directory / "tokenizer.json").write_text("{}")
    save_file(
        {"a": np.zeros((4, 8), np.float32), "b": np.zeros((3,), np.float32)}, directory / "model.safetensors"
    )
    return directory


def reason_of(path: str, roots: list[Path]) -> str:
    with pytest.raises(ModelDirError) as caught:
        inspect_model_dir(path, roots)
    return caught.value.reason


def test_valid_directory_is_sized_from_headers(tmp_path: Path) -> None:
    directory = make_dir(tmp_path)
    info = inspect_model_dir(str(directory), [tmp_path], "bfloat16")
    assert info.parameter_count == 35
    assert info.weight_bytes == 70
    assert info.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2
    assert inspect_model_dir(str(directory), [tmp_path], "float32").weight_bytes == 140


def test_outside_roots_and_symlink_escape_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = make_dir(tmp_path / "elsewhere")
    root.mkdir()
    os.symlink(outside, root / "link")
    assert reason_of(str(outside), [root]) == "PathNotAllowed"
    assert reason_of(str(root / "link"), [root]) == "PathNotAllowed"
    assert reason_of("relative/path", [root]) == "PathNotAllowed"


def test_missing_and_broken_directories_have_reasons(tmp_path: Path) -> None:
    assert reason_of(str(tmp_path / "absent"), [tmp_path]) == "ModelNotFound"
    no_config = make_dir(tmp_path, "noconfig")
    (no_config / "config.json").unlink()
    assert reason_of(str(no_config), [tmp_path]) == "ConfigMissing"
    bad_json = make_dir(tmp_path, "badjson")
    (bad_json / "config.json").write_text("{not json")
    assert reason_of(str(bad_json), [tmp_path]) == "ConfigInvalid"
    remote = make_dir(tmp_path, "remote", {**CONFIG, "auto_map": {"AutoModel": "x.Y"}})
    assert reason_of(str(remote), [tmp_path]) == "RemoteCodeNotAllowed"
    unsupported = make_dir(tmp_path, "gpt2", {**CONFIG, "model_type": "gpt2"})
    assert reason_of(str(unsupported), [tmp_path]) == "UnsupportedArchitecture"
    no_tok = make_dir(tmp_path, "notok")
    (no_tok / "tokenizer.json").unlink()
    assert reason_of(str(no_tok), [tmp_path]) == "TokenizerMissing"
    truncated = make_dir(tmp_path, "trunc")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-10])
    assert reason_of(str(truncated), [tmp_path]) == "WeightsCorrupt"
    garbage = make_dir(tmp_path, "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    assert reason_of(str(garbage), [tmp_path]) == "WeightsCorrupt"
    no_weights = make_dir(tmp_path, "noweights")
    (no_weights / "model.safetensors").unlink()
    assert reason_of(str(no_weights), [tmp_path]) == "WeightsMissing"


def test_operator_validation_gives_failed_or_pending(tmp_path: Path) -> None:
    failed = validate_model({"source": {"path": str(tmp_path / "absent")}}, [tmp_path])
    assert isinstance(failed, Verdict) and failed.phase == "Failed" and failed.reason == "ModelNotFound"
    info = validate_model({"source": {"path": str(make_dir(tmp_path))}}, [tmp_path])
    assert not isinstance(info, Verdict)
    assert pending_verdict(info, 0).reason == "NoNodes"
    assert pending_verdict(info, 2).reason == "AwaitingPlacement"
