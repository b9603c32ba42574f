"""Shared fixtures: small fake model directories (config + safetensors headers + tokenizer file)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 2,
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 4,
}

MakeDir = Callable[..., Path]


@pytest.fixture
def make_model_dir(tmp_path: Path) -> MakeDir:
    """Writes a directory that passes (or, edited, fails) the model checks; no torch needed."""

    def make(
        name: str = "m", config: dict[str, Any] | None = None, root: Path | None = None, params: int = 35
    ) -> Path:
        directory = (root or tmp_path) / name
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
        (directory / "tokenizer.json").write_text("{}")
        save_file(
            {"a": np.zeros((params - 3,), np.float32), "b": np.zeros((3,), np.float32)},
            directory / "model.safetensors",
        )
        return directory

    return make
