"""`make reliability` fails when a test fails: its recipe runs both halves and the table, and exits with
their status (a `-` prefix made make ignore failures)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _recipe(target: str) -> str:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        body.append(line[1:])
    return "\n".join(body)


def test_reliability_fails_when_a_pytest_half_fails_and_still_prints_the_table(tmp_path: Path) -> None:
    recipe = _recipe("reliability")
    assert not [line for line in recipe.splitlines() if line.startswith("-")], "a failure is ignored"
    # run the recipe's shell (after the cluster start) with a python whose pytest fails and whose table works
    script = recipe.split("\n", 2)[2].replace("$$", "$").replace("@#", "#")
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\ncase "$2" in pytest) exit 1;; *) echo table;; esac\n')
    python.chmod(0o755)
    shell = script.replace("$(PY)", str(python))
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result
    assert "table" in result.stdout and "some tests failed" in result.stderr
    passing = tmp_path / "passing"
    passing.write_text("#!/bin/sh\necho table\n")
    passing.chmod(0o755)
    ok = subprocess.run(
        ["bash", "-c", script.replace("$(PY)", str(passing))], capture_output=True, text=True, cwd=tmp_path
    )
    assert ok.returncode == 0, ok
