"""A SLURM job whose task is killed without a word (kill -9, the OOM killer): the waiting side
names the task and the signal from sacct, instead of "job N (FAILED) failed" (issue 22, case 9)."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.e2e


def test_a_slurm_task_killed_with_sigkill_is_reported_with_its_signal(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from flashnet.jobs import follow, lock
    from flashnet.runfolder import short_reason

    slurm_cluster.apply_env(monkeypatch)  # submitit runs sbatch/sacct with this process's environment
    pid_file = tmp_path / "task.pid"

    # Defined here so cloudpickle ships it by value: the job's interpreter cannot import this module.
    def sleep_after_saying_where(path=str(pid_file)):
        import os
        import time

        with open(path + ".part", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".part", path)
        time.sleep(300)

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=1, cpus_per_task=1, mem_gb=1, timeout_min=10,
                               slurm_partition=slurm_cluster.partition, slurm_account=slurm_cluster.account,
                               name="killed-task")
    job = executor.submit(sleep_after_saying_where)
    deadline = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pid_file.exists(), job.stderr()
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the nodes' processes are this machine's
    with pytest.raises(lock.JobFailed) as failed:
        follow.wait(job, 1.0)
    reason = short_reason(str(failed.value))
    print(reason, slurm_cluster.sacct(job.job_id))
    assert reason.startswith(f"job {job.job_id} (")
    assert reason.endswith("failed: task 0 of 1 ended without a result: killed by signal 9 (SIGKILL)"), reason
