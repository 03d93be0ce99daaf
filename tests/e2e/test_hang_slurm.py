"""The hang watchdog on the real two-node SLURM cluster: a 2-node DDP training job (one gloo rank a
node), rank 1's process stopped with SIGSTOP mid-run; the job fails within the watchdog's limits
(not ddp_timeout_s), rank 0's log names rank 1, the job is cancelled (the stopped task would hold
the step open forever) and the run folder's failure record says hung."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from flashnet.jobs import follow
from flashnet.jobs.lock import JobFailed
from flashnet.runfolder import read_failure
from flashnet.train import launch
from flashnet.train.recipe import TrainSpec

pytestmark = pytest.mark.e2e


def rank_process(slurm_cluster, node: str, rank: int) -> int:
    for pid in slurm_cluster.node_pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and f"SLURM_PROCID={rank}\0".encode() in environ:
            return pid
    raise AssertionError(f"no task of rank {rank} on {node}")


def test_a_stopped_rank_on_slurm_is_named_and_the_job_cancelled(slurm_cluster, tiny_dataset, tmp_path, monkeypatch):
    slurm_cluster.apply_env(monkeypatch)
    run = tiny_dataset.run(nodes=2, devices_per_node=1, batch_size=16, epochs=4, log_every_steps=1)
    launcher = dataclasses.replace(
        tiny_dataset.launcher(cluster="slurm", ddp_timeout_s=300, poll_s=1, timeout_min=15,
                              watchdog_step_multiple=10, watchdog_floor_s=3, watchdog_grace_s=60),
        slurm_partition=slurm_cluster.partition, slurm_account=slurm_cluster.account)
    out = tmp_path / "run"
    job = launch.submit_training(TrainSpec("hang", run, str(tiny_dataset.train_manifest),
                                           str(tiny_dataset.val_manifest), str(out), launcher))
    deadline = time.monotonic() + 300
    while " step 13/" not in (job.paths.stdout.read_text() if job.paths.stdout.exists() else ""):
        assert time.monotonic() < deadline, "step 13 not reached:\n" + (
            job.paths.stderr.read_text() if job.paths.stderr.exists() else "")
        time.sleep(0.5)
    os.kill(rank_process(slurm_cluster, slurm_cluster.nodes[1], 1), signal.SIGSTOP)
    stopped = time.monotonic()
    with pytest.raises(JobFailed):
        follow.wait(job, 1)
    took = time.monotonic() - stopped
    assert took < 150 < 300, took  # the watchdog, not the collective timeout
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "rank(s) 1 did not answer" in log and "most recent call first" in log.lower()
    assert f"cancelled SLURM job {job.job_id}" in log
    record = read_failure(out)
    assert record["kind"] == "hung" and record["silent_ranks"] == [1]
    assert slurm_cluster.wait_job(job.job_id, timeout=60) == "CANCELLED" or \
        slurm_cluster.job_state(job.job_id).startswith("CANCELLED")
