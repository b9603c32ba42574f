"""The node agent hands each model's SLO to the engine, which paces the model to it: at load, and when the
LLMModel's SLO changes later (nothing is reloaded for that)."""

from __future__ import annotations

from pathlib import Path

from test_agent_failed_change import FakeCustom, _agent, _placement

from residency.modelgen import make_model
from residency_worker.engine import Engine, make_gpu_tier


def test_the_agent_passes_the_slo_at_load_and_follows_its_changes(tmp_path: Path) -> None:
    make_model(tmp_path / "tiny", "llama", "tiny", seed=5, dtype="float32")
    engine = Engine(make_gpu_tier(4_000_000, force_emulated=True), [tmp_path], node="n1", calibration_bytes=0)
    try:
        placement = _placement(tmp_path)
        placement["spec"]["minDecodeTokensPerSecond"] = 8.0
        api = FakeCustom(placement)
        agent = _agent(engine, api)
        agent.sync()
        runner = engine._runner("t/m")
        assert runner.options.min_decode_tokens_per_second == 8.0
        assert runner.pace_interval_seconds is not None
        assert abs(runner.pace_interval_seconds - 0.1) < 1e-9  # 1 / (1.25 x 8 tok/s)
        api.placement["spec"]["minDecodeTokensPerSecond"] = 20.0
        agent.sync()
        assert engine._runner("t/m") is runner, "an SLO change reloads nothing"
        assert runner.options.min_decode_tokens_per_second == 20.0
        for bad in (None, "fast", -3):
            api.placement["spec"]["minDecodeTokensPerSecond"] = bad
            agent.sync()
            assert runner.options.min_decode_tokens_per_second is None
            assert runner.pace_interval_seconds is None
    finally:
        engine.close()
