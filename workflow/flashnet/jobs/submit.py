"""Submitting any kind of job through submitit, locally or to SLURM, and seeing it through.

A kind of job (training, evaluation) is a :class:`JobKind`: submitit's callable (with
``checkpoint()`` where it can be requeued) that also says how to name and size it. :func:`run_job`
is the one path every kind takes from the command line: refuse while another job of the run runs,
prepare, submit, follow, and on failure one line ``flashnet <command>: <why>`` on stderr (what
``flashnet status`` reads back from the rule's log) and exit status 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Protocol

import submitit

from ..config import LauncherConfig
from ..runfolder import short_reason
from ..watch import ProgressLines
from . import lock
from .follow import follow
from .lock import JobFailed


class JobKind(Protocol):
    """What the job layer asks of a kind of job besides being submitit's callable."""

    command: str  # the flashnet subcommand that submits it: failures read "flashnet <command>: ..."
    activity: str  # the word before "job" in the progress lines ("" where the label says it: train)
    run_name: str
    job_name: str  # the scheduler's name for it
    nodes: int
    tasks_per_node: int  # one task per device

    def before_submit(self) -> str:
        """Runs on the submitting side once no other job of the run runs (it may touch the run's
        files); returns a note for the ``submitted`` line, e.g. where the job resumes from."""

    def __call__(self) -> Any:
        """The job, in every task; rank 0's return value is the job's result."""


def private_dir(path: Path) -> Path:
    """A folder only the user can enter: submitit runs the pickles it finds there."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def make_executor(launcher: LauncherConfig, nodes: int, tasks_per_node: int, folder: Path, job_name: str):
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher.cluster,
                                     slurm_max_num_timeout=launcher.max_num_timeout,
                                     local_max_num_timeout=launcher.max_num_timeout)
    parameters: dict[str, Any] = {
        "name": job_name,
        "timeout_min": launcher.timeout_min,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": launcher.cpus_per_task,
    }
    if launcher.gpus_per_node:
        parameters["gpus_per_node"] = launcher.gpus_per_node
    if launcher.mem_gb_per_node:
        parameters["mem_gb"] = launcher.mem_gb_per_node
    if launcher.cluster == "slurm":
        parameters.update(
            slurm_signal_delay_s=launcher.signal_delay_s,
            slurm_additional_parameters=dict(launcher.slurm_extra),
            slurm_setup=list(launcher.setup),
        )
        if launcher.slurm_partition:
            parameters["slurm_partition"] = launcher.slurm_partition
        if launcher.slurm_account:
            parameters["slurm_account"] = launcher.slurm_account
    else:
        # submitit's AutoExecutor takes no signal delay for local jobs: they get USR2 30 s before the limit.
        parameters.update(local_setup=list(launcher.setup))
    executor.update_parameters(**parameters)
    return executor


def submit(kind: JobKind, launcher: LauncherConfig, folder: Path):
    """Submit ``kind`` with its job files in ``folder`` (made private); refused while another job of
    the run runs. Prints the ``submitted`` line ``flashnet status`` reads from the rule's log."""
    private_dir(folder)
    lock.refuse_if_running(folder)
    note = kind.before_submit()
    executor = make_executor(launcher, kind.nodes, kind.tasks_per_node, folder, kind.job_name)
    job = executor.submit(kind)
    print(f"submitted {launcher.cluster} job {job.job_id} for run {kind.run_name}{note}; "
          f"{kind.nodes} node(s) × {kind.tasks_per_node} device(s); logs in {job.paths.folder}", flush=True)
    return job


def run_job(kind: JobKind, launcher: LauncherConfig, folder: Path, progress: ProgressLines,
            log_file: Path | None = None) -> Any:
    """Submit ``kind``, follow it to its end and return its result; on failure say why (progress
    line, then ``flashnet <command>: ...`` on stderr) and exit with status 1."""
    try:
        job = submit(kind, launcher, folder)
        progress.submitted(launcher.cluster, str(job.job_id), log_file, job.paths.folder, kind.activity)
        return follow(job, folder, launcher.cluster, launcher.poll_s, progress)
    except JobFailed as error:
        progress.say(f"failed: {short_reason(str(error))}" + (f" (see {log_file})" if log_file else ""))
        print(f"flashnet {kind.command}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
