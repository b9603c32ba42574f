"""The worker's admin API (the agent's and operators' calls): load, unload, residency, preempt, resume,
budget, profile, and GPU fault injection. Every route takes the admin token."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from residency_worker.engine import Engine, EngineError, ModelOptions
from residency_worker.engine.types import as_dict
from residency_worker.server.deps import engine_of, require_admin, settings_of
from residency_worker.server.errors import ServerSettings, api_error
from residency_worker.server.schemas import BudgetBody, LoadBody, ProfileBody, ResidencyBody

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
EngineDep = Annotated[Engine, Depends(engine_of)]
SettingsDep = Annotated[ServerSettings, Depends(settings_of)]


async def _call(settings: ServerSettings, function: Callable[..., Any], *args: Any) -> Any:
    """Runs an engine call in a thread (it may move weights for seconds); its EngineError as an ApiError."""
    try:
        return await asyncio.to_thread(function, *args)
    except EngineError as exc:
        raise api_error(exc, settings) from exc


@router.get("/node")
async def node(engine: EngineDep) -> dict[str, Any]:
    return as_dict(engine.node_report())


@router.put("/node/budget")
async def set_budget(body: BudgetBody, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    return as_dict(await _call(settings, engine.set_budget, body.gpu_memory_bytes, body.gpu))


@router.post("/gpus/{index}/fault")
async def inject_gpu_fault(index: int, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    """Fault injection: GPU ``index`` behaves as after an Xid error (its models fail with GpuLost)."""
    failed = await _call(settings, engine.inject_gpu_fault, index, "fault injected through the admin API")
    return {"gpu": index, "lost": True, "failedModels": failed}


@router.post("/models")
async def load(body: LoadBody, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    options = ModelOptions(
        dtype=body.dtype,
        resident_fraction=body.resident_fraction,
        decode_mode=body.decode_mode,
        prefill_mode=body.prefill_mode,
        max_batch_size=body.max_batch_size,
        max_sequence_length=body.max_sequence_length,
        max_queue=body.max_queue,
        min_decode_tokens_per_second=body.min_decode_tokens_per_second,
        gpus=tuple((gpu.index, gpu.resident_fraction) for gpu in body.gpus),
    )
    return as_dict(await _call(settings, engine.load, body.name, body.path, options))


@router.get("/models/{name}")
async def model_status(name: str, engine: EngineDep) -> dict[str, Any]:
    return as_dict(engine.status(name))


@router.delete("/models/{name}")
async def unload(name: str, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    await _call(settings, engine.unload, name)
    return {"unloaded": name}


@router.post("/models/{name}/residency")
async def set_residency(
    name: str, body: ResidencyBody, engine: EngineDep, settings: SettingsDep
) -> dict[str, Any]:
    def change() -> Any:
        gpus = None if body.gpus is None else tuple((gpu.index, gpu.resident_fraction) for gpu in body.gpus)
        return engine.set_residency(
            name,
            body.resident_fraction,
            decode_mode=body.decode_mode,
            prefill_mode=body.prefill_mode,
            gpus=gpus,
        )

    return as_dict(await _call(settings, change))


@router.post("/models/{name}/preempt")
async def preempt(name: str, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    return as_dict(await _call(settings, engine.preempt, name))


@router.post("/models/{name}/resume")
async def resume(name: str, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    return as_dict(await _call(settings, engine.resume, name))


@router.post("/profile")
async def profile(body: ProfileBody, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    from residency_worker.engine.profile import ProfileSettings, profile_model

    def measure() -> Any:
        return profile_model(
            engine,
            body.path,
            ProfileSettings(
                dtype=body.dtype,
                fractions=tuple(body.fractions),
                sequence_lengths=tuple(body.sequence_lengths),
                decode_tokens=body.decode_tokens,
                trials=body.trials,
            ),
        )

    result = await _call(settings, measure)
    return dict(result.to_json())
