"""Waiting on a submitted job from the submitting host, whatever the job does.

A SLURM job is followed by SLURM's own state, through requeues (submitit's, an ``scontrol
requeue``, a preemption), until it has ended for good. A node failure is the exception: the job is
cancelled and the waiter fails, and a rerun resumes from the last checkpoint
(:func:`slurm_poll` says why). The waiting process copies the job's rank-0 log into its own
and, if it is stopped (Ctrl-C, Snakemake's SIGTERM), cancels the job rather than leave it unwatched.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from ..watch import ProgressLines, Snapshot
from . import lock, slurm
from .lock import JobFailed

# Said by every failure; an evaluation has no checkpoint: it simply runs again.
RERUN = "rerunning the workflow submits the job again (training resumes from its last checkpoint if one was written)"


class LogFollower:
    """Copies what the job's rank-0 task appends to its stdout into this process's log."""

    def __init__(self, job):
        self.job, self.offset = job, 0

    def poll(self) -> str:
        """Copy what is new; return it (for the progress lines)."""
        path = self.job.paths.stdout
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        text = data.decode(errors="replace")
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
        return text


def job_logs(job) -> str:
    return f"logs: {job.paths.stdout} and {job.paths.stderr}"


def is_slurm(job) -> bool:
    return isinstance(job, submitit.SlurmJob)


def slurm_poll(job) -> tuple[Snapshot, bool]:
    """One look at the SLURM job (one sacct, one scontrol): the scheduler's view for the progress
    lines, and whether the job has ended for good. Raises :class:`JobFailed` after cancelling it if
    it lost a node.

    Only SLURM's state counts: submitit's result files can be left by an earlier run of a requeued
    job (a rank that failed as the requeue killed it), so they do not mean the job is over.

    After a node failure SLURM requeues the job (JobRequeue), and a multi-node job then waits until
    enough nodes are up again, perhaps for ever, with nothing in the workflow waiting for it. The job
    is cancelled instead and the rule fails; rerunning the workflow (or Snakemake's --retries)
    submits it afresh, and it resumes from its last checkpoint.
    """
    runs = slurm.attempts(job.job_id) or []
    lost = [run for run in runs if run.state == "NODE_FAIL"]
    if lost:
        nodes = lost[-1].nodes
        state = slurm.cancel(job)
        cancelled = ("so it was cancelled" if state in (None, "CANCELLED") else
                     f"and it could not be cancelled (still {state}): scancel {job.job_id} before rerunning")
        raise JobFailed(
            f"job {job.job_id} lost a node (NODE_FAIL; its nodes {nodes} are now: {slurm.node_states(nodes)}). "
            f"SLURM requeues such a job and it would wait until enough nodes are back, {cancelled}.\n"
            f"{job_logs(job)}; {RERUN}"
        )
    state = slurm.current_state(job.job_id, runs)
    snapshot = Snapshot(state, runs[-1].nodes if runs else "", max(len(runs), 1))
    return snapshot, state in slurm.FINAL_STATES


def poll(job) -> tuple[Snapshot, bool]:
    """The scheduler's view of the job and whether it has ended, from one round of queries."""
    if is_slurm(job):
        return slurm_poll(job)
    finished = job.done(force_check=True)
    return Snapshot(job.state, "this machine"), finished


def wait(job, poll_s: float, progress: ProgressLines | None = None) -> Any:
    """Wait for the job, following its log (and saying how it goes, given ``progress``); return the
    result of its rank 0, or raise :class:`JobFailed` with the reason and log paths."""
    follower = LogFollower(job)
    while True:
        snapshot, finished = poll(job)
        text = follower.poll()  # after the poll: once the job has ended, this reads its last lines
        if progress:
            progress.update(snapshot, text)
        if finished:
            break
        time.sleep(poll_s)
    try:
        results = job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
        why = ending_without_result(job)
        raise JobFailed(f"job {job.job_id} ({snapshot.state}) failed:{' ' + why if why else ''}\n{error}\n"
                        f"{job_logs(job)}; {RERUN}") from None
    return results[0]


def silent_tasks(job) -> list[int]:
    """The tasks that left no result: submitit writes one for every task whose Python code returned
    or raised, so a task without one was killed (a signal: kill -9, the out-of-memory killer, a
    lost node) or exited outside Python (os._exit, a crash in native code)."""
    return [i for i in range(job.num_tasks) if not job.task(i).paths.result_pickle.exists()]


def describe_exit_code(exit_code: str) -> str:
    """SLURM's ``ExitCode`` (``code:signal``) in words: "killed by signal 9 (SIGKILL)", "exit code 1", or ""."""
    code, _, number = exit_code.partition(":")
    if number.isdigit() and int(number):
        try:
            name = f" ({signal.Signals(int(number)).name})"
        except ValueError:
            name = ""
        return f"killed by signal {number}{name}"
    if code.isdigit() and int(code) > 128:  # a shell's report of a task killed by signal code - 128
        return describe_exit_code(f"0:{int(code) - 128}")
    return f"exit code {code}" if code.isdigit() and int(code) else ""


def ending_without_result(job) -> str:
    """Why a job whose tasks raised no exception ended, as far as the scheduler knows: the tasks
    without a result, and under SLURM the exit code or signal sacct recorded ("" if nothing is known)."""
    silent = silent_tasks(job)
    if not silent:
        return ""  # every task raised or returned: the exception in the message says why
    named = ", ".join(map(str, silent))
    said = f"task{'s' if len(silent) > 1 else ''} {named} of {job.num_tasks} ended without a result"
    if is_slurm(job):
        runs = slurm.attempts(job.job_id) or []
        codes = [*slurm.step_exit_codes(job.job_id), *(run.exit_code for run in runs[-1:])]
        words = [describe_exit_code(code) for code in codes]
        # A signal on a step (the task's own) says more than the allocation's exit code.
        code = next((w for w in words if w.startswith("killed")), next((w for w in words if w), ""))
        return f"{said}: {code}" if code else f"{said} (killed, or exited outside Python)"
    return f"{said}: killed by a signal (kill -9, the out-of-memory killer) or exited outside Python"


def cancel(job) -> None:
    if is_slurm(job):
        slurm.cancel(job, timeout_s=10.0)
    else:
        job.cancel(check=False)


def follow(job, folder: Path, cluster: str, poll_s: float, progress: ProgressLines | None = None) -> Any:
    """:func:`wait` for ``job``, recorded in ``folder`` while it runs; if this process is told to stop
    (Ctrl-C, a SIGTERM), the job is cancelled rather than left running with nobody waiting for it."""

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with lock.recorded(folder, cluster, job.job_id):
        previous = signal.signal(signal.SIGTERM, interrupted)
        try:
            return wait(job, poll_s, progress)
        except KeyboardInterrupt as why:
            cancel(job)
            raise JobFailed(f"interrupted ({why or 'SIGINT'}): cancelled job {job.job_id}; {RERUN}") from None
        finally:
            signal.signal(signal.SIGTERM, previous)
