"""SLURM's client commands, asked from the submitting host: the job's state now (scontrol), every
run of it so far (sacct), its nodes' states (sinfo), and cancelling it (scancel until it holds).

A command that fails or times out (no SLURM here, a busy controller) reads as no answer, never as an
error: the callers decide what no answer means.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time

# The controller's job states after which a SLURM job runs no more. A requeued job (submitit's own
# requeue, `scontrol requeue`, a preemption or a node failure) goes back to PENDING instead.
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "REVOKED", "TIMEOUT",
})
# Waiting for nodes (a requeued job goes back to one of these).
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
# Not over yet: queued, or holding nodes.
ACTIVE_STATES = QUEUED_STATES | {"RUNNING", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING"}

# One row per run of the job (-D: a requeued job keeps a record per run), no steps (-X), no header.
SACCT_FIELDS = ("JobID", "State", "NodeList", "ElapsedRaw", "ExitCode")
SACCT_COMMAND = ("sacct", "-D", "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS), "-j")


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One run of a SLURM job, as sacct records it."""

    state: str
    nodes: str
    elapsed_s: int
    exit_code: str


def _client(*command: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess | None:
    """Run a SLURM client command; None where it is not installed, fails or times out."""
    if shutil.which(command[0]) is None:
        return None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc if proc.returncode == 0 else None


def parse_sacct(text: str, job_id: str) -> list[Attempt]:
    """``sacct --parsable2`` rows of SACCT_FIELDS for ``job_id``, oldest first."""
    attempts = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != len(SACCT_FIELDS) or fields[0] != job_id:
            continue
        _, state, nodes, elapsed, exit_code = fields
        attempts.append(Attempt(state.split()[0] if state else "UNKNOWN",  # "CANCELLED by 0" → CANCELLED
                                "" if nodes in ("", "None assigned") else nodes,
                                int(elapsed) if elapsed.isdigit() else 0, exit_code))
    return attempts


def attempts(job_id: str, timeout_s: float = 60.0) -> list[Attempt] | None:
    """Every run of the job so far, oldest first, from SLURM's accounting; None where there is no
    sacct or it cannot answer."""
    proc = _client(*SACCT_COMMAND, job_id, timeout_s=timeout_s)
    return None if proc is None else parse_sacct(proc.stdout, job_id)


def step_exit_codes(job_id: str, timeout_s: float = 60.0) -> list[str]:
    """The ExitCode (``code:signal``) of each step of the job's latest run, as sacct records them
    (steps are where a task's signal shows: a task killed by SIGKILL is ``0:9`` on its step, while
    the allocation says ``9:0``); [] where sacct cannot answer."""
    proc = _client("sacct", "-n", "-P", "-o", "JobID,ExitCode", "-j", str(job_id), timeout_s=timeout_s)
    if proc is None:
        return []
    rows = [line.split("|") for line in proc.stdout.splitlines()]
    return [row[1] for row in rows if len(row) == 2 and row[0].startswith(f"{job_id}.")]


def job_state(job_id: str) -> str | None:
    """The job's state as slurmctld sees it now (sacct lags it by seconds); None once the controller
    has forgotten the job (MinJobAge after its end)."""
    proc = _client("scontrol", "show", "job", "-o", job_id)
    if proc is None:
        return None
    for word in proc.stdout.split():
        key, _, value = word.partition("=")
        if key == "JobState":
            return value
    return None


def current_state(job_id: str, runs: list[Attempt] | None = None) -> str:
    """The controller's state, or accounting's last word once the controller has forgotten the job."""
    state = job_state(job_id)
    if state is None:
        runs = attempts(job_id) if runs is None else runs
        state = runs[-1].state if runs else "UNKNOWN"
    return state


def node_states(node_list: str) -> str:
    """``flashnet-n1 idle, flashnet-n2 down*`` for the nodes of a node list (best effort)."""
    proc = _client("sinfo", "-h", "-N", "-n", node_list, "-o", "%N %t")
    lines = proc.stdout.splitlines() if proc else []
    return ", ".join(line.strip() for line in lines if line.strip()) or "unknown"


def cancel(job, timeout_s: float = 60.0, poll_s: float = 1.0) -> str | None:
    """scancel until slurmctld holds the job CANCELLED (or has forgotten it); return its last state.
    One scancel can be lost: under load, one that reached a job in the middle of its requeue after
    a NODE_FAIL left it pending for its nodes, with nothing waiting for it (seen on the test cluster)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job.cancel(check=False)
        state = job_state(job.job_id)
        if state in (None, "CANCELLED") or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)
