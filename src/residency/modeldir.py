"""Checks of a Hugging Face model directory that need no torch: allowed roots, config, remote code, sizes.

Shared by the operator (validation before placement) and the worker (before it loads anything).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from residency import sizing

# model_type values whose decoder the engine places layer by layer (all native to transformers).
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3"})

DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HEADER_ERRORS = (OSError, ValueError, LookupError, TypeError, AttributeError, RecursionError, struct.error)
# what LLMModel's CRD pattern forbids in spec.source.path: control characters and the invisible or
# bidirectional format characters that make a path read as another
_DISGUISING = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_MAX_DIMENSION = 2**24  # no config dimension of a real decoder comes near (vocabularies are ~2**18)
_MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json and friends: larger is not a model's config


class ModelDirError(Exception):
    """A model directory that cannot be served; reason is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ModelDirInfo:
    """What a valid model directory holds."""

    path: Path
    model_type: str
    num_layers: int
    hidden_size: int
    num_key_value_heads: int
    head_dim: int
    parameter_count: int
    weight_bytes: int
    kv_bytes_per_token: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    dtype_bytes: int
    largest_unit_bytes: int
    """Bytes of the biggest unit the engine may stream: a decoder layer or an untied LM head."""
    unit_bytes: tuple[int, ...] = ()
    """Bytes of each unit the engine places, in its priority order (head, layers, untied embedding): what
    the planner counts a partial placement's resident bytes from (``sizing.resident_units``)."""
    trust_remote_code: bool = False
    """True only when config.json declares custom code and the directory lies under a root the admin
    allowed remote code for; transformers gets trust_remote_code=True only then."""

    def workspace_bytes(self, max_sequence_length: int, max_batch_size: int) -> int:
        """What the engine reserves beside weights and KV for these limits (residency.sizing)."""
        return sizing.workspace_bytes(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            element_bytes=self.dtype_bytes,
            max_sequence_length=max_sequence_length,
            max_batch_size=max_batch_size,
        )


def _under(real: Path, roots: Sequence[Path]) -> bool:
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            return True
    return False


def _unreadable(path: str | Path, exc: OSError) -> ModelDirError:
    missing = exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP)
    reason = "ModelNotFound" if missing else "ModelUnreadable"
    return ModelDirError(reason, f"{str(path)[:300]!r} cannot be read: {exc.strerror or exc}")


def resolve_under_roots(path: str, allowed_roots: Sequence[Path]) -> Path:
    """The real path of `path` (symlinks followed) if it lies under one of the allowed roots."""
    if not os.path.isabs(path):
        raise ModelDirError("PathNotAllowed", f"{path[:300]!r} is not an absolute path")
    if _DISGUISING.search(path):
        raise ModelDirError(
            "PathNotAllowed",
            f"{path[:300]!r} holds a control, NUL or invisible/bidirectional format character",
        )
    try:
        real = Path(os.path.realpath(path))
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if _under(real, allowed_roots):
        return real
    roots = ", ".join(str(r) for r in allowed_roots) or "(none configured)"
    raise ModelDirError(
        "PathNotAllowed",
        f"{path[:300]} resolves to {str(real)[:300]}, which is outside the allowed model roots: {roots}",
    )


