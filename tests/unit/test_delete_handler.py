"""Deleting an LLMModel waits for its worker to unload it: an expected wait is logged at info, not as an
error; only an unload that takes longer than UNLOAD_WAIT_SECONDS hands back to kopf to retry."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest

from residency_operator.handlers import llmmodel


class FakeKube:
    def __init__(self, rounds_until_unloaded: int) -> None:
        self.rounds = rounds_until_unloaded
        self.deleted: list[str] = []

    def get_placement(self, name: str) -> dict[str, Any] | None:
        if self.rounds <= 0:
            return None
        self.rounds -= 1
        meta: dict[str, Any] = {"name": name}
        if self.deleted:
            meta["deletionTimestamp"] = "2026-12-01T12:00:00Z"
        return {"metadata": meta, "spec": {"nodeName": "gpu-a"}}

    def delete_placement(self, name: str) -> None:
        self.deleted.append(name)


class FakeController:
    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.pokes = 0

    def poke(self) -> None:
        self.pokes += 1


META = {"namespace": "team-a", "name": "chat"}


async def test_a_normal_delete_waits_quietly_for_the_unload(caplog: pytest.LogCaptureFixture) -> None:
    kube = FakeKube(rounds_until_unloaded=3)
    controller = FakeController(kube)
    logger = logging.getLogger("test.delete")
    with caplog.at_level(logging.DEBUG):
        await llmmodel.on_model_delete(meta=META, memo={"controller": controller}, logger=logger)
    assert len(kube.deleted) == 1  # the placement is deleted once, then awaited
    assert controller.pokes >= 1
    levels = {r.levelno for r in caplog.records if r.name == "test.delete"}
    assert levels == {logging.INFO}
    assert "waiting for the worker on gpu-a to unload" in caplog.text


async def test_an_unload_that_never_comes_is_retried_by_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llmmodel, "UNLOAD_WAIT_SECONDS", 0.0)
    kube = FakeKube(rounds_until_unloaded=1000)
    with pytest.raises(kopf.TemporaryError, match="has not unloaded the model"):
        await llmmodel.on_model_delete(
            meta=META, memo={"controller": FakeController(kube)}, logger=logging.getLogger("test.delete")
        )


async def test_nothing_to_wait_for_without_a_placement() -> None:
    kube = FakeKube(rounds_until_unloaded=0)
    await llmmodel.on_model_delete(
        meta=META, memo={"controller": FakeController(kube)}, logger=logging.getLogger("test.delete")
    )
    assert kube.deleted == []
