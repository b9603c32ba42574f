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
        # one tensor per decoder layer config.json names (as the engine loads them), the rest in a norm
        try:
            layers = max(1, int((config or LLAMA_CONFIG)["num_hidden_layers"]))
        except (KeyError, TypeError, ValueError):
            layers = 1
        layers = min(layers, params - 3)
        tensors = {
            f"model.layers.{i}.w": np.zeros(
                ((params - 3) // layers + (i < (params - 3) % layers),), np.float32
            )
            for i in range(layers)
        }
        save_file(
            {**tensors, "model.norm.weight": np.zeros((3,), np.float32)}, directory / "model.safetensors"
        )
        return directory

    return make