def check_files_stay_under_roots(directory: Path, allowed_roots: Sequence[Path]) -> None:
    """Every entry of the model directory is a regular file or directory whose real path lies under an
    allowed root: a symlinked config.json, tokenizer or weights file cannot reach outside them (another
    tenant's files, a device such as /dev/zero, a FIFO that blocks the reader)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise _unreadable(directory, exc) from exc
    for entry in entries:
        try:
            real = Path(os.path.realpath(entry))
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise ModelDirError(
                "PathNotAllowed", f"{entry.name} in {directory} is a broken or looping link: {exc.strerror}"
            ) from exc
        if not _under(real, allowed_roots):
            raise ModelDirError(
                "PathNotAllowed",
                f"{entry.name} in {directory} is a link to {real}, outside the allowed model roots",
            )
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelDirError(
                "PathNotAllowed", f"{entry.name} in {directory} is not a regular file or directory"
            )


def read_config(directory: Path, allow_remote_code: bool = False) -> dict[str, Any]:
    """config.json of a model directory, checked for remote code and a supported architecture.

    `allow_remote_code`: the directory lies under a root where the admin allowed custom code, so a config
    that declares `auto_map` is accepted (its model_type must still be one the engine computes natively).
    """
    try:
        if not directory.is_dir():
            raise ModelDirError("ModelNotFound", f"model directory {directory} does not exist")
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ModelDirError(
                "ConfigMissing", f"{config_path} is missing: not a Hugging Face model directory"
            )
        if config_path.stat().st_size > _MAX_JSON_BYTES:
            raise ModelDirError("ConfigInvalid", f"{config_path} is larger than {_MAX_JSON_BYTES} bytes")
    except OSError as exc:
        raise _unreadable(directory, exc) from exc
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelDirError("ConfigInvalid", f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelDirError("ConfigInvalid", f"{config_path} must hold a JSON object")
    if "auto_map" in config and not allow_remote_code:
        raise ModelDirError(
            "RemoteCodeNotAllowed",
            f"{config_path} declares auto_map (custom code); residency loads models with "
            "trust_remote_code=False unless the admin allows remote code for the model's root",
        )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise ModelDirError(
            "UnsupportedArchitecture", f"model_type {model_type!r} is not supported (supported: {supported})"
        )
    return config


def safetensors_parameter_count(directory: Path) -> int:
    """Number of parameters in the directory's *.safetensors files, read from their headers only."""
    return _read_safetensors_headers(directory)[0]


def unit_elements(aligned_by_name: dict[str, int], num_layers: int, tied: bool) -> tuple[int, ...]:
    """Elements of each unit the engine places, in its priority order (head, layer 0 … N-1, then the
    embedding when the head is not tied to it), from the checkpoint's tensors, each aligned as the engine's
    cache lays it out (the engine's ``loading.plan_layout``): the head holds the final norm and the LM head
    matrix (the embedding when tied)."""
    head = layers = embed = 0
    per_layer = [0] * num_layers
    for name, elements in aligned_by_name.items():
        if name.startswith("model.layers."):
            index = name[len("model.layers.") :].split(".", 1)[0]
            if index.isdecimal() and int(index) < num_layers:
                per_layer[int(index)] += elements
                layers += elements
        elif name == "model.embed_tokens.weight":
            if tied:
                head += elements
            else:
                embed += elements
        elif name == "model.norm.weight" or (name == "lm_head.weight" and not tied):
            head += elements
    return (head, *per_layer, *(() if tied else (embed,)))


