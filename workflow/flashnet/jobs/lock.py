"""One job per run. While a waiting process follows a job it records it in the run's
``jobs/active.json`` (cluster, job id, host and pid of the waiter); a second invocation for the same
run reads the record and refuses while that job still runs, since both would write into the same
checkpoint folder and outputs. A record whose job has ended is stale and dropped."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from ..files import write_json
from . import slurm

ACTIVE_JOB = "active.json"


class JobFailed(RuntimeError):
    """The job failed or cannot be run; the message says why and where its logs are."""


def local_job_alive(job_id: str) -> bool:
    """A local submitit job's id is the pid of its controller process, whose command line names
    submitit's local runner."""
    try:
        return b"submitit.local" in Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def job_still_running(record: dict[str, str]) -> bool:
    """Whether a job recorded in ``active.json`` (perhaps by an earlier, killed waiter) still runs."""
    if record.get("cluster") == "slurm":
        state = slurm.job_state(record["job_id"])
        return state is not None and state not in slurm.FINAL_STATES
    return local_job_alive(record["job_id"])


def waiter_alive(record: dict[str, Any]) -> bool:
    """Whether the process that follows the job (``flashnet train``/``evaluate``) still runs. On
    another host this cannot be told, so it counts as alive."""
    if record.get("host") != socket.gethostname():
        return "host" in record
    try:
        return b"flashnet" in Path(f"/proc/{int(record['pid'])}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return False


def refuse_if_running(folder: Path) -> None:
    """Raise :class:`JobFailed` while a job recorded in ``folder`` runs. Only reads and raises then:
    the running run's files are not this invocation's to touch."""
    path = folder / ACTIVE_JOB
    if not path.exists():
        return
    record = json.loads(path.read_text())
    if job_still_running(record):
        job = f"{record['cluster']} job {record['job_id']}"
        stop = f"scancel {record['job_id']}" if record["cluster"] == "slurm" else f"kill {record['job_id']}"
        if waiter_alive(record):
            raise JobFailed(f"{job} of this run is being followed by another invocation (host {record['host']}, "
                            f"pid {record['pid']}, results in {folder.parent}); wait for it to end, or stop it and "
                            f"its job ({stop}), then rerun")
        raise JobFailed(f"{job} of this run is still running (its waiting process was killed); wait for it to end "
                        f"or stop it ({stop}), then rerun")
    path.unlink()


@contextlib.contextmanager
def recorded(folder: Path, cluster: str, job_id: str) -> Iterator[None]:
    """``active.json`` names the job and this waiting process for as long as the block runs."""
    path = folder / ACTIVE_JOB
    write_json(path, {"cluster": cluster, "job_id": str(job_id), "host": socket.gethostname(), "pid": os.getpid()})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
