"""One job per run: a second invocation is refused while the run's recorded job still runs, and a
stale record is dropped."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from flashnet.jobs import lock


def test_a_run_with_a_job_still_running_is_refused(tmp_path, start_process):
    # A stand-in for submitit's local controller: a process whose command line says so.
    controller = start_process([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local"])
    try:
        (tmp_path / lock.ACTIVE_JOB).write_text(json.dumps({"cluster": "local", "job_id": str(controller.pid)}))
        with pytest.raises(lock.JobFailed, match=rf"local job {controller.pid} of this run is still running.*kill"):
            lock.refuse_if_running(tmp_path)
    finally:
        controller.kill()
        controller.wait()
    lock.refuse_if_running(tmp_path)  # gone now: the stale record is dropped
    assert not (tmp_path / lock.ACTIVE_JOB).exists()


def test_a_run_followed_by_another_invocation_is_refused_naming_its_host_and_pid(tmp_path, running_invocation):
    """Issue 14, case 6: the refusal said the waiting process was killed, when it was alive."""
    record = running_invocation(tmp_path / "jobs")
    with pytest.raises(lock.JobFailed) as error:
        lock.refuse_if_running(tmp_path / "jobs")
    assert str(error.value) == (
        f"local job {record['job_id']} of this run is being followed by another invocation (host "
        f"{socket.gethostname()}, pid {record['pid']}, results in {tmp_path}); wait for it to end, or stop it "
        f"and its job (kill {record['job_id']}), then rerun")
    assert json.loads((tmp_path / "jobs" / lock.ACTIVE_JOB).read_text()) == record
