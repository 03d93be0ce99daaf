"""The submitting side of training: checks before submission, one job per run, and no job left
running when its waiting process is stopped."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flashnet.config import ConfigError, LauncherConfig, RunConfig
from flashnet.data.sources import DataError
from flashnet.train import launch
from flashnet.train.recipe import TrainSpec

LOCAL = dict(cluster="local", timeout_min=30, signal_delay_s=60, max_num_timeout=3, cpus_per_task=1,
             mem_gb_per_node=None, setup=[], ddp_timeout_s=120, poll_s=0.2, slurm_extra={})


def test_checks_before_submitting(tiny_dataset, tmp_path):
    launcher = LauncherConfig.from_dict(LOCAL)
    good = RunConfig.from_dict(tiny_dataset.run())
    launch.check_before_submitting(good, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
    two_nodes = RunConfig.from_dict(tiny_dataset.run(nodes=2))
    with pytest.raises(ConfigError, match="nodes: 2, but launcher.cluster is local"):
        launch.check_before_submitting(two_nodes, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
    too_big = RunConfig.from_dict(tiny_dataset.run(batch_size=1024))
    with pytest.raises(ConfigError, match="batch_size 1024 exceeds the 160 train samples"):
        launch.check_before_submitting(too_big, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
    with pytest.raises(DataError, match="manifest missing"):
        launch.check_before_submitting(good, launcher, tmp_path / "manifest.json", tiny_dataset.val_manifest)
    if not torch.cuda.is_available():  # a local job runs on this machine: what it cannot do is refused now
        gpu = RunConfig.from_dict(tiny_dataset.run(accelerator="gpu"))
        with pytest.raises(ConfigError, match="accelerator: gpu, but this node has no CUDA device"):
            launch.check_before_submitting(gpu, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)
        fp16 = RunConfig.from_dict(tiny_dataset.run(accelerator="auto", precision="16-mixed"))
        with pytest.raises(ConfigError, match="precision: 16-mixed needs a GPU"):
            launch.check_before_submitting(fp16, launcher, tiny_dataset.train_manifest, tiny_dataset.val_manifest)


def test_a_manifest_that_does_not_verify_stops_submission(tiny_dataset, tmp_path):
    manifest = json.loads(tiny_dataset.train_manifest.read_text())
    shard = tiny_dataset.train_manifest.parent / manifest["shards"][0]["name"]
    copy = tmp_path / "train"
    copy.mkdir()
    for entry in manifest["shards"]:
        (copy / entry["name"]).write_bytes((shard.parent / entry["name"]).read_bytes())
    (copy / manifest["shards"][0]["name"]).write_bytes(b"short")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000000\.tar: 5 bytes, the manifest says"):
        launch.check_before_submitting(RunConfig.from_dict(tiny_dataset.run()), LauncherConfig.from_dict(LOCAL),
                                       copy / "manifest.json", tiny_dataset.val_manifest)


def test_a_shard_damaged_after_its_manifest_stops_submission_naming_it(tiny_dataset, tmp_path):
    """Issue 14, case 2: a flipped byte keeps the shard's size, and training used to check only sizes."""
    copy = tmp_path / "train"
    shutil.copytree(tiny_dataset.train_manifest.parent, copy)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01  # inside the first image
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{shard}: sha256 differs from {copy / 'manifest.json'} .*"
                                        r"snakemake --forcerun write_shards$"):
        launch.check_before_submitting(RunConfig.from_dict(tiny_dataset.run()), LauncherConfig.from_dict(LOCAL),
                                       copy / "manifest.json", tiny_dataset.val_manifest)


