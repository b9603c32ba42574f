"""The node agent on a worker with 3 EMULATED GPUs: it loads a placement split by spec.gpus, reports per-GPU
residency in status.gpus, moves it when spec.gpus changes, and when a GPU is lost marks that GPU's placement
Failed (reason GpuLost) while the placement on another GPU stays Loaded; its NodeProfile lists each GPU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from residency.api.nodeprofile import NodeProfileSpec
from residency.api.placement import ModelPlacementStatus
from residency.modelgen import make_model
from residency_worker.agent import NodeAgent
from residency_worker.engine import Engine
from residency_worker.engine.tiers import make_gpu_tiers
from residency_worker.gpus import refresh_gpu_fields
from residency_worker.presence import AgentConfig

MIB = 2**20


class FakeCustom:
    """The placement API as the agent calls it: placements by name, status patches merged into them."""

    def __init__(self, placements: list[dict[str, Any]]) -> None:
        self.placements = {p["metadata"]["name"]: p for p in placements}

    def list_cluster_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"items": [copy.deepcopy(p) for p in self.placements.values()]}

    def patch_cluster_custom_object_status(
        self, group: str, version: str, plural: str, name: str, body: dict[str, Any]
    ) -> None:
        status = self.placements[name].setdefault("status", {})
        for key, value in body["status"].items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value


class FakeCore:
    def patch_node_status(self, *args: Any, **kwargs: Any) -> None:
        pass


def _placement(root: Path, name: str, fraction: float, gpus: list[dict[str, Any]] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"namespace": "t", "name": name, "uid": name},
        "nodeName": "n1",
        "sourcePath": str(root / "m"),
        "dtype": "float32",
        "residentFraction": fraction,
        "executionMode": "stream",
        "desiredState": "Loaded",
        "maxSequenceLength": 64,
        "maxBatchSize": 2,
    }
    if gpus is not None:
        spec["gpus"] = gpus
    return {"metadata": {"name": f"t.{name}", "generation": 1, "resourceVersion": "1"}, "spec": spec}


def test_agent_converges_split_placements_and_fails_only_a_lost_gpus_models(tmp_path: Path) -> None:
    make_model(tmp_path / "m", "llama", "tiny", seed=2, dtype="float32", overrides={"num_hidden_layers": 6})
    engine = Engine(make_gpu_tiers([8 * MIB], emulated_count=3), [tmp_path], node="n1", calibration_bytes=0)
    split = _placement(
        tmp_path, "split", 0.6, [{"index": 1, "residentFraction": 0.3}, {"index": 2, "residentFraction": 0.3}]
    )
    alone = _placement(tmp_path, "alone", 0.5, None)
    api = FakeCustom([split, alone])
    agent = NodeAgent(
        engine,
        AgentConfig(node="n1", endpoint="http://w", host_memory_bytes=2**34),
        custom=api,  # type: ignore[arg-type]
        core=FakeCore(),  # type: ignore[arg-type]
    )
    agent.heartbeat = lambda force=False: None  # type: ignore[method-assign]
    try:
        registered = NodeProfileSpec.model_validate(agent.profile_spec())
        assert [gpu.index for gpu in registered.gpus] == [0, 1, 2] and registered.gpu_count == 3
        assert registered.gpu_memory_bytes == 3 * 8 * MIB and all(
            g.memory_bytes == 8 * MIB for g in registered.gpus
        )
        assert registered.emulated and all(gpu.name == "emulated-cpu" for gpu in registered.gpus)
        assert all(gpu.hbm_gbps > 0 and gpu.host_to_device_gbps > 0 for gpu in registered.gpus)
        # emulated GPUs copy from one host memory: one shared link, measured with all three copying
        assert [(link.gpus, link.concurrent_host_to_device_gbps > 0) for link in registered.host_links] == [
            ([0, 1, 2], True)
        ]
        assert registered.device_to_device_gbps and registered.device_to_device_gbps > 0
        agent.sync()
        status = ModelPlacementStatus.model_validate(api.placements["t.split"]["status"])
        assert status.state == "Loaded"
        assert [gpu.index for gpu in status.gpus] == [1, 2]
        owner = engine.runner("t/split").owner
        for gpu in status.gpus:  # the worker's measured bytes, per GPU
            assert gpu.resident_fraction and gpu.resident_fraction > 0
            assert gpu.resident_bytes == engine.tiers[gpu.index].allocated_bytes(
                owner, "weights"
            ) + engine.tiers[gpu.index].allocated_bytes(owner, "kv")
        assert engine.tiers[0].reserved_bytes(owner) == 0
        alone_status = ModelPlacementStatus.model_validate(api.placements["t.alone"]["status"])
        assert alone_status.state == "Loaded" and [gpu.index for gpu in alone_status.gpus] == [0]

        # the operator moves the split: other GPUs and shares (a promotion, in place)
        api.placements["t.split"]["spec"]["gpus"] = [
            {"index": 2, "residentFraction": 0.4},
            {"index": 1, "residentFraction": 0.2},
        ]
        api.placements["t.split"]["metadata"]["generation"] = 2
        agent.sync()
        moved = ModelPlacementStatus.model_validate(api.placements["t.split"]["status"])
        assert moved.state == "Loaded" and [gpu.index for gpu in moved.gpus] == [2, 1]
        assert engine.runner("t/split").owner == owner, "moved live, not reloaded"

        engine.inject_gpu_fault(2, "Xid 79 (injected)")
        assert refresh_gpu_fields(agent.profile_spec(), engine), "the heartbeat re-registers the profile"
        agent.sync()
        failed = ModelPlacementStatus.model_validate(api.placements["t.split"]["status"])
        assert failed.state == "Failed" and failed.reason == "GpuLost"
        assert failed.message and "GPU 2" in failed.message
        assert failed.gpus == [], "a failed model holds nothing on any GPU"
        assert api.placements["t.alone"]["status"]["state"] == "Loaded", "the other GPU's model keeps serving"
        assert engine.generate("t/alone", "Hello", None).token_ids

        # placed again by the operator, on a GPU that works: loads afresh and serves
        api.placements["t.split"]["spec"]["gpus"] = [{"index": 1, "residentFraction": 0.6}]
        api.placements["t.split"]["metadata"]["generation"] = 3
        agent.sync()
        again = ModelPlacementStatus.model_validate(api.placements["t.split"]["status"])
        assert again.state == "Loaded" and [gpu.index for gpu in again.gpus] == [1]
        assert engine.generate("t/split", "Hello", None).token_ids

        # the NodeProfile drops the lost GPU (the planner places nothing there); node-level fields follow
        assert not refresh_gpu_fields(agent.profile_spec(), engine), "nothing changed since"
        profile = NodeProfileSpec.model_validate(agent.profile_spec())
        assert [gpu.index for gpu in profile.gpus] == [0, 1]
        assert profile.gpu_count == 2 and profile.gpu_memory_bytes == 2 * 8 * MIB
        assert [link.gpus for link in profile.host_links] == [[0, 1]]
    finally:
        engine.close()


async def test_admin_api_loads_a_split_and_injects_a_gpu_fault_admin_only(tmp_path: Path) -> None:
    import httpx

    from residency_worker.server import ServerSettings, create_app

    make_model(tmp_path / "m", "llama", "tiny", seed=2, dtype="float32", overrides={"num_hidden_layers": 6})
    engine = Engine(make_gpu_tiers([8 * MIB], emulated_count=2), [tmp_path], node="n1", calibration_bytes=0)
    app = create_app(engine, ServerSettings(admin_token="admin-secret"))
    admin = {"Authorization": "Bearer admin-secret"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as http:
            body = {
                "name": "m",
                "path": str(tmp_path / "m"),
                "dtype": "float32",
                "resident_fraction": 0.6,
                "decode_mode": "stream",
                "max_sequence_length": 64,
                "max_batch_size": 2,
                "gpus": [{"index": 1, "resident_fraction": 0.3}, {"index": 0, "resident_fraction": 0.3}],
            }
            loaded = await http.post("/admin/models", headers=admin, json=body, timeout=60)
            assert loaded.status_code == 200, loaded.text
            assert [gpu["index"] for gpu in loaded.json()["residency"]["gpus"]] == [1, 0]
            node = (await http.get("/admin/node", headers=admin)).json()
            assert [gpu["index"] for gpu in node["gpus"]] == [0, 1] and node["emulated"] is True
            assert (await http.post("/admin/gpus/1/fault")).status_code == 401, "admin only"
            assert engine.status("m").state == "ready"
            fault = await http.post("/admin/gpus/1/fault", headers=admin)
            assert fault.status_code == 200 and fault.json()["failedModels"] == ["m"]
            answer = await http.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "GpuLost"
            missing = await http.post("/admin/gpus/7/fault", headers=admin)
            assert missing.status_code == 400 and "GPU 7 does not exist" in missing.text
    finally:
        engine.close()
