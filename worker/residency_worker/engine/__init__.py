"""The torch engine: load, place layers, run with partial GPU residency, offload, preempt, resume, measure."""

from residency_worker.engine.engine import Engine, ModelOptions
from residency_worker.engine.tiers import GpuTier, make_gpu_tier
from residency_worker.engine.types import EngineError, SamplingParams

__all__ = ["Engine", "EngineError", "GpuTier", "ModelOptions", "SamplingParams", "make_gpu_tier"]
