"""Model directory checks shared by operator and worker: roots, config, remote code, weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import LLAMA_CONFIG as CONFIG
from conftest import MakeDir
from residency.modeldir import ModelDirError, inspect_model_dir
from residency_operator.conditions import Verdict
from residency_operator.validation import validate_model


def reason_of(path: str, roots: list[Path]) -> str:
    with pytest.raises(ModelDirError) as caught:
        inspect_model_dir(path, roots)
    return caught.value.reason


def test_valid_directory_is_sized_from_headers(tmp_path: Path, make_model_dir: MakeDir) -> None:
    directory = make_model_dir()
    info = inspect_model_dir(str(directory), [tmp_path], "bfloat16")
    assert info.parameter_count == 35
    # three tensors (two layers of 16 elements, a norm of 3), each padded to 128 elements as the engine's
    # cache lays them out
    assert info.weight_bytes == 3 * 128 * 2
    assert info.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2
    assert inspect_model_dir(str(directory), [tmp_path], "float32").weight_bytes == 3 * 128 * 4


def test_outside_roots_and_symlink_escape_are_refused(tmp_path: Path, make_model_dir: MakeDir) -> None:
    root = tmp_path / "root"
    outside = make_model_dir("m", root=tmp_path / "elsewhere")
    root.mkdir()
    os.symlink(outside, root / "link")
    assert reason_of(str(outside), [root]) == "PathNotAllowed"
    assert reason_of(str(root / "link"), [root]) == "PathNotAllowed"
    assert reason_of("relative/path", [root]) == "PathNotAllowed"


def test_missing_and_broken_directories_have_reasons(tmp_path: Path, make_model_dir: MakeDir) -> None:
    assert reason_of(str(tmp_path / "absent"), [tmp_path]) == "ModelNotFound"
    no_config = make_model_dir("noconfig")
    (no_config / "config.json").unlink()
    assert reason_of(str(no_config), [tmp_path]) == "ConfigMissing"
    bad_json = make_model_dir("badjson")
    (bad_json / "config.json").write_text("{not json")
    assert reason_of(str(bad_json), [tmp_path]) == "ConfigInvalid"
    remote = make_model_dir("remote", {**CONFIG, "auto_map": {"AutoModel": "x.Y"}})
    assert reason_of(str(remote), [tmp_path]) == "RemoteCodeNotAllowed"
    unsupported = make_model_dir("gpt2", {**CONFIG, "model_type": "gpt2"})
    assert reason_of(str(unsupported), [tmp_path]) == "UnsupportedArchitecture"
    no_tok = make_model_dir("notok")
    (no_tok / "tokenizer.json").unlink()
    assert reason_of(str(no_tok), [tmp_path]) == "TokenizerMissing"
    truncated = make_model_dir("trunc")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-10])
    assert reason_of(str(truncated), [tmp_path]) == "WeightsCorrupt"
    garbage = make_model_dir("garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    assert reason_of(str(garbage), [tmp_path]) == "WeightsCorrupt"
    no_weights = make_model_dir("noweights")
    (no_weights / "model.safetensors").unlink()
    assert reason_of(str(no_weights), [tmp_path]) == "WeightsMissing"
    # headers that parse but hold nothing the engine can load: no parameters, or no decoder layer
    empty = make_model_dir("empty")
    save_file({"a": np.zeros((0,), np.float32)}, empty / "model.safetensors")
    assert reason_of(str(empty), [tmp_path]) == "WeightsMissing"
    unnamed = make_model_dir("unnamed")
    save_file({"a": np.zeros((32,), np.float32)}, unnamed / "model.safetensors")
    assert reason_of(str(unnamed), [tmp_path]) == "WeightsMissing"


def test_operator_validation_gives_failed_or_pending(tmp_path: Path, make_model_dir: MakeDir) -> None:
    failed = validate_model({"source": {"path": str(tmp_path / "absent")}}, [tmp_path])
    assert isinstance(failed, Verdict) and failed.phase == "Failed" and failed.reason == "ModelNotFound"
    info = validate_model({"source": {"path": str(make_model_dir())}}, [tmp_path])
    assert not isinstance(info, Verdict)
    assert info.model_type == "llama" and info.weight_bytes == 3 * 128 * 2  # three tensors, padded
