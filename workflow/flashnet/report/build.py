"""The report stage: every run folder in, results/report/ out (`flashnet report`).

With ``partial`` (``flashnet report --partial --logs-dir DIR``, what the workflow runs when a job
failed under --keep-going) the report covers the runs that finished and lists the others with why
(their failure.json, or the log to read); without it every run must have finished.

All inputs are read and checked before anything is written; the files are then written under
temporary names in a staging folder and moved into place only when all of them exist, report.html
last, so a failed report never leaves a complete-looking one behind.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import projection as proj
from .html import render_report
from .plots import FIGURE_WRITERS, write_figures
from .references import REFERENCE_CSV_COLUMNS, reference_csv_rows
from .runs import RunResults, UnfinishedRun, load_runs, split_finished
from .summary import SUMMARY_CSV_COLUMNS, summary_csv_row, summary_markdown
from .tables import write_csv

HTML_FILE = "report.html"
REPORT_FILES = ("summary.md", "summary.csv", "references.csv", "projection.csv",
                *(f"{name}.png" for name in FIGURE_WRITERS), HTML_FILE)


def write_report_files(folder: Path, runs: list[RunResults], projections: list[proj.Projection],
                       settings: proj.ProjectionSettings, generated_at: datetime.datetime,
                       unfinished: list[UnfinishedRun] = ()) -> None:
    """Every file of REPORT_FILES into ``folder``."""
    write_csv(folder / "summary.csv", SUMMARY_CSV_COLUMNS, (summary_csv_row(run) for run in runs))
    write_csv(folder / "references.csv", REFERENCE_CSV_COLUMNS, reference_csv_rows())
    write_csv(folder / "projection.csv", proj.PROJECTION_CSV_COLUMNS, proj.projection_csv_rows(projections))
    figures = write_figures(runs, folder)
    (folder / "summary.md").write_text(summary_markdown(runs, projections, settings, generated_at, unfinished))
    (folder / HTML_FILE).write_text(render_report(runs, projections, settings, figures, generated_at, unfinished))


def publish(staging: Path, out_dir: Path) -> dict[str, Path]:
    """Move the staged files into ``out_dir``. The old report.html goes first and the new one comes
    last, so report.html is only ever beside a complete set of files."""
    written = sorted(path.name for path in staging.iterdir())
    if written != sorted(REPORT_FILES):
        raise RuntimeError(f"report wrote {written}, expected {sorted(REPORT_FILES)}")
    (out_dir / HTML_FILE).unlink(missing_ok=True)
    order = [name for name in REPORT_FILES if name != HTML_FILE] + [HTML_FILE]
    for name in order:
        os.replace(staging / name, out_dir / name)
    return {name: out_dir / name for name in REPORT_FILES}


def build_report(run_folders: list[Path], settings: dict[str, Any], out_dir: Path,
                 generated_at: datetime.datetime | None = None, partial: bool = False,
                 logs_dir: Path | None = None) -> dict[str, Path]:
    """Check every run folder, then write the report into ``out_dir``; returns file name → path.

    Raises DataError (naming the file and the problem) for a bad run folder, ConfigError for bad
    ``settings`` (the config's ``report`` section), in both cases before writing anything. With
    ``partial``, a run that did not finish training and evaluation is listed with why (its logs
    under ``logs_dir``) instead; a finished run's files are checked all the same.
    """
    projection_settings = proj.ProjectionSettings.from_dict(settings)
    folders, unfinished = [Path(folder) for folder in run_folders], []
    if partial:
        folders, unfinished = split_finished(folders, Path(logs_dir or "logs"))
    runs = load_runs(folders)
    projections = [proj.project_run(run, projection_settings) for run in runs]
    generated_at = generated_at or datetime.datetime.now(datetime.timezone.utc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-report-", dir=out_dir))
    try:
        write_report_files(staging, runs, projections, projection_settings, generated_at, unfinished)
        return publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def report_from_cli(args) -> None:
    """``flashnet report --runs DIR... --settings JSON --out-dir DIR``."""
    files = build_report(args.runs, args.settings, args.out_dir, partial=args.partial, logs_dir=args.logs_dir)
    print(f"report of {len(args.runs)} run(s): {', '.join(files)} → {args.out_dir}")
