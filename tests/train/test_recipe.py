"""Single-process training runs on the tiny shards, in this process (fast)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision

from flashnet.config import RunConfig
from flashnet.train.callbacks import NonFiniteLoss, Preempted, StopRequest
from flashnet.train.recipe import TrainSpec, train



def make_spec(tiny_dataset, out: Path, **overrides) -> TrainSpec:
    run = tiny_dataset.run(**overrides)
    return TrainSpec("tiny", run, str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest), str(out),
                     tiny_dataset.launcher())


class StopAtStep(pl.Callback):
    """Requests a stop after optimizer step ``step``, as the USR2 handler would."""

    def __init__(self, stop: StopRequest, step: int):
        self.stop, self.step = stop, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.stop.request("test")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def load_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run32")
    summary = train(make_spec(tiny_dataset, out, epochs=3, warmup_epochs=1), None, StopRequest())
    return out, summary


def test_32_true_run_learns_and_writes_its_records(finished_run):
    out, summary = finished_run
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["step"]) for r in rows] == [10, 20, 30]  # 160 images // batch 16
    assert summary["steps"] == 30 and summary["world_size"] == 1 and summary["precision"] == "32-true"
    assert summary["final_top1"] == float(rows[-1]["val_top1"])
    assert summary["final_top1"] >= 0.5  # 4 classes: chance is 0.25
    walls = [float(r["wall_s"]) for r in rows]
    assert walls == sorted(walls) and summary["train_seconds"] >= walls[-1]
    if summary["time_to_target_s"] is not None:
        first = next(r for r in rows if float(r["val_top1"]) >= 0.5)
        assert summary["time_to_target_s"] == float(first["wall_s"])
    steps = read_csv(out / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(2, 31, 2))
    assert not (out / "checkpoints" / "last.ckpt").exists()  # finished: nothing to resume


def test_summary_says_where_the_training_time_went(finished_run):
    out, summary = finished_run
    rows = read_csv(out / "metrics.csv")
    parts = ("step_seconds", "validation_seconds", "checkpoint_seconds", "startup_seconds")
    assert sum(summary[key] for key in parts) == pytest.approx(summary["train_seconds"], abs=0.01)
    assert all(summary[key] > 0 for key in parts)
    assert summary["validations"] == 3 and summary["job_segments"] == 1
    assert summary["checkpoints"] == 1  # at the end only: checkpoint_every_minutes (10) is longer than the run
    assert sum(float(r["validation_s"]) for r in rows) == pytest.approx(summary["validation_seconds"], abs=0.01)
    # images/s over training steps only: the first step (start-up) and the other phases left out
    assert summary["images_per_s"] == pytest.approx((30 - 1) * 16 / summary["step_seconds"], rel=1e-3)


def test_final_checkpoint_loads_into_torchvision(finished_run):
    out, _ = finished_run
    record = torch.load(out / "model.pt", weights_only=True)
    model = torchvision.models.resnet18(num_classes=record["num_classes"])
    model.load_state_dict(record["state_dict"])
    assert record["run"]["model"] == "resnet18" and len(record["wnids"]) == 4
    assert RunConfig.from_dict(record["run"]).eval_resize == round(32 * 256 / 224)


def test_schedule_as_logged_follows_warmup_then_decay(finished_run):
    out, _ = finished_run
    lrs = {int(r["step"]): float(r["lr"]) for r in read_csv(out / "steps.csv")}
    # after optimizer step s the scheduler has set lr(s): warmup to 1.0 over 10 steps, then 20 decay steps
    assert lrs[2] == pytest.approx(0.3)
    assert lrs[10] == pytest.approx(0.0001 + (1.0 - 0.0001) * (19 / 20) ** 2)
    assert lrs[30] == pytest.approx(0.0001)
    assert all(lrs[a] >= lrs[b] for a, b in zip(range(10, 30, 2), range(12, 31, 2)))


def test_bf16_mixed_trains_on_cpu(tiny_dataset, tmp_path):
    # A few steps only: CPUs without bf16 units run bf16 autocast some 40× slower than float32.
    summary = train(make_spec(tiny_dataset, tmp_path, precision="bf16-mixed", epochs=0.3, warmup_epochs=0.1,
                              log_every_steps=1), None, StopRequest())
    losses = [float(r["train_loss"]) for r in read_csv(tmp_path / "metrics.csv")]
    assert summary["precision"] == "bf16-mixed" and all(0 < loss < 10 for loss in losses)


@pytest.mark.parametrize("stop_step", [5, 10])  # mid-epoch, and at an epoch's end
def test_resume_continues_exactly_where_it_stopped(tiny_dataset, finished_run, tmp_path, stop_step):
    """Stop (as on USR2), resume from the checkpoint, and end with the very weights of the
    uninterrupted run: model, optimizer, schedule and data position all restored."""
    reference, reference_summary = finished_run
    spec = make_spec(tiny_dataset, tmp_path, epochs=3, warmup_epochs=1, log_every_steps=1)
    stop = StopRequest()
    with pytest.raises(Preempted, match="stopped"):
        train(spec, None, stop, extra_callbacks=[StopAtStep(stop, stop_step)])
    assert spec.checkpoint.exists()
    summary = train(spec, None, StopRequest())
    assert summary["steps"] == reference_summary["steps"]
    assert [r["epoch"] for r in read_csv(tmp_path / "metrics.csv")] == ["1", "2", "3"]
    expected, resumed = load_weights(reference), load_weights(tmp_path)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert summary["final_top1"] == reference_summary["final_top1"]


def test_nonfinite_loss_stops_the_run_naming_the_step(tiny_dataset, tmp_path):
    spec = make_spec(tiny_dataset, tmp_path, optimizer="sgd", lr=1e6, warmup_epochs=0.1, log_every_steps=1,
                     divergence_loss_factor=0)  # else the finite loss of 1e11 before the NaN stops it first
    with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
        train(spec, None, StopRequest())


def test_nonfinite_loss_between_checks_fails_at_the_epoch_end(tiny_dataset, tmp_path):
    """No check step falls inside the run: the epoch-end check still catches it, before the
    resume checkpoint is overwritten."""
    spec = make_spec(tiny_dataset, tmp_path, optimizer="sgd", lr=1e6, warmup_epochs=0.1, epochs=1,
                     log_every_steps=10_000, divergence_loss_factor=0)
    with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
        train(spec, None, StopRequest())
    assert not spec.checkpoint.exists()
    assert not (tmp_path / "summary.json").exists()


def test_summary_is_json_with_versions(finished_run):
    out, _ = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True
    assert set(summary["versions"]) >= {"python", "torch", "torchvision", "pytorch_lightning"}


# --------------------------------------------------------------------------- eval cadence and stop at target


@pytest.fixture(scope="module")
def cadence_run(tiny_dataset, tmp_path_factory):
    """6 epochs validating after epochs 2, 4 and 6 (every 2, offset 1), not stopping at the target."""
    out = tmp_path_factory.mktemp("cadence")
    spec = make_spec(tiny_dataset, out, epochs=6, warmup_epochs=1, eval_every_epochs=2, eval_offset=1,
                     log_every_steps=5)
    return out, train(spec, None, StopRequest())


def test_validation_runs_only_at_the_eval_epochs(cadence_run):
    out, summary = cadence_run
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [2, 4, 6] and [int(r["step"]) for r in rows] == [20, 40, 60]
    assert summary["steps"] == 60 and summary["stopped_at_target"] is False


def first_epoch_reaching(rows: list[dict[str, str]], target: float) -> int:
    return next(int(r["epoch"]) for r in rows if float(r["val_top1"]) >= target)


def stop_target(cadence_run) -> tuple[float, int]:
    """A target the uninterrupted run first reaches after epoch 2 or 4, so stopping there ends it early."""
    rows = read_csv(cadence_run[0] / "metrics.csv")
    best_before_last = max(float(r["val_top1"]) for r in rows[:2])
    return best_before_last, first_epoch_reaching(rows, best_before_last)


def test_stop_at_target_ends_the_run_at_the_first_validation_reaching_it(tiny_dataset, cadence_run, tmp_path):
    target, epoch = stop_target(cadence_run)
    spec = make_spec(tiny_dataset, tmp_path, epochs=6, warmup_epochs=1, eval_every_epochs=2, eval_offset=1,
                     log_every_steps=5, target_top1=target, stop_at_target=True)
    summary = train(spec, None, StopRequest())
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [e for e in (2, 4, 6) if e <= epoch]
    uninterrupted = read_csv(cadence_run[0] / "metrics.csv")[:len(rows)]
    assert [r["val_top1"] for r in rows] == [r["val_top1"] for r in uninterrupted]  # the same run, up to the stop
    assert summary["stopped_at_target"] is True and summary["stopped_at_epoch"] == epoch
    assert summary["steps"] == epoch * 10 and summary["max_steps"] == 60
    assert summary["epochs_to_target"] == epoch and summary["final_top1"] >= target
    assert (tmp_path / "model.pt").exists() and not spec.checkpoint.exists()


@pytest.mark.parametrize("stop_after", ["mid_epoch", "target_validation"])
def test_stop_at_target_holds_across_a_resume(tiny_dataset, cadence_run, tmp_path, stop_after):
    """Interrupted before the target (mid-epoch) or right after the validation that reached it (the
    epoch-end checkpoint then records the stop): the resumed run stops at the same epoch, with the
    same weights as an uninterrupted run that stops there."""
    target, epoch = stop_target(cadence_run)
    overrides = dict(epochs=6, warmup_epochs=1, eval_every_epochs=2, eval_offset=1, log_every_steps=5,
                     target_top1=target, stop_at_target=True)
    reference = train(make_spec(tiny_dataset, tmp_path / "reference", **overrides), None, StopRequest())
    spec = make_spec(tiny_dataset, tmp_path / "resumed", **overrides)
    stop = StopRequest()
    stop_step = 15 if stop_after == "mid_epoch" else epoch * 10
    with pytest.raises(Preempted):
        train(spec, None, stop, extra_callbacks=[StopAtStep(stop, stop_step)])
    summary = train(spec, None, StopRequest())
    assert summary["stopped_at_epoch"] == reference["stopped_at_epoch"] == epoch
    assert summary["steps"] == reference["steps"]
    assert [r["epoch"] for r in read_csv(tmp_path / "resumed" / "metrics.csv")] == \
        [r["epoch"] for r in read_csv(tmp_path / "reference" / "metrics.csv")]
    expected, resumed = load_weights(tmp_path / "reference"), load_weights(tmp_path / "resumed")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_stop_at_the_end_of_an_epoch_without_validation_checkpoints_there(tiny_dataset, cadence_run, tmp_path):
    """Epoch 1 is not validated (every 2, offset 1): its end is still a checkpoint and a place to stop."""
    spec = make_spec(tiny_dataset, tmp_path, epochs=6, warmup_epochs=1, eval_every_epochs=2, eval_offset=1,
                     log_every_steps=5)
    stop = StopRequest()
    with pytest.raises(Preempted, match="stopped at step 10"):
        train(spec, None, stop, extra_callbacks=[StopAtStep(stop, 10)])
    summary = train(spec, None, StopRequest())
    assert summary["steps"] == 60
    expected, resumed = load_weights(cadence_run[0]), load_weights(tmp_path)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_lars_epsilon_reaches_the_optimizer(tiny_run):
    from flashnet.train.module import build_model, build_optimizer

    run = RunConfig.from_dict(tiny_run(lars_epsilon=1e-9))
    optimizer = build_optimizer(run, build_model(run, 4))
    assert {group["eps"] for group in optimizer.param_groups} == {1e-9}
    assert RunConfig.from_dict(tiny_run()).lars_epsilon == 0.0  # MLPerf's closed rules
def test_a_truncated_resume_checkpoint_falls_back_to_the_previous_one(tiny_dataset, finished_run, tmp_path, capsys):
    """Issue 14, case 3: a truncated last.ckpt made every rerun fail in torch, naming no file."""
    reference, reference_summary = finished_run
    spec = make_spec(tiny_dataset, tmp_path, epochs=3, warmup_epochs=1, log_every_steps=3, checkpoint_every_minutes=0)
    stop = StopRequest()
    with pytest.raises(Preempted, match="stopped"):
        train(spec, None, stop, extra_callbacks=[StopAtStep(stop, 7)])
    previous = spec.checkpoint.with_name("last.prev.ckpt")
    assert previous.exists(), "the checkpoint before the newest is kept"
    data = spec.checkpoint.read_bytes()
    spec.checkpoint.write_bytes(data[: len(data) // 3])
    summary = train(spec, None, StopRequest())
    assert f"{spec.checkpoint}: damaged resume checkpoint" in capsys.readouterr().out
    assert summary["steps"] == reference_summary["steps"]
    expected, resumed = load_weights(reference), load_weights(tmp_path)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert not spec.checkpoint.exists() and not previous.exists()


class CrashAtStep(pl.Callback):
    """A job that dies at step ``step`` (a node failure, an OOM): no stop request, no last checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("node lost")


