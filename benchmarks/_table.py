"""Plain-text tables for the benchmark programs (imported as a sibling module when run as scripts)."""

from __future__ import annotations


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns, a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
