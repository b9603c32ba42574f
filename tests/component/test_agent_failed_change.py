"""A worker that cannot carry out a change to a loaded model (a promotion that does not fit) keeps serving
it as it was, and says so on its placement: the operator then plans from what the model still holds."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from residency.modelgen import make_model
from residency_operator.state import current_placement
from residency_worker.agent import NodeAgent
from residency_worker.engine import Engine, EngineError, make_gpu_tier
from residency_worker.presence import AgentConfig


class FakeCustom:
    """The placement API as the agent calls it: one placement, status patches merged into it."""

    def __init__(self, placement: dict[str, Any]) -> None:
        self.placement = placement

    def list_cluster_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"items": [copy.deepcopy(self.placement)]}

    def patch_cluster_custom_object_status(
        self, group: str, version: str, plural: str, name: str, body: dict[str, Any]
    ) -> None:
        status = self.placement.setdefault("status", {})
        for key, value in body["status"].items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value

    def patch_cluster_custom_object(self, *args: Any, **kwargs: Any) -> None:
        pass


class FakeCore:
    def patch_node_status(self, *args: Any, **kwargs: Any) -> None:
        pass


def _placement(root: Path) -> dict[str, Any]:
    return {
        "metadata": {"name": "t.m", "generation": 1, "resourceVersion": "1"},
        "spec": {
            "model": {"namespace": "t", "name": "m", "uid": "u"},
            "nodeName": "n1",
            "sourcePath": str(root / "tiny"),
            "dtype": "float32",
            "residentFraction": 0.25,
            "minResidentFraction": 0.0,
            "executionMode": "stream",
            "desiredState": "Loaded",
            "maxSequenceLength": 64,
            "maxBatchSize": 1,
        },
    }


def _loaded_setup(root: Path) -> tuple[Engine, dict[str, Any], NodeAgent]:
    """A tiny model, an emulated 900 kB GPU, its placement (at 25 %) and the node agent that serves it."""
    make_model(root / "tiny", "llama", "tiny", seed=5, dtype="float32")
    engine = Engine(make_gpu_tier(900_000, force_emulated=True), [root], node="n1", calibration_bytes=0)
    placement = _placement(root)
    return engine, placement, _agent(engine, FakeCustom(placement))


def _agent(engine: Engine, api: FakeCustom) -> NodeAgent:
    agent = NodeAgent(
        engine,
        AgentConfig(node="n1", endpoint="http://w", host_memory_bytes=2**34),
        custom=api,  # type: ignore[arg-type]
        core=FakeCore(),  # type: ignore[arg-type]
    )
    agent.heartbeat = lambda force=False: None  # type: ignore[method-assign]
    return agent


def test_a_promotion_that_does_not_fit_leaves_the_model_serving_and_says_so(tmp_path: Path) -> None:
    engine, placement, agent = _loaded_setup(tmp_path)
    try:
        agent.sync()
        status = placement["status"]
        held = status["residentFraction"]
        assert status["state"] == "Loaded" and "reason" not in status
        # the planner reads the fraction it placed (whole layers round it): no change to undo
        assert current_placement(placement, datetime.now(UTC)).resident_fraction == 0.25  # type: ignore[union-attr]

        assert status["executionMode"] == "stream"
        # more than the 900 kB budget holds, and in another mode
        placement["spec"].update(residentFraction=1.0, executionMode="cpu")
        placement["metadata"]["generation"] = 2
        agent.sync()
        agent.sync()  # and it stays so (no retry until room frees)
        status = placement["status"]
        assert engine.status("t/m").state == "ready"
        assert status["state"] == "Loaded", "it still serves"
        assert status["endpoint"] == "http://w/v1"
        assert status["residentFraction"] == held, "what it holds, not what the spec asks"
        assert status["reason"] == "PlacementDoesNotFit"
        assert "could not change to 100% resident (cpu)" in status["message"]
        assert "still serving at 31%" in status["message"]
        # and the planner plans from what it holds, not from the promotion that did not happen
        now = current_placement(placement, datetime.now(UTC))
        assert now is not None and now.state == "loaded" and now.resident_fraction == held
        assert now.mode == "stream", "the mode it runs in (its stream buffers count), not the spec's"

        placement["spec"].update(residentFraction=0.25, executionMode="stream")  # taken back: warning goes
        placement["metadata"]["generation"] = 3
        agent.sync()
        assert "reason" not in placement["status"] and placement["status"]["state"] == "Loaded"
    finally:
        engine.close()


def test_a_failed_preemption_is_not_reported_as_a_failed_residency_change(
    tmp_path: Path, monkeypatch: Any
) -> None:
    engine, placement, agent = _loaded_setup(tmp_path)
    try:
        agent.sync()
        assert placement["status"]["state"] == "Loaded"

        def refuse(name: str) -> None:
            raise EngineError("SaveFailed", "the KV cache could not be saved")

        monkeypatch.setattr(engine, "preempt", refuse)
        placement["spec"]["desiredState"] = "Preempted"
        placement["metadata"]["generation"] = 2
        agent.sync()
        status = placement["status"]
        assert (status["state"], status["reason"]) == ("Failed", "SaveFailed")
        assert "could not change" not in status["message"]
    finally:
        engine.close()


def test_a_cpu_placement_decodes_on_the_host_and_prefills_streamed(tmp_path: Path) -> None:
    """The operator's mode is the decode mode; prefill streams in both (``PREFILL_MODE``), on load and on a
    later change of mode, as the planner predicts and counts memory for."""
    make_model(tmp_path / "tiny", "llama", "tiny", seed=5, dtype="float32")
    engine = Engine(make_gpu_tier(2_000_000, force_emulated=True), [tmp_path], node="n1", calibration_bytes=0)
    placement = _placement(tmp_path)
    placement["spec"]["executionMode"] = "cpu"
    agent = _agent(engine, FakeCustom(placement))
    try:
        agent.sync()
        assert placement["status"]["state"] == "Loaded"
        residency = engine.residency("t/m")
        assert (residency.decode_mode, residency.prefill_mode) == ("cpu", "stream")
        placement["spec"].update(residentFraction=0.5, executionMode="stream")
        placement["metadata"]["generation"] = 2
        agent.sync()
        residency = engine.residency("t/m")
        assert (residency.decode_mode, residency.prefill_mode) == ("stream", "stream")
        placement["spec"].update(executionMode="cpu")
        placement["metadata"]["generation"] = 3
        agent.sync()
        residency = engine.residency("t/m")
        assert (residency.decode_mode, residency.prefill_mode) == ("cpu", "stream")
        assert placement["status"]["executionMode"] == "cpu" and "reason" not in placement["status"]
    finally:
        engine.close()
