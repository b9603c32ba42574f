"""The planner stays a pipeline of stages a newcomer can follow: no module over ~600 lines, and every
module is named in the layers contract that keeps the stages from importing upwards (.importlinter)."""

from __future__ import annotations

import configparser
from pathlib import Path

import residency_operator.planner

PLANNER = Path(residency_operator.planner.__file__).parent
ROOT = Path(__file__).resolve().parents[2]


def test_no_planner_module_is_over_600_lines() -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in PLANNER.glob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > 600} == {}


def test_every_planner_module_has_a_layer() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    contract = config["importlinter:contract:planner-stages"]
    assert contract["type"] == "layers"
    assert contract["containers"].strip() == "residency_operator.planner"
    layered = {name.strip() for line in contract["layers"].split("\n") for name in line.split("|")} - {""}
    modules = {path.stem for path in PLANNER.glob("*.py")} - {"__init__"}
    assert modules == layered
