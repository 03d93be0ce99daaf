"""Training as the workflow runs it: a 2-process gloo DDP job through submitit's local executor,
interrupted by the USR2 signal submitit listens for, requeued, resumed, and compared with an
uninterrupted job of the same seed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from flashnet.jobs import follow
from flashnet.train import launch
from flashnet.train.recipe import TrainSpec

pytestmark = pytest.mark.e2e


def start(tiny_dataset, out: Path, **overrides):
    run = tiny_dataset.run(devices_per_node=2, batch_size=16, epochs=2, log_every_steps=1, **overrides)
    spec = TrainSpec("ddp", run, str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest), str(out),
                     tiny_dataset.launcher(ddp_timeout_s=120, poll_s=0.5))
    return launch.submit_training(spec)


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
    expected = follow.wait(reference, 0.5)
    assert expected["world_size"] == 2 and expected["steps"] == 20

    job = start(tiny_dataset, tmp_path / "interrupted")
    for step in (3, 14):  # mid-epoch 1, then mid-epoch 2
        wait_for_step(job, step)
        for pid in task_pids(tmp_path / "interrupted" / "jobs"):
            os.kill(pid, signal.SIGUSR2)  # as SLURM does: every task gets the signal
        time.sleep(1)
    summary = follow.wait(job, 0.5)

    log = job.paths.stdout.read_text()
    assert log.count("requeueing") == 2 and log.count("resuming from") == 2
    assert summary["steps"] == expected["steps"]
    # each job segment's start-up is timed, and carried through the checkpoints into the summary
    assert (expected["job_segments"], summary["job_segments"]) == (1, 3)
    metrics = (tmp_path / "interrupted" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == ["1", "2"]
    # each epoch's mean train loss over both ranks survives the stops mid-epoch (every rank's running
    # sum goes into the checkpoint, not rank 0's alone)
    train_loss = {name: [row["train_loss"] for row in csv.DictReader((tmp_path / name / "metrics.csv").open())]
                  for name in ("reference", "interrupted")}
    assert train_loss["interrupted"] == train_loss["reference"]
    a = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["state_dict"]
    differing = {name: float((b[name].double() - a[name].double()).abs().max()) for name in a}
    assert max(differing.values()) <= 1e-6, sorted(differing.items(), key=lambda kv: -kv[1])[:5]
    assert summary["final_top1"] == expected["final_top1"]


def test_ddp_job_with_trackers_requeued_logs_to_one_run_and_says_so(tiny_dataset, tmp_path, monkeypatch):
    """Two ranks, the three trackers and one USR2 requeue: rank 0 alone logs, the resumed job goes on
    in the same MLflow and W&B runs, and the waiter's progress lines tell the requeue and resume."""
    import io

    from flashnet.watch import ProgressLines

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out, mlruns = tmp_path / "runs" / "ddp", (tmp_path / "mlruns").as_uri()
    job = start(tiny_dataset, out, loggers=["csv", "tensorboard", "mlflow", "wandb"], mlflow_tracking_uri=mlruns)
    terminal = io.StringIO()
    progress = ProgressLines("train ddp", terminal, out, epochs=2, batch_size=16, train_samples=160)
    wait_for_step(job, 3)
    for pid in task_pids(out / "jobs"):
        os.kill(pid, signal.SIGUSR2)
    summary = follow.wait(job, 0.5, progress)
    assert summary["world_size"] == 2

    said = terminal.getvalue()
    assert "; the job is requeued" in said and "[train ddp] resumed from " in said, said
    assert said.count("[train ddp] epoch ") == 2, said

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns)
    (run,) = client.search_runs([client.get_experiment_by_name("flashnet").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epochs/val_top1")] == [10, 20]
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2  # one folder per job segment, one run id
    assert len({p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")}) == 1
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # rank 0, once per segment


# --------------------------------------------------------------------------- another layout at the same global batch


def in_process_spec(tiny_dataset, out: Path, devices: int) -> TrainSpec:
    run = tiny_dataset.run(devices_per_node=devices, batch_size=16, epochs=2, log_every_steps=1)
    return TrainSpec("ddp", run, str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest), str(out),
                     tiny_dataset.launcher(ddp_timeout_s=120, poll_s=0.5))


def lr_by_step(out: Path) -> dict[int, float]:
    import csv

    with (out / "steps.csv").open() as f:
        return {int(row["step"]): float(row["lr"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def one_device_reference(tiny_dataset, tmp_path_factory):
    from flashnet.train.callbacks import StopRequest
    from flashnet.train.recipe import train

    out = tmp_path_factory.mktemp("one-device")
    return out, train(in_process_spec(tiny_dataset, out, 1), None, StopRequest())


def test_one_device_to_two_resumes_the_same_schedule_and_says_the_bn_span_changed(tiny_dataset, tmp_path,
                                                                                  one_device_reference, capsys):
    """Issue 22, case 1: a run interrupted on 1 device resumes on 2 gloo ranks at the same global
    batch: the step count and the learning rate at every step are the uninterrupted run's, and the
    BN span change (16 → 8 samples) is said on the submitting side and in summary.json."""
    import pytorch_lightning as pl

    from flashnet.train.callbacks import Preempted, StopRequest
    from flashnet.train.recipe import train

    class StopAt5(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                stop.request("test")

    stop = StopRequest()
    with pytest.raises(Preempted, match="stopped at step 5"):
        train(in_process_spec(tiny_dataset, tmp_path, 1), None, stop, extra_callbacks=[StopAt5()])
    capsys.readouterr()
    job = launch.submit_training(in_process_spec(tiny_dataset, tmp_path, 2))
    assert ("resuming on another layout (devices_per_node 1 → 2, per_device_batch 16 → 8, bn_span 16 → 8)"
            in capsys.readouterr().out)
    summary = follow.wait(job, 0.5)
    reference_out, reference = one_device_reference
    assert summary["world_size"] == 2 and summary["steps"] == reference["steps"] == 20
    assert summary["layout_changes"] == [{"at_step": 5, "devices_per_node": "1 → 2", "per_device_batch": "16 → 8",
                                          "bn_span": "16 → 8"}]
    assert lr_by_step(tmp_path) == lr_by_step(reference_out)


def test_two_devices_to_one_resumes_the_same_schedule(tiny_dataset, tmp_path, one_device_reference):
    """The other way: 2 gloo ranks stopped by USR2 (the job's requeue cancelled), resumed on 1 device."""
    from flashnet.train.callbacks import StopRequest
    from flashnet.train.recipe import train

    job = launch.submit_training(in_process_spec(tiny_dataset, tmp_path, 2))
    wait_for_step(job, 5)
    for pid in task_pids(tmp_path / "jobs"):
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 120
    while "requeueing" not in job.paths.stdout.read_text():
        assert time.monotonic() < deadline, job.paths.stdout.read_text()
        time.sleep(0.2)
    job.cancel(check=False)  # the node count changes before the requeued job starts
    while task_pids(tmp_path / "jobs") and time.monotonic() < deadline:
        time.sleep(0.2)
    (tmp_path / "jobs" / "active.json").unlink(missing_ok=True)
    one = in_process_spec(tiny_dataset, tmp_path, 1)
    said = []
    assert launch.decide_resume(one, say=said.append) == one.checkpoint
    assert said[0].startswith("resuming on another layout (devices_per_node 2 → 1, per_device_batch 8 → 16, "
                              "bn_span 8 → 16)")
    summary = train(one, None, StopRequest())
    reference_out, reference = one_device_reference
    assert summary["steps"] == reference["steps"] == 20
    (change,) = summary["layout_changes"]
    assert change["devices_per_node"] == "2 → 1" and change["at_step"] >= 5
    assert lr_by_step(tmp_path) == lr_by_step(reference_out)
