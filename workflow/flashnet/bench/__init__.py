"""Benchmarks: each times the project's code against a baseline in the same run (docs/benchmarks/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashnet.files import write_json


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """The benchmark's results as JSON at ``out`` (if given), replaced atomically: a run cut short
    keeps what it last wrote."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
