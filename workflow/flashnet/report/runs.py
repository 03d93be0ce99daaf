"""Reading one finished run's folder (results/runs/<run>/) for the report, and refusing bad ones.

A run folder holds what training and evaluation wrote: ``summary.json``, ``metrics.csv`` (one row
per epoch), ``steps.csv`` (every few steps) and ``eval.json`` (the authoritative evaluation of the
final checkpoint). Everything is checked here, before the report writes anything, so a problem is
reported as a :class:`DataError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..data.sources import DataError
from ..runfolder import (METRICS_COLUMNS, METRICS_FILE, STEPS_COLUMNS, STEPS_FILE, SUMMARY_FILE, failure_state,
                         read_failure)

EVAL_FILE = "eval.json"
# Measured since runs time their validations and checkpoints; older run folders lack them.
LATER_METRICS_COLUMNS = ("validation_s",)
SUMMARY_KEYS = ("run", "config", "world_size", "accelerator", "device_name", "precision", "epochs", "steps",
                "target_top1", "time_to_target_s", "train_seconds", "images_per_s", "images_per_s_per_device",
                "finished")
CONFIG_KEYS = ("model", "batch_size", "optimizer", "precision", "nodes", "devices_per_node")
EVAL_KEYS = ("top1", "top5", "samples", "expected_samples")


@dataclasses.dataclass
class RunResults:
    """Everything the report needs from one run folder, already checked."""

    folder: Path
    summary: dict[str, Any]
    metrics: dict[str, np.ndarray]  # column -> values, one per epoch
    steps: dict[str, np.ndarray]  # column -> values, one per logged step
    evaluation: dict[str, Any]
    finished_at: datetime.datetime  # when summary.json was written (UTC)

    @property
    def name(self) -> str:
        return self.summary["run"]

    @property
    def config(self) -> dict[str, Any]:
        return self.summary["config"]

    @property
    def global_batch(self) -> int:
        return int(self.config["batch_size"])

    @property
    def per_device_batch(self) -> int | float:
        """Global batch ÷ world size (an int when it divides evenly, as the config checks it does)."""
        per_device, rest = divmod(self.global_batch, int(self.summary["world_size"]))
        return per_device if rest == 0 else self.global_batch / int(self.summary["world_size"])


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; DataError if the file is missing or is not a JSON object."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def require_keys(mapping: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}")


def _csv_number(text: str, path: Path, line: int, column: str) -> float:
    """A CSV cell as a float; an empty cell (e.g. no validation that epoch) is NaN."""
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}: line {line}, column {column}: {text!r} is not a number") from None


def read_numeric_csv(path: Path, columns: tuple[str, ...], rows_required: bool = True,
                     optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The named columns of a CSV file with a header, as float arrays.

    DataError if the file is missing, lacks one of ``columns`` (other than the ``optional`` ones,
    which are NaN when absent), has no data rows (unless not ``rows_required``) or holds a cell
    that is not a number. Extra columns are ignored, so the writer can add some without breaking
    the report.
    """
    if not path.is_file():
        raise DataError(f"{path}: missing")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [column for column in columns if column not in header and column not in optional]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
        rows = [[_csv_number(row.get(c), path, reader.line_num, c) for c in columns] for row in reader]
    if not rows and rows_required:
        raise DataError(f"{path}: no data rows")
    table = np.asarray(rows, dtype=float).reshape(len(rows), len(columns))
    return {column: table[:, i] for i, column in enumerate(columns)}


