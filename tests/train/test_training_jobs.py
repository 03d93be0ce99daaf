"""Training as the workflow runs it: a 2-process gloo DDP job through submitit's local executor,
interrupted by the USR2 signal submitit listens for, requeued, resumed, and compared with an
uninterrupted job of the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from flashnet.config import LauncherConfig, RunConfig
from flashnet.train import launch
from flashnet.train.recipe import TrainSpec

pytestmark = pytest.mark.e2e

LAUNCHER = dict(cluster="local", timeout_min=30, signal_delay_s=60, max_num_timeout=3, cpus_per_task=1,
                mem_gb_per_node=None, setup=[], ddp_timeout_s=120, poll_s=0.5, slurm_extra={})


def start(tiny_dataset, out: Path, **overrides):
    run = tiny_dataset.run(devices_per_node=2, batch_size=16, epochs=2, log_every_steps=1, **overrides)
    spec = TrainSpec("ddp", run, str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest), str(out), 120, 1)
    return launch.submit_training(spec, RunConfig.from_dict(run), LauncherConfig.from_dict(LAUNCHER))


def task_pids(folder: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"submitit.core._submit {folder}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def wait_for_step(job, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = job.paths.stdout.read_text() if job.paths.stdout.exists() else ""
        if f" step {step}/" in log:
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached; log:\n{log}")


def test_ddp_job_survives_two_usr2_interruptions(tiny_dataset, tmp_path):
    reference = start(tiny_dataset, tmp_path / "reference")
    expected = launch.wait(reference, 0.5)
    assert expected["world_size"] == 2 and expected["steps"] == 20

    job = start(tiny_dataset, tmp_path / "interrupted")
    for step in (3, 14):  # mid-epoch 1, then mid-epoch 2
        wait_for_step(job, step)
        for pid in task_pids(tmp_path / "interrupted" / "jobs"):
            os.kill(pid, signal.SIGUSR2)  # as SLURM does: every task gets the signal
        time.sleep(1)
    summary = launch.wait(job, 0.5)

    log = job.paths.stdout.read_text()
    assert log.count("requeueing") == 2 and log.count("resuming from") == 2
    assert summary["steps"] == expected["steps"]
    metrics = (tmp_path / "interrupted" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == ["1", "2"]
    a = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    differing = {name: float((b[name].double() - a[name].double()).abs().max()) for name in a}
    assert max(differing.values()) <= 1e-6, sorted(differing.items(), key=lambda kv: -kv[1])[:5]
    assert summary["final_top1"] == expected["final_top1"]


def test_job_folder_is_private(tiny_dataset, tmp_path):
    folder = launch.private_dir(tmp_path / "jobs")
    assert folder.stat().st_mode & 0o777 == 0o700