def test_a_run_with_a_job_still_running_is_refused(tmp_path, start_process):
    # A stand-in for submitit's local controller: a process whose command line says so.
    controller = start_process([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local"])
    try:
        (tmp_path / launch.ACTIVE_JOB).write_text(json.dumps({"cluster": "local", "job_id": str(controller.pid)}))
        with pytest.raises(launch.JobFailed, match=rf"local job {controller.pid} of this run is still running.*kill"):
            launch.refuse_if_running(tmp_path)
    finally:
        controller.kill()
        controller.wait()
    launch.refuse_if_running(tmp_path)  # gone now: the stale record is dropped
    assert not (tmp_path / launch.ACTIVE_JOB).exists()


def test_a_run_followed_by_another_invocation_is_refused_naming_its_host_and_pid(tmp_path, running_invocation):
    """Issue 14, case 6: the refusal said the waiting process was killed, when it was alive."""
    record = running_invocation(tmp_path / "jobs")
    with pytest.raises(launch.JobFailed) as error:
        launch.refuse_if_running(tmp_path / "jobs")
    assert str(error.value) == (
        f"local job {record['job_id']} of this run is being followed by another invocation (host "
        f"{socket.gethostname()}, pid {record['pid']}, results in {tmp_path}); wait for it to end, or stop it "
        f"and its job (kill {record['job_id']}), then rerun")
    assert json.loads((tmp_path / "jobs" / launch.ACTIVE_JOB).read_text()) == record


def test_stopping_the_waiting_process_cancels_the_job(tmp_path):
    """SIGTERM to the waiting rule (Snakemake stopping it) must not leave the job running unwatched."""
    script = textwrap.dedent(f"""
        import time, submitit
        from pathlib import Path
        from flashnet.train import launch
        executor = submitit.AutoExecutor(folder={str(tmp_path)!r}, cluster="local")
        executor.update_parameters(timeout_min=5)
        job = executor.submit(time.sleep, 120)
        print("JOB", job.job_id, flush=True)
        try:
            launch.follow(job, Path({str(tmp_path)!r}), "local", 0.2)
        except launch.JobFailed as error:
            print("FAILED", error, flush=True)
    """)
    waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    job_id = int(waiter.stdout.readline().split()[1])
    time.sleep(2)
    assert json.loads((tmp_path / launch.ACTIVE_JOB).read_text())["job_id"] == str(job_id)
    waiter.send_signal(signal.SIGTERM)
    out, _ = waiter.communicate(timeout=60)
    assert "FAILED interrupted (SIGTERM): cancelled job" in out
    deadline = time.monotonic() + 30
    while Path(f"/proc/{job_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{job_id}").exists() or b"submitit" not in Path(f"/proc/{job_id}/cmdline").read_bytes()
    assert not (tmp_path / launch.ACTIVE_JOB).exists()


class LosesFirstCancel:
    """A SLURM job whose first scancel is lost (it stays pending), as seen after a NODE_FAIL."""

    job_id = "13"

    def __init__(self):
        self.cancels = 0

    def cancel(self, check: bool = True) -> None:
        self.cancels += 1


def test_a_lost_scancel_is_repeated_until_the_job_is_cancelled(monkeypatch):
    job = LosesFirstCancel()
    monkeypatch.setattr(launch, "slurm_job_state", lambda job_id: "CANCELLED" if job.cancels >= 2 else "PENDING")
    assert launch.cancel_slurm_job(job, timeout_s=5, poll_s=0.01) == "CANCELLED"
    assert job.cancels == 2


def test_a_job_that_will_not_cancel_is_reported_not_waited_for_forever(monkeypatch):
    job = LosesFirstCancel()
    monkeypatch.setattr(launch, "slurm_job_state", lambda job_id: "PENDING")
    assert launch.cancel_slurm_job(job, timeout_s=0.05, poll_s=0.01) == "PENDING"
    assert job.cancels >= 2



def test_forcerun_train_moves_an_interrupted_runs_checkpoints_aside(tiny_dataset, tmp_path, capsys):
    """Issue 14, case 3: `--forcerun train` (the rule passes --fresh) retrains from scratch, as the
    README says, even after an interrupted run left a resume checkpoint; a plain rerun resumes."""
    spec = TrainSpec("tiny", tiny_dataset.run(), str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest),
                     str(tmp_path))
    launch.set_aside_stale_checkpoint(spec)
    spec.checkpoint.write_bytes(b"an interrupted run's checkpoint")
    launch.set_aside_stale_checkpoint(spec)  # same settings, not forced: kept for resuming
    assert spec.checkpoint.exists()
    launch.set_aside_stale_checkpoint(spec, fresh=True)
    assert not spec.checkpoint.exists()
    (aside,) = tmp_path.glob("checkpoints.forced-*")
    assert (aside / "last.ckpt").read_bytes() == b"an interrupted run's checkpoint"
    assert f"--forcerun train: not resuming from {spec.checkpoint}: moved it to {aside}" in capsys.readouterr().out