def _read_safetensors_headers(directory: Path) -> tuple[int, set[int], int, dict[str, int]]:
    """Parameter count, the decoder layer indices (model.layers.N.*) the headers name, the elements the
    engine's cache gives the tensors (each starts aligned: `sizing.aligned_numel`), and those per tensor."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelDirError("WeightsMissing", f"no *.safetensors files in {directory}")
    total = aligned_total = 0
    layers: set[int] = set()
    aligned_by_name: dict[str, int] = {}
    for file in files:
        try:
            size_bytes = file.stat().st_size
            with file.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len > min(size_bytes - 8, _MAX_HEADER_BYTES):
                    raise ValueError(f"header length {header_len} exceeds the file")
                header = json.loads(handle.read(header_len))
            data_bytes = size_bytes - 8 - header_len
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, end = entry["data_offsets"]
                if not 0 <= start <= end <= data_bytes:
                    raise ValueError(f"tensor {name} lies outside the file (truncated?)")
                count = 1
                for dim in entry["shape"]:
                    if int(dim) < 0:
                        raise ValueError(f"tensor {name} has a negative dimension")
                    count *= int(dim)
                if count * _SAFETENSORS_DTYPE_BYTES[entry["dtype"]] != end - start:
                    raise ValueError(f"tensor {name} has a size that does not match its shape")
                total += count
                aligned_total += sizing.aligned_numel(count)
                aligned_by_name[name] = sizing.aligned_numel(count)
                if name.startswith("model.layers."):
                    index = name[len("model.layers.") :].split(".", 1)[0]
                    if index.isdecimal():
                        layers.add(int(index))
        except _HEADER_ERRORS as exc:
            raise ModelDirError(
                "WeightsCorrupt", f"{file.name} is not a valid safetensors file: {exc}"
            ) from exc
    return total, layers, aligned_total, aligned_by_name


def inspect_model_dir(
    path: str,
    allowed_roots: Sequence[Path],
    dtype: str = "bfloat16",
    remote_code_roots: Sequence[Path] = (),
) -> ModelDirInfo:
    """Validates a model directory as the engine will load it and sizes its weights and KV cache.

    `remote_code_roots`: roots (each also an allowed root) under which the admin allows models that ship
    custom code (`auto_map`); everywhere else such a model is refused. Empty by default.
    """
    directory = resolve_under_roots(path, allowed_roots)
    allow_remote_code = _under(directory, remote_code_roots)
    check_files_stay_under_roots(directory, allowed_roots)  # before anything in it is read
    config = read_config(directory, allow_remote_code=allow_remote_code)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ModelDirError("TokenizerMissing", f"no tokenizer.json or tokenizer.model in {directory}")
    parameter_count, weight_layers, aligned_parameters, aligned_by_name = _read_safetensors_headers(directory)
    try:
        num_layers = int(config["num_hidden_layers"])
        hidden_size = int(config["hidden_size"])
        num_heads = int(config["num_attention_heads"])
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        head_dim = int(config.get("head_dim") or hidden_size // num_heads)
        intermediate_size = int(config.get("intermediate_size") or 4 * hidden_size)
        vocab_size = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ModelDirError("ConfigInvalid", f"config.json lacks a usable decoder shape: {exc}") from exc
    shape = {
        "num_hidden_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
    }
    for key, value in shape.items():
        if not 1 <= value <= _MAX_DIMENSION:
            raise ModelDirError(
                "ConfigInvalid", f"config.json: {key} = {value} is outside [1, {_MAX_DIMENSION}]"
            )
    # the engine builds the model skeleton from config.json: it must describe the weights that are there
    if not weight_layers or parameter_count == 0:
        raise ModelDirError(
            "WeightsMissing",
            f"the *.safetensors files in {directory} hold {parameter_count} parameters and no decoder "
            f"layer (model.layers.N.*); config.json says {num_layers}",
        )
    if weight_layers != set(range(num_layers)):
        raise ModelDirError(
            "ConfigInvalid",
            f"config.json says {num_layers} decoder layers; the weights hold {len(weight_layers)} "
            f"(model.layers.{min(weight_layers)}..{max(weight_layers)})",
        )
    dtype_bytes = DTYPE_BYTES[dtype]
    # what the engine's cache holds: the parameters plus each tensor's alignment padding
    weight_bytes = aligned_parameters * dtype_bytes
    head_bytes = (
        0
        if config.get("tie_word_embeddings")
        else sizing.aligned_numel(vocab_size * hidden_size) * dtype_bytes
    )
    embed_bytes = sizing.aligned_numel(vocab_size * hidden_size) * dtype_bytes
    layer_bytes = max(0, weight_bytes - embed_bytes - head_bytes) // max(1, num_layers)
    tied = bool(config.get("tie_word_embeddings"))
    units = tuple(elements * dtype_bytes for elements in unit_elements(aligned_by_name, num_layers, tied))
    return ModelDirInfo(
        path=directory,
        model_type=str(config["model_type"]),
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        parameter_count=parameter_count,
        weight_bytes=weight_bytes,
        # keys and values, every layer, at the serving dtype
        kv_bytes_per_token=2 * num_layers * num_kv_heads * head_dim * dtype_bytes,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        vocab_size=vocab_size,
        dtype_bytes=dtype_bytes,
        largest_unit_bytes=max(layer_bytes, head_bytes),
        unit_bytes=units if sum(units) == weight_bytes else (),  # else a checkpoint with extra tensors
        trust_remote_code=allow_remote_code and "auto_map" in config,
    )
