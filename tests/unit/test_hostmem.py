"""The worker turns torch's huge-page CPU allocation on unless the environment says otherwise."""

from __future__ import annotations

import os

import pytest

from residency_worker import hostmem


def test_huge_pages_are_turned_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hostmem.THP_ENV, raising=False)
    assert hostmem.enable_huge_pages()
    assert os.environ[hostmem.THP_ENV] == "1"


def test_an_operator_can_turn_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hostmem.THP_ENV, "0")
    assert not hostmem.enable_huge_pages()
    assert os.environ[hostmem.THP_ENV] == "0"
