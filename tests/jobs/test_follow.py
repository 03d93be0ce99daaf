"""Following a job from the submitting host: no job left running when its waiting process is
stopped, and a SLURM job that lost a node cancelled and reported with its nodes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flashnet.jobs import follow, lock, slurm


def test_stopping_the_waiting_process_cancels_the_job(tmp_path):
    """SIGTERM to the waiting rule (Snakemake stopping it) must not leave the job running unwatched."""
    script = textwrap.dedent(f"""
        import time, submitit
        from pathlib import Path
        from flashnet.jobs import follow, lock
        executor = submitit.AutoExecutor(folder={str(tmp_path)!r}, cluster="local")
        executor.update_parameters(timeout_min=5)
        job = executor.submit(time.sleep, 120)
        print("JOB", job.job_id, flush=True)
        try:
            follow.follow(job, Path({str(tmp_path)!r}), "local", 0.2)
        except lock.JobFailed as error:
            print("FAILED", error, flush=True)
    """)
    waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    job_id = int(waiter.stdout.readline().split()[1])
    time.sleep(2)
    assert json.loads((tmp_path / lock.ACTIVE_JOB).read_text())["job_id"] == str(job_id)
    waiter.send_signal(signal.SIGTERM)
    out, _ = waiter.communicate(timeout=60)
    assert "FAILED interrupted (SIGTERM): cancelled job" in out
    deadline = time.monotonic() + 30
    while Path(f"/proc/{job_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{job_id}").exists() or b"submitit" not in Path(f"/proc/{job_id}/cmdline").read_bytes()
    assert not (tmp_path / lock.ACTIVE_JOB).exists()


class NodeFailedJob:
    """A SLURM job as submitit's SlurmJob shows it, whose second run lost a node."""

    job_id = "42"

    def __init__(self, folder: Path):
        self.cancelled = False
        self.paths = type("Paths", (), {"stdout": folder / "42_0_log.out", "stderr": folder / "42_0_log.err"})

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


def test_a_job_that_lost_a_node_is_cancelled_and_its_nodes_named(tmp_path, monkeypatch):
    job = NodeFailedJob(tmp_path)
    monkeypatch.setattr(slurm, "attempts", lambda job_id, timeout_s=60.0: [
        slurm.Attempt("REQUEUED", "flashnet-n1", 95, "0:0"), slurm.Attempt("NODE_FAIL", "flashnet-n[1-2]", 3, "0:0")])
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "CANCELLED" if job.cancelled else "PENDING")
    monkeypatch.setattr(slurm, "node_states", lambda nodes: "flashnet-n1 idle, flashnet-n2 down*")
    with pytest.raises(lock.JobFailed) as error:
        follow.slurm_poll(job)
    assert job.cancelled
    assert str(error.value).startswith(
        "job 42 lost a node (NODE_FAIL; its nodes flashnet-n[1-2] are now: flashnet-n1 idle, flashnet-n2 down*). "
        "SLURM requeues such a job and it would wait until enough nodes are back, so it was cancelled.\n"
        f"logs: {tmp_path / '42_0_log.out'} and {tmp_path / '42_0_log.err'}; rerunning")


def test_a_requeued_job_is_not_over_until_slurm_says_so(tmp_path, monkeypatch):
    runs = [slurm.Attempt("REQUEUED", "flashnet-n1", 95, "0:0")]
    monkeypatch.setattr(slurm, "attempts", lambda job_id, timeout_s=60.0: runs)
    monkeypatch.setattr(slurm, "job_state", lambda job_id: "PENDING")
    assert not follow.slurm_poll(NodeFailedJob(tmp_path))[1]
    monkeypatch.setattr(slurm, "job_state", lambda job_id: None)  # forgotten: accounting has the last word
    runs.append(slurm.Attempt("COMPLETED", "flashnet-n2", 50, "0:0"))
    assert follow.slurm_poll(NodeFailedJob(tmp_path))[1]


def test_a_task_killed_with_sigkill_is_reported_as_killed(tmp_path):
    """Issue 22, case 9: a job killed by `kill -9` read "failed: job N (FINISHED) failed", no reason."""
    import submitit

    from flashnet.runfolder import short_reason

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(time.sleep, 120)
    children = Path(f"/proc/{job.job_id}/task/{job.job_id}/children")
    deadline = time.monotonic() + 30
    while not children.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.1)
    task_pid = int(children.read_text().split()[0])  # the controller's one task: the job's Python
    subprocess.run(["kill", "-9", str(task_pid)], check=True)
    with pytest.raises(lock.JobFailed) as failed:
        follow.wait(job, 0.2)
    assert short_reason(str(failed.value)) == (
        f"job {job.job_id} (FINISHED) failed: task 0 of 1 ended without a result: killed by a signal "
        "(kill -9, the out-of-memory killer) or exited outside Python")


@pytest.mark.parametrize("exit_code, words", [
    ("0:9", "killed by signal 9 (SIGKILL)"), ("137:0", "killed by signal 9 (SIGKILL)"), ("1:0", "exit code 1"),
    ("0:0", ""), ("", ""),
])
def test_slurm_exit_codes_in_words(exit_code, words):
    assert follow.describe_exit_code(exit_code) == words


def test_a_slurm_task_killed_names_its_steps_signal_not_the_allocations_exit_code(tmp_path, monkeypatch):
    """What sacct said on the test cluster for a task killed by SIGKILL: the allocation FAILED with
    ExitCode 9:0, its step CANCELLED with 0:9 (tests/e2e/test_slurm_failures.py runs it for real)."""
    job = NodeFailedJob(tmp_path)
    job.num_tasks = 1
    job.task = lambda i: type("Task", (), {"paths": type("P", (), {"result_pickle": tmp_path / "none.pkl"})})()
    monkeypatch.setattr(follow, "is_slurm", lambda job: True)
    monkeypatch.setattr(slurm, "attempts", lambda job_id, timeout_s=60.0: [slurm.Attempt("FAILED", "n1", 1, "9:0")])
    monkeypatch.setattr(slurm, "step_exit_codes", lambda job_id, timeout_s=60.0: ["9:0", "0:9"])
    assert follow.ending_without_result(job) == "task 0 of 1 ended without a result: killed by signal 9 (SIGKILL)"
    monkeypatch.setattr(slurm, "step_exit_codes", lambda job_id, timeout_s=60.0: [])
    assert follow.ending_without_result(job) == "task 0 of 1 ended without a result: exit code 9"
