"""Load a Hugging Face model directory into one pinned host buffer, unit by unit, without remote code.

The module tree is instantiated on the `meta` device only to learn the expected parameter names and
shapes; each safetensors tensor is then copied straight into its slot of the host weight cache (one
contiguous, pinned buffer laid out by placement unit), from which resident units go to the GPU.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from residency.modeldir import ModelDirError, inspect_model_dir
from residency.sizing import aligned_numel
from residency_worker.engine.tiers import GpuTier
from residency_worker.engine.types import EngineError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class ArchSpec:
    """The decoder shape the forward pass needs, read from a native transformers config."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    sliding_windows: tuple[int | None, ...]  # per layer
    max_position_embeddings: int

    @property
    def kv_elements_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


@dataclass
class Unit:
    """A placement unit: the head (final norm + lm_head), one decoder layer, or the input embedding."""

    name: str
    offset: int  # elements into the host flat buffer
    numel: int
    tensors: dict[str, tuple[int, tuple[int, ...]]] = field(
        default_factory=dict
    )  # local name → (offset, shape)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of this unit's tensors inside `flat`, a buffer holding exactly this unit."""
        return {
            name: flat[off : off + _numel(shape)].view(shape) for name, (off, shape) in self.tensors.items()
        }


@dataclass
class LoadedWeights:
    path: Path
    config: PretrainedConfig
    spec: ArchSpec
    dtype: torch.dtype
    dtype_name: str
    units: list[Unit]  # priority order for residency: head, layer.0 … layer.N-1, embed
    host_flat: torch.Tensor  # the host weight cache (pinned on a real GPU node)
    tokenizer: Any
    read_seconds: float

    @property
    def element_size(self) -> int:
        return self.host_flat.element_size()

    def unit(self, name: str) -> Unit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(name)

    def host_unit(self, unit: Unit) -> torch.Tensor:
        return self.host_flat[unit.offset : unit.offset + unit.numel]

    def unit_bytes(self, unit: Unit) -> int:
        return unit.numel * self.element_size

    @property
    def weight_bytes(self) -> int:
        return sum(self.unit_bytes(u) for u in self.units)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def validate_model_dir(
    path: str, allowed_roots: list[Path], dtype_name: str, remote_code_roots: list[Path] | None = None
) -> tuple[Path, bool]:
    """Resolves and checks the directory (roots, config, remote code, architecture, weights) or raises.

    Returns the real directory and whether transformers may run its custom code: only when config.json
    declares some and the directory lies under one of `remote_code_roots` (none by default).
    """
    if dtype_name not in DTYPES:
        raise EngineError("InvalidDtype", f"dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    try:
        info = inspect_model_dir(path, allowed_roots, dtype_name, remote_code_roots or [])
    except ModelDirError as exc:
        raise EngineError(exc.reason, exc.message) from exc
    return info.path, info.trust_remote_code


def arch_spec(config: PretrainedConfig) -> ArchSpec:
    num_heads = int(config.num_attention_heads)
    hidden_size = int(config.hidden_size)
    num_layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    elif config.model_type == "mistral":
        windows = tuple(window for _ in range(num_layers))
    else:
        windows = tuple(None for _ in range(num_layers))
    return ArchSpec(
        model_type=str(config.model_type),
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden_size // num_heads),
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        rms_norm_eps=float(config.rms_norm_eps),
        hidden_act=str(config.hidden_act),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        sliding_windows=windows,
        max_position_embeddings=int(config.max_position_embeddings),
    )


def _unit_of(name: str, tied: bool) -> tuple[str, str]:
    """(unit name, local tensor name) of a checkpoint parameter name."""
    if name.startswith("model.layers."):
        index, local = name[len("model.layers.") :].split(".", 1)
        return f"layer.{int(index)}", local
    if name == "model.embed_tokens.weight":
        return ("head" if tied else "embed"), "embed_tokens.weight"
    if name == "model.norm.weight":
        return "head", "norm.weight"
    if name == "lm_head.weight":
        return "head", "lm_head.weight"
    raise EngineError("UnsupportedArchitecture", f"unexpected parameter {name!r} for a decoder-only model")


def plan_layout(
    config: PretrainedConfig, spec: ArchSpec, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[list[Unit], int]:
    """Units and their slots in the host buffer, from the parameters of the model built on `meta`."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=trust_remote_code, dtype=dtype
        )
    order = ["head", *(f"layer.{i}" for i in range(spec.num_layers))]
    if not spec.tie_word_embeddings:
        order.append("embed")
    units = {name: Unit(name=name, offset=0, numel=0) for name in order}
    for name, parameter in skeleton.named_parameters():  # tied parameters appear once
        unit_name, local = _unit_of(name, spec.tie_word_embeddings)
        unit = units[unit_name]
        unit.tensors[local] = (unit.numel, tuple(parameter.shape))
        unit.numel = aligned_numel(unit.numel + parameter.numel())
    offset = 0
    for name in order:
        units[name].offset = offset
        offset += units[name].numel
    return [units[name] for name in order], offset


def load_weights(
    directory: Path, dtype_name: str, tier: GpuTier, trust_remote_code: bool = False
) -> LoadedWeights:
    """Reads config, tokenizer and safetensors of an already validated directory into the host cache.

    `trust_remote_code` reaches transformers as given: validate_model_dir says True only for a model
    that declares custom code under a root where the admin allowed it.
    """
    dtype = DTYPES[dtype_name]
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        raise EngineError(
            "ConfigInvalid", f"transformers cannot read {directory}/config.json: {exc}"
        ) from exc
    spec = arch_spec(config)
    units, total_numel = plan_layout(config, spec, dtype, trust_remote_code)
    start = time.perf_counter()
    host_flat = tier.host_empty((total_numel,), dtype)
    slots = {}
    for unit in units:
        for local, (off, shape) in unit.tensors.items():
            slots[_checkpoint_name(unit.name, local)] = (unit.offset + off, shape)
    seen: set[str] = set()
    files = _weight_files(directory)
    for file in files:
        try:
            with (
                _opened_regular(file, directory) as readable,
                safe_open(readable, framework="pt", device="cpu") as reader,  # type: ignore[no-untyped-call]
            ):
                for name in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name not in slots:
                        if name == "lm_head.weight" and spec.tie_word_embeddings:
                            continue  # some tied checkpoints store the head too; it equals the embedding
                        raise EngineError("WeightsInvalid", f"{file.name}: unexpected tensor {name!r}")
                    offset, shape = slots[name]
                    source = reader.get_tensor(name)
                    if tuple(source.shape) != shape:
                        raise EngineError(
                            "WeightsInvalid",
                            f"{file.name}: tensor {name} has shape {tuple(source.shape)}, the config implies "
                            f"{shape}",
                        )
                    host_flat[offset : offset + source.numel()].view(shape).copy_(source)
                    seen.add(name)
        except SafetensorError as exc:
            raise EngineError(
                "WeightsCorrupt", f"{file.name} is not a valid safetensors file: {exc}"
            ) from exc
    missing = sorted(set(slots) - seen)
    if missing:
        raise EngineError(
            "WeightsInvalid", f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[0]}"
        )
    read_seconds = time.perf_counter() - start
    try:
        tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            directory, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # tokenizers raises plain Exceptions for a corrupt tokenizer.json
        raise EngineError("TokenizerInvalid", f"cannot load the tokenizer of {directory}: {exc}") from exc
    return LoadedWeights(
        path=directory,
        config=config,
        spec=spec,
        dtype=dtype,
        dtype_name=dtype_name,
        units=units,
        host_flat=host_flat,
        tokenizer=tokenizer,
        read_seconds=read_seconds,
    )


def _checkpoint_name(unit: str, local: str) -> str:
    if unit.startswith("layer."):
        return f"model.layers.{unit.split('.', 1)[1]}.{local}"
    if local == "lm_head.weight":
        return "lm_head.weight"
    return f"model.{local}"


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files to read: those the index names (inside the directory), else the top-level ones.

    Each must be a regular file: safe_open on a FIFO or a device blocks (or never ends) while holding the
    GIL, freezing the whole worker. Validation checked only the directory's top-level entries; the index
    may name files in subdirectories.
    """
    directory = directory.resolve()
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return [_regular_file(file, directory) for file in sorted(directory.glob("*.safetensors"))]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [(directory / name).resolve() for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise EngineError("WeightsInvalid", f"{index.name} is not a valid index: {exc}") from exc
    if any(directory not in file.parents for file in files):
        raise EngineError("WeightsInvalid", f"{index.name} points outside the model directory")
    return [_regular_file(file, directory) for file in files]


@contextmanager
def _opened_regular(file: Path, directory: Path) -> Iterator[str]:
    """A path that reads ``file`` as it is now: opened (never blocking: a FIFO put in its place since
    :func:`_regular_file` looked would hang the open), checked again to be a regular file, then read
    through the open descriptor (``/proc/self/fd/N``), so that nothing swapped in meanwhile is read."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EngineError(
            "WeightsMissing", f"{file.name} in {directory} cannot be read: {exc.strerror}"
        ) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EngineError("PathNotAllowed", f"{file.name} in {directory} is not a regular file")
        through_fd = Path(f"/proc/self/fd/{fd}")
        yield str(through_fd) if through_fd.exists() else str(file)
    finally:
        os.close(fd)


def _regular_file(file: Path, directory: Path) -> Path:
    """`file`, once os.stat (following links) says it is a regular file; the loader opens nothing else."""
    shown = file.relative_to(directory) if directory in file.parents else file.name
    try:
        mode = os.stat(file).st_mode
    except OSError as exc:
        raise EngineError("WeightsMissing", f"{shown} in {directory} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise EngineError("PathNotAllowed", f"{shown} in {directory} is not a regular file")
    return file
