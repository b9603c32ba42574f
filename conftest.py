"""Reliability suite plumbing, shared by tests/ and e2e/.

Tests marked ``reliability`` say what they injected and what they measured through the ``reliability``
fixture; pytest's outcome gives pass/fail. At the end of the session one table is printed (and written as
JSON to ``$RESIDENCY_RELIABILITY_JSON`` when set). Tests also marked ``slow_reliability`` run only with
``--reliability-full`` (``make reliability``); ``make test`` runs the fast part.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from dataclasses import asdict
from pathlib import Path

import pytest

from residency.reliability import ReliabilityRecord, table_lines

_RECORDS_KEY = pytest.StashKey[dict[str, "ReliabilityRecord"]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability-full", action="store_true", help="also run the long reliability tests")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: part of the reliability suite; recorded in its table")
    config.addinivalue_line("markers", "slow_reliability: long; runs with --reliability-full")
    config.stash[_RECORDS_KEY] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reliability-full"):
        return
    skip = pytest.mark.skip(reason="long reliability test: `make reliability` runs it")
    for item in items:
        if "slow_reliability" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> ReliabilityRecord:
    """The calling test's row in the reliability table."""
    records = request.config.stash[_RECORDS_KEY]
    name = request.node.nodeid.split("::", 1)[-1]
    return records.setdefault(request.node.nodeid, ReliabilityRecord(test=name))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if "reliability" not in item.keywords:
        return report
    records = item.config.stash[_RECORDS_KEY]
    row = records.setdefault(item.nodeid, ReliabilityRecord(test=item.nodeid.split("::", 1)[-1]))
    if report.when == "call" or (report.when == "setup" and not report.passed):
        row.outcome = "skipped" if report.skipped else ("pass" if report.passed else "FAIL")
    elif report.when == "teardown" and report.failed:
        row.outcome = "FAIL"
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    rows = [r for r in config.stash[_RECORDS_KEY].values() if r.outcome != "skipped"]
    if not rows:
        return
    terminalreporter.section("reliability suite")
    for line in table_lines([asdict(r) for r in rows]):
        terminalreporter.write_line(line)
    target = os.environ.get("RESIDENCY_RELIABILITY_JSON")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