def test_resume_from_a_background_checkpoint_is_exact(tiny_dataset, finished_run, tmp_path):
    """Issue 20: periodic checkpoints are written by a thread from a host copy while training goes
    on; a run that crashed after them resumes from the newest and ends with the uninterrupted run's
    weights bit for bit (log_every_steps and checkpoint_every_minutes differ: they do not change the result)."""
    reference, reference_summary = finished_run
    spec = make_spec(tiny_dataset, tmp_path, epochs=3, warmup_epochs=1, log_every_steps=5, checkpoint_every_minutes=0)
    with pytest.raises(RuntimeError, match="node lost"):
        train(spec, None, StopRequest(), extra_callbacks=[CrashAtStep(13)])
    state = torch.load(spec.checkpoint, weights_only=True, map_location="cpu")
    assert state["global_step"] == 10  # step 5 (in the background), then after epoch 1's validation
    assert torch.load(spec.checkpoint.with_name("last.prev.ckpt"), weights_only=True)["global_step"] == 5
    summary = train(spec, None, StopRequest())
    assert summary["steps"] == reference_summary["steps"]
    expected, resumed = load_weights(reference), load_weights(tmp_path)
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


def test_a_run_checkpoints_with_no_usable_temp_folder(tiny_dataset, tmp_path, monkeypatch):
    """Issue 22, case 3: with $TMPDIR pointing nowhere (as a full or missing node-local /tmp), the
    stop checkpoint is still written, in the run folder, and resumed from."""
    import tempfile

    (tmp_path / "a-file").write_text("")  # a temp folder under a file: nothing can create or write it
    monkeypatch.setenv("TMPDIR", str(tmp_path / "a-file" / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a-file" / "tmp"))
    spec = make_spec(tiny_dataset, tmp_path / "run", epochs=1, warmup_epochs=0.5, log_every_steps=5)
    stop = StopRequest()
    with pytest.raises(Preempted, match="stopped at step 5"):
        train(spec, None, stop, extra_callbacks=[StopAtStep(stop, 5)])
    assert torch.load(spec.checkpoint, weights_only=True)["global_step"] == 5
    assert train(spec, None, StopRequest())["steps"] == 10
