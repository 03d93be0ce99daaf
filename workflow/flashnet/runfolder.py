"""Reading a run folder (results/runs/<run>) while its job may still be writing it.

Shared by ``flashnet status`` and the progress lines of the waiting train rule. Every reader
returns what can be read and ``None`` or nothing for the rest: a missing file, a partly written
one, or a row cut short are the normal states of a run that is starting, running or was killed.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from .files import write_json
from .train import schedule


# A run folder's records and their columns, declared once for the writer (train/callbacks.py) and
# every reader (status, the progress lines, the report). wall_s: the fit's wall clock; images_per_s:
# over training time only (validation and checkpoint writes left out); validation_s: that validation's
# duration (metrics.csv files written before it was measured lack it).
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"  # a row per validation
STEPS_FILE = "steps.csv"  # a row every log_every_steps
METRICS_COLUMNS = ("epoch", "step", "wall_s", "train_loss", "val_top1", "val_top5", "images_per_s", "lr",
                   "validation_s")
STEPS_COLUMNS = ("step", "epoch", "wall_s", "lr", "train_loss", "images_per_s")
# Why a training job stopped without finishing, when it knew: {"kind", "message", "step", ...}, written
# by the job (rank 0, or the watchdog's reporting rank) and removed when a job of the run starts.
FAILURE_FILE = "failure.json"
FAILURE_KINDS = ("diverged", "hung")  # diverged: non-finite loss, loss bound, validation at chance


def record_failure(run_dir: Path, kind: str, message: str, **details: Any) -> None:
    if kind not in FAILURE_KINDS:
        raise ValueError(f"failure kind {kind!r} is not one of {FAILURE_KINDS}")
    write_json(Path(run_dir) / FAILURE_FILE, {"kind": kind, "message": message, **details})


def read_failure(run_dir: Path) -> dict[str, Any] | None:
    """The run's failure record, if its last job left one (a half-written one reads as none)."""
    record = read_json(Path(run_dir) / FAILURE_FILE)
    return record if record and record.get("kind") in FAILURE_KINDS and "message" in record else None


def failure_state(record: dict[str, Any]) -> str:
    """The state word status and report show: ``diverged: <why>`` or ``failed: hung: <why>``."""
    first_line = str(record["message"]).strip().splitlines()[0] if str(record["message"]).strip() else ""
    return f"diverged: {first_line}" if record["kind"] == "diverged" else f"failed: {record['kind']}: {first_line}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_rows(path: Path, numbers: tuple[str, ...] = METRICS_COLUMNS) -> list[dict[str, float]]:
    """The complete rows of a metrics CSV (metrics.csv, steps.csv) as numbers. A last line without
    its newline (a file cut short) is left out, and a row with a missing or unparsable value ends
    the list."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return []
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = []
    try:
        for row in csv.DictReader(lines):
            try:
                rows.append({key: float(row[key]) for key in numbers if key in row})
            except (TypeError, ValueError):
                break
    except csv.Error:
        pass
    return rows


def epoch_rows(run_dir: Path) -> list[dict[str, float]]:
    return [row for row in read_rows(Path(run_dir) / METRICS_FILE) if {"epoch", "step", "wall_s"} <= set(row)]


def last_step_row(run_dir: Path) -> dict[str, float] | None:
    rows = read_rows(Path(run_dir) / STEPS_FILE, STEPS_COLUMNS)
    return rows[-1] if rows else None


def total_steps(epochs: float, batch_size: int, train_samples: int | None, rule: str = "floor",
                ranks: int = 1) -> int | None:
    """The run's optimizer steps, as the recipe counts them (its ``epoch_steps`` rule over its ranks)."""
    if not train_samples or batch_size <= 0 or train_samples < batch_size:
        return None
    return schedule.total_steps(epochs, schedule.steps_per_epoch(train_samples, batch_size, rule, ranks))


def run_total_steps(run: dict, train_samples: int | None) -> int | None:
    """:func:`total_steps` of a run's settings (a run of the configuration, as a mapping)."""
    return total_steps(run["epochs"], run["batch_size"], train_samples, run.get("epoch_steps", "floor"),
                       run.get("nodes", 1) * run.get("devices_per_node", 1))


def eta_s(step: float, total: int | None, wall_s: float) -> float | None:
    """Training time left at the rate so far (train clock: time spent queued is not counted)."""
    if not total or step <= 0 or wall_s <= 0:
        return None
    return max(total - step, 0) * wall_s / step


def time_to_target(rows: list[dict[str, float]], target: float) -> float | None:
    for row in rows:
        if row.get("val_top1", -1) >= target:
            return row["wall_s"]
    return None


# The line that names a Python exception in a job's error text (submitit's traceback ends with it).
EXCEPTION = re.compile(r"^\s*[\w.]*(?:Error|Exception|Loss|Interrupt)\b[^:\n]*: .+$", re.M)


def short_reason(message: str) -> str:
    """One line for why a job failed: the message's first line, and where that only says the job
    failed ("job 42 (FAILED) failed:"), the exception that ended it."""
    first, _, rest = message.strip().partition("\n")
    if not first.endswith(":"):
        return first
    exceptions = EXCEPTION.findall(rest)
    return f"{first} {exceptions[-1].strip()}" if exceptions else first.rstrip(":")
