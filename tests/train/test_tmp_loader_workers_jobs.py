"""Temporary (not committed): the USR2 requeue test with one loader worker per rank."""
import os, signal, time
import torch
import pytest
from flashnet.jobs import follow
from test_training_jobs import start, task_pids, wait_for_step  # noqa

pytestmark = pytest.mark.e2e


def test_ddp_job_with_a_loader_worker_survives_a_usr2_interruption(tiny_dataset, tmp_path):
    reference = start(tiny_dataset, tmp_path / "reference", loader_workers=1)
    expected = follow.wait(reference, 0.5)
    job = start(tiny_dataset, tmp_path / "interrupted", loader_workers=1)
    wait_for_step(job, 13)
    for pid in task_pids(tmp_path / "interrupted" / "jobs"):
        os.kill(pid, signal.SIGUSR2)
    summary = follow.wait(job, 0.5)
    log = job.paths.stdout.read_text()
    assert log.count("resuming from") == 1
    assert summary["steps"] == expected["steps"] == 20
    a = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    assert max(float((b[n].double() - a[n].double()).abs().max()) for n in a) <= 1e-6
    assert summary["final_top1"] == expected["final_top1"]
