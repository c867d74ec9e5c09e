"""The reports' cells and markdown tables."""

from __future__ import annotations

from typing import Iterable

MISSING = "—"  # a table cell without a value


def mean_std(mean: float, std: float, spec: str = ".4f") -> str:
    return f"{mean:{spec}} ± {std:{spec}}"


def fmt(value: float | None, spec: str = ".3f") -> str:
    return MISSING if value is None else format(value, spec)


def markdown_table(header: list[str], rows: Iterable[list], align: str = "") -> str:
    """A markdown table of preformatted cells; `align` holds one letter per column, l or r (default l)."""
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [header, rule, *rows])
