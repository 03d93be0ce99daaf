"""Progress lines of a waiting train or evaluate rule, for the person watching Snakemake.

The rule's whole output goes to its log (``> {log} 2>&1``), so a line meant for the terminal has
another way out: the rule hands the command a copy of Snakemake's own stderr as file descriptor 3
(``--progress-fd 3 3>&2 > {log} 2>&1``). The train and evaluate rules are local rules, so that is
the stderr of the Snakemake process on the submitting host, under the local and the SLURM
executor alike, and a pipe or file in CI (no terminal is needed). Every line also goes to the log.

Lines: the submission (job id, where the logs are), the start (and nodes), each epoch (loss, top-1,
images/s, ETA), each requeue and resume, and the end. Between epochs at most one line a minute,
from the job's own progress lines, so a long epoch shows it is moving and a short one never floods.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import TextIO

from .jobs import slurm
from .progress import format_duration
from .runfolder import epoch_rows, eta_s, total_steps

# The job's plain progress line (train/callbacks.py PlainProgress) and its resume/requeue notes.
STEP_LINE = re.compile(r"^epoch \d+/\d+ step \d+/\d+ .*$", re.M)
RESUMED = re.compile(r"^resuming from (\S+)", re.M)
REQUEUEING = re.compile(r"^(stopped at .*); requeueing$", re.M)


def open_progress_fd(fd: int | None) -> TextIO | None:
    """The stream behind ``--progress-fd``; None if it was not given or is not open (a run by hand
    prints its lines on stdout only)."""
    if fd is None:
        return None
    try:
        return os.fdopen(fd, "w", buffering=1, closefd=False)
    except OSError:
        return None


@dataclasses.dataclass
class Snapshot:
    """What the scheduler says about a job at one poll."""

    state: str  # PENDING, RUNNING, ... (SLURM) or submitit's local state
    nodes: str = ""
    attempts: int = 1  # runs of the job so far (SLURM keeps one record per requeue)


class ProgressLines:
    """Says what a waiting job does, once per change, to the log and to ``terminal``."""

    def __init__(self, label: str, terminal: TextIO | None, run_dir: Path | None = None, epochs: float = 0,
                 batch_size: int = 0, train_samples: int | None = None, every_s: float = 60.0,
                 epoch_steps: str = "floor", ranks: int = 1):
        self.label, self.terminal, self.run_dir = label, terminal, run_dir
        self.epochs = epochs
        self.total_steps = total_steps(epochs, batch_size, train_samples, epoch_steps, ranks)
        self.every_s = every_s
        self._state = None
        self._attempts = 1
        self._waited_for_nodes = False
        self._last_epoch = max((row["epoch"] for row in epoch_rows(run_dir)), default=0) if run_dir else 0
        self._last_line_at = -float("inf")

    def say(self, text: str) -> None:
        line = f"[{self.label}] {text}"
        print(line, flush=True)
        if self.terminal is not None:
            try:
                print(line, file=self.terminal, flush=True)
            except OSError:  # Snakemake's stderr went away: the log still has the line
                self.terminal = None
        self._last_line_at = time.monotonic()

    def submitted(self, cluster: str, job_id: str, log: Path | None, job_folder: Path, kind: str = "") -> None:
        where = f"log {log}, job logs in {job_folder}" if log else f"job logs in {job_folder}"
        self.say(f"submitted {cluster} {kind + ' ' if kind else ''}job {job_id}; {where}")

    def update(self, snapshot: Snapshot, job_text: str = "") -> None:
        """One poll: the scheduler's view and what the job wrote since the last poll."""
        self._scheduler(snapshot)
        for match in REQUEUEING.finditer(job_text):
            self.say(f"{match.group(1)}; the job is requeued")
        for match in RESUMED.finditer(job_text):
            self.say(f"resumed from {match.group(1)}")
        if not self._epochs() and time.monotonic() - self._last_line_at >= self.every_s:
            steps = STEP_LINE.findall(job_text)
            if steps:
                self.say(steps[-1])

    def _scheduler(self, snapshot: Snapshot) -> None:
        state = snapshot.state.split()[0] if snapshot.state else "UNKNOWN"
        state = "PENDING" if state in slurm.QUEUED_STATES else state  # REQUEUE* too
        # A requeue shows as a new record in sacct, or (sooner) as a running job pending again.
        if snapshot.attempts > self._attempts or (state == "PENDING" and self._state == "RUNNING"):
            self._attempts = max(snapshot.attempts, self._attempts + 1)
            queue = "; back in the queue" if state == "PENDING" else ""
            self.say(f"requeued (run {self._attempts} of the job){queue}")
            self._state = "PENDING"
        if state == self._state:
            return
        if state == "RUNNING" and not snapshot.nodes and not self._waited_for_nodes:
            self._waited_for_nodes = True  # sacct names the nodes a moment after slurmctld starts the job
            return
        if state == "PENDING":
            self.say("queued, waiting for its nodes")
        elif state == "RUNNING":
            self.say(f"running on {snapshot.nodes}" if snapshot.nodes else "running")
        self._state, self._waited_for_nodes = state, False

    def _epochs(self) -> bool:
        """A line for each epoch finished since the last poll; whether there was one."""
        if self.run_dir is None:
            return False
        new = [row for row in epoch_rows(self.run_dir) if row["epoch"] > self._last_epoch]
        for row in new:
            self._last_epoch = row["epoch"]
            parts = [f"epoch {row['epoch']:.0f}/{self.epochs:g}"]
            if "train_loss" in row:
                parts.append(f"loss {row['train_loss']:.4f}")
            if "val_top1" in row:
                parts.append(f"top-1 {100 * row['val_top1']:.1f} %")
            if "images_per_s" in row:
                parts.append(f"{row['images_per_s']:.0f} img/s")
            parts.append(f"{format_duration(row['wall_s'])} trained")
            parts.append(f"ETA {format_duration(eta_s(row['step'], self.total_steps, row['wall_s']))}")
            self.say(", ".join(parts))
        return bool(new)

    def finished(self, what: str) -> None:
        self.say(what)