def read_summary(folder: Path) -> dict[str, Any]:
    """summary.json, checked: it exists, training finished, and the keys the report uses are there."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (training did not finish, or this is not a run folder)")
    summary = read_json_object(path)
    if summary.get("finished") is not True:
        raise DataError(f"{path}: training did not finish (finished is {summary.get('finished')!r})")
    require_keys(summary, SUMMARY_KEYS, str(path))
    if not isinstance(summary["config"], dict):
        raise DataError(f"{path}: config is not an object")
    require_keys(summary["config"], CONFIG_KEYS, f"{path}: config")
    if summary["run"] != folder.name:
        raise DataError(f"{path}: says run {summary['run']!r} but lies in the folder of run {folder.name!r}")
    return summary


def read_evaluation(folder: Path) -> dict[str, Any]:
    """eval.json, checked: it exists and evaluated every validation sample exactly once."""
    path = folder / EVAL_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (the run was not evaluated)")
    evaluation = read_json_object(path)
    require_keys(evaluation, EVAL_KEYS, str(path))
    if evaluation["samples"] != evaluation["expected_samples"]:
        raise DataError(f"{path}: evaluated {evaluation['samples']} samples but the validation set has "
                        f"{evaluation['expected_samples']}; its accuracy is not comparable")
    return evaluation


def finished_time(path: Path, summary: dict[str, Any]) -> datetime.datetime:
    """When training finished: summary.json's ``finished_at`` (ISO 8601) if it has one, else the
    file's modification time. Naive times are taken as UTC."""
    stamp = summary.get("finished_at")
    if stamp is None:
        return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    try:
        when = datetime.datetime.fromisoformat(str(stamp))
    except ValueError:
        raise DataError(f"{path}: finished_at {stamp!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def load_run(folder: str | Path) -> RunResults:
    """Read and check every file of one run folder."""
    folder = Path(folder)
    summary = read_summary(folder)
    return RunResults(
        folder=folder,
        summary=summary,
        metrics=read_numeric_csv(folder / METRICS_FILE, METRICS_COLUMNS, optional=LATER_METRICS_COLUMNS),
        # A run shorter than log_every_steps (a smoke test) logs no step: its figures lack that line.
        steps=read_numeric_csv(folder / STEPS_FILE, STEPS_COLUMNS, rows_required=False),
        evaluation=read_evaluation(folder),
        finished_at=finished_time(folder / SUMMARY_FILE, summary),
    )


@dataclasses.dataclass(frozen=True)
class UnfinishedRun:
    """A run the report lists without results: its name and why it has none."""

    name: str
    reason: str


def is_finished(folder: Path) -> bool:
    """Whether training and evaluation both finished: summary.json says finished, eval.json exists.
    (Whether their contents are sound is :func:`load_run`'s to check.)"""
    try:
        finished = json.loads((folder / SUMMARY_FILE).read_text()).get("finished") is True
    except (OSError, ValueError, AttributeError):
        return False
    return finished and (folder / EVAL_FILE).is_file()


def unfinished_reason(folder: Path, logs_dir: Path) -> str:
    """One line on why a run has no results: the run's own failure.json where the job wrote one,
    else which stage stopped and the log that says why."""
    name = folder.name
    recorded = read_failure(folder)
    if recorded:
        return failure_state(recorded)
    try:
        trained = json.loads((folder / SUMMARY_FILE).read_text()).get("finished") is True
    except (OSError, ValueError, AttributeError):
        trained = False
    if not trained:
        return f"failed (see {Path(logs_dir) / 'train' / f'{name}.log'})"
    return f"evaluation failed (see {Path(logs_dir) / 'evaluate' / f'{name}.log'})"


def split_finished(folders: list[Path], logs_dir: Path) -> tuple[list[Path], list[UnfinishedRun]]:
    """The folders of finished runs, and the others with the reason each has no results."""
    finished = [Path(folder) for folder in folders if is_finished(Path(folder))]
    unfinished = [UnfinishedRun(Path(folder).name, unfinished_reason(Path(folder), logs_dir))
                  for folder in folders if not is_finished(Path(folder))]
    return finished, unfinished


def load_runs(folders: list[Path]) -> list[RunResults]:
    """Every run, in the order given; DataError on the first bad one, or on a run named twice."""
    runs = [load_run(folder) for folder in folders]
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"run(s) given more than once: {', '.join(repeated)}")
    if not runs:
        raise DataError("no run folders given")
    return runs
