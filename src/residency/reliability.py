"""The reliability suite's table: one row per test (what was injected, what was measured, pass/fail).

pytest sessions record rows through the root conftest.py and write them as JSON; ``make reliability`` runs
the `tests/` and `e2e/` sessions separately and prints their rows as one table:

    python -m residency.reliability reports/reliability-tests.json reports/reliability-e2e.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ReliabilityRecord:
    """One row of the reliability table."""

    test: str
    injected: str = ""
    measured: list[str] = field(default_factory=list)
    outcome: str = "not run"

    def record(self, injected: str | None = None, measured: str | None = None) -> None:
        """Sets what the test injected and/or appends one measured figure (printed in the table)."""
        if injected is not None:
            self.injected = injected
        if measured is not None:
            self.measured.append(measured)
            print(f"[reliability] {self.test}: {measured}")


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The table as text lines, a summary line last."""
    lines = [f"{'test':<58} {'injected':<50} {'result':<6} measured"]
    for row in rows:
        measured = "; ".join(row["measured"]) or "-"
        lines.append(f"{row['test'][:58]:<58} {row['injected'][:50]:<50} {row['outcome']:<6} {measured}")
    failed = sum(row["outcome"] != "pass" for row in rows)
    lines.append(f"{len(rows)} reliability tests, {len(rows) - failed} pass, {failed} fail")
    return lines


def main(argv: list[str]) -> int:
    """Prints the rows of the given JSON files as one table; exit 1 if any row failed or a file is missing."""
    rows: list[dict[str, Any]] = []
    missing = [path for path in argv if not Path(path).is_file()]
    for path in argv:
        if Path(path).is_file():
            rows.extend(json.loads(Path(path).read_text()))
    print("\n".join(table_lines(rows)))
    for path in missing:
        print(f"missing: {path} (that session did not finish)")
    return 1 if missing or any(row["outcome"] != "pass" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
