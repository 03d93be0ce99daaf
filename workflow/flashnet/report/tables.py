"""Tables of formatted cells, shared by summary.md and report.html, and the number formats they use.

A :class:`Table` holds display strings; the CSV files hold the raw numbers instead (see the
``*_csv_rows`` functions beside each table), so a spreadsheet never has to parse "3 min 44 s".
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Iterable, Sequence

from ..progress import format_duration  # noqa: F401  (the one duration format; tables re-export it)

NOT_REACHED = "not reached"


@dataclasses.dataclass(frozen=True)
class Table:
    """Column headers and rows of display strings; ``numeric[i]`` right-aligns column i."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]

    def __post_init__(self):
        if len(self.numeric) != len(self.headers):
            raise ValueError("one numeric flag per column")
        for row in self.rows:
            if len(row) != len(self.headers):
                raise ValueError(f"row {row!r} has {len(row)} cells for {len(self.headers)} columns")

    def column(self, header: str) -> list[str]:
        i = self.headers.index(header)
        return [row[i] for row in self.rows]


def format_time_to_target(seconds: float | None, epochs: float | None = None) -> str:
    """``"not reached"`` when the run never reached its target, else the duration and, when known,
    the epoch at which it did: ``"3 min 44 s (epoch 9)"``."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return NOT_REACHED
    text = format_duration(seconds)
    if epochs is not None:
        text += f" (epoch {format_count(epochs)})"
    return text


def format_published_duration(seconds: float) -> str:
    """A published time as it is cited: seconds below 1,000 s (``"224 s"``, ``"10.96 s"``), else hours/minutes."""
    return f"{seconds:g} s" if seconds < 1000 else format_duration(seconds)


def format_percent(fraction: float, decimals: int = 2) -> str:
    """0.76123 → ``"76.12%"``."""
    return f"{100 * fraction:.{decimals}f}%"


def format_published_percent(fraction: float) -> str:
    """A published accuracy with the precision it was published with: 0.763 → ``"76.3%"``."""
    return f"{round(100 * fraction, 4):g}%"


def format_count(value: float) -> str:
    """Whole numbers with thousands separators (81,920); fractional ones with up to two decimals."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def format_rate(images_per_s: float) -> str:
    """Throughput: one decimal below 100 images/s (CPU runs), whole images above."""
    return f"{images_per_s:,.1f}" if images_per_s < 100 else f"{images_per_s:,.0f}"


def markdown_table(table: Table) -> str:
    """GitHub-flavoured Markdown; numeric columns right-aligned."""
    def cells(values: Iterable[str]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    rule = "|" + "|".join("---:" if numeric else "---" for numeric in table.numeric) + "|"
    return "\n".join([cells(table.headers), rule, *(cells(row) for row in table.rows)]) + "\n"


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, object]]) -> None:
    """Rows (dicts keyed by ``columns``) to a CSV file; None is written as an empty cell."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row[key] is None else row[key] for key in columns})
