"""flashnet.train.health and the module's rank agreement: two real gloo ranks training the tiny
shards through ``recipe.train`` (as a job's tasks do), a non-finite loss on one rank only, the
logged loss and the BN statistics over both ranks; and the divergence rules on one rank."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import traceback
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp

from flashnet.runfolder import read_failure
from flashnet.train.callbacks import NonFiniteLoss, RunRecords, StopRequest
from flashnet.train.health import Diverged, RunHealth, fell_to_chance, loss_bound
from flashnet.train.module import batchnorm_statistics
from flashnet.train.recipe import TrainSpec, train


def make_spec(tiny_dataset, out: Path, **overrides) -> TrainSpec:
    return TrainSpec("health", tiny_dataset.run(**overrides), str(tiny_dataset.train_manifest),
                     str(tiny_dataset.val_manifest), str(out), tiny_dataset.launcher(ddp_timeout_s=120))


def flat_statistics(pl_module) -> torch.Tensor:
    return torch.cat([stat.detach().reshape(-1).clone() for stat in batchnorm_statistics(pl_module.model)])


# --------------------------------------------------------------------------- two ranks


class PoisonedLoss(torch.nn.Module):
    """The criterion, except that ``rank``'s loss at ``step`` reads NaN while its gradient stays
    finite (the loss plus NaN × its detached self): only that rank's bookkeeping sees it, as with a
    bad batch on one rank."""

    def __init__(self, criterion: torch.nn.Module, module, rank: int, step: int):
        super().__init__()
        self.criterion, self.rank, self.step = criterion, rank, step
        self.module = [module]  # not a submodule

    def forward(self, logits, labels):
        loss = self.criterion(logits, labels)
        module = self.module[0]
        if module.global_rank == self.rank and module.global_step == self.step:
            return loss + loss.detach() * math.nan
        return loss


class NaNLossOnRank(pl.Callback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.criterion = PoisonedLoss(pl_module.criterion, pl_module, self.rank, self.step)


class Observe(pl.Callback):
    """Records each rank's own loss per step, its BN statistics at the end of each epoch's last step,
    and at the first validation batch (after the module averaged them)."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.before_validation: list[torch.Tensor] = []
        self.at_validation: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step % trainer.datamodule.steps_per_epoch == 0:  # the loader has no length
            self.before_validation.append(flat_statistics(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.at_validation.append(flat_statistics(pl_module))


def _rank_main(rank: int, world: int, port: int, spec: TrainSpec, nan_step: int | None, results) -> None:
    from lightning_fabric.plugins.environments import LightningEnvironment

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    observe = Observe()
    callbacks = [observe] + ([NaNLossOnRank(1, nan_step)] if nan_step is not None else [])
    try:
        train(spec, LightningEnvironment(), StopRequest(), extra_callbacks=callbacks)
        error = None
    except Exception as caught:  # reported to the test, which asserts on it
        error = f"{type(caught).__name__}: {caught}\n{traceback.format_exc()}"
    results[rank] = {"error": error, "losses": observe.losses, "before": observe.before_validation,
                     "at": observe.at_validation}


def train_on_two_ranks(spec: TrainSpec, nan_step: int | None = None) -> dict[int, dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank_main, args=(2, port, spec, nan_step, results), nprocs=2, start_method="fork")
        return dict(results)


@pytest.fixture(scope="module")
def two_rank_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    spec = make_spec(tiny_dataset, out, devices_per_node=2, batch_size=16, epochs=2, log_every_steps=2)
    results = train_on_two_ranks(spec)
    for rank, result in results.items():
        assert result["error"] is None, f"rank {rank}: {result['error']}"
    return out, results


def test_the_logged_train_loss_is_the_mean_over_ranks(two_rank_run):
    out, results = two_rank_run
    with (out / "steps.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == list(range(2, 21, 2))  # 160 images / 16: 10 steps an epoch
    own = {rank: results[rank]["losses"] for rank in (0, 1)}
    assert own[0][1] != pytest.approx(own[1][1], abs=1e-3)  # the ranks' own losses differ
    for row in rows:
        step = int(row["step"])
        expected = sum(own[rank][s] for rank in (0, 1) for s in (step - 1, step)) / 4
        assert float(row["train_loss"]) == pytest.approx(expected, abs=2e-5), step


def test_batchnorm_statistics_are_averaged_over_ranks_at_each_validation(two_rank_run):
    out, results = two_rank_run
    before = [results[rank]["before"] for rank in (0, 1)]
    at = [results[rank]["at"] for rank in (0, 1)]
    assert len(at[0]) == len(at[1]) == 2  # a validation after each epoch
    for epoch in range(2):
        assert not torch.equal(before[0][epoch], before[1][epoch])  # each rank kept its own batches' statistics
        torch.testing.assert_close(at[0][epoch], at[1][epoch], rtol=0, atol=0)
        torch.testing.assert_close(at[0][epoch], (before[0][epoch] + before[1][epoch]) / 2, rtol=1e-6, atol=1e-7)
    # model.pt holds the averaged statistics (its state_dict lists them in module order, as
    # batchnorm_statistics does)
    saved = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    written = torch.cat([value.reshape(-1) for name, value in saved.items()
                         if name.endswith(("running_mean", "running_var"))])
    torch.testing.assert_close(written, at[0][-1], rtol=0, atol=0)


def test_a_nan_on_one_rank_only_stops_the_run_naming_its_step(tiny_dataset, tmp_path):
    spec = make_spec(tiny_dataset, tmp_path, devices_per_node=2, batch_size=16, epochs=2, log_every_steps=4,
                     divergence_loss_factor=0)
    results = train_on_two_ranks(spec, nan_step=5)  # a NaN at step 5 only; checks at steps 4, 8 and epoch ends
    for rank in (0, 1):
        error = results[rank]["error"] or ""
        assert error.startswith("NonFiniteLoss: loss became NaN or infinite at step 5 "), (rank, error[:300])
    assert not (tmp_path / "summary.json").exists()
    assert read_failure(tmp_path)["kind"] == "diverged"


# --------------------------------------------------------------------------- divergence, one rank


def test_the_loss_bound_is_a_multiple_of_the_uniform_guess():
    assert loss_bound(10, 1000) == pytest.approx(69.08, abs=0.01)
    assert loss_bound(0, 1000) == math.inf


def test_chance_counts_only_after_the_run_once_learned():
    assert not fell_to_chance(0.25, [], 4)  # the first validation at chance: early epochs on tiny data
    assert not fell_to_chance(0.25, [0.3, 0.4], 4)  # never reached twice chance
    assert fell_to_chance(0.25, [0.3, 0.6], 4)
    assert not fell_to_chance(0.3, [0.6], 4)


def test_a_finite_divergence_stops_the_run_as_diverged(tiny_dataset, tmp_path):
    """LARS at lr 1e4 on the issue's run logged 7e7 → 1e15 and "finished"; here SGD at lr 1e6."""
    spec = make_spec(tiny_dataset, tmp_path, optimizer="sgd", lr=1e6, warmup_epochs=0.1, log_every_steps=1)
    with pytest.raises(Diverged, match=r"train loss .* is above divergence_loss_factor 10 × ln\(4 classes\) = 13.9"):
        train(spec, None, StopRequest())
    record = read_failure(tmp_path)
    assert record["kind"] == "diverged" and "above divergence_loss_factor" in record["message"]
    assert not (tmp_path / "summary.json").exists()


def test_a_validation_fallen_to_chance_stops_the_run(tmp_path):
    records = RunRecords(tmp_path, None, 16, 10, 2, 0.9)
    records.epochs = [{"epoch": 1, "val_top1": 0.7}]
    health = RunHealth(lambda trainer: {"stop": False}, 2, 4, 10, records)
    module = types.SimpleNamespace(agree_across_ranks=lambda flags: types.SimpleNamespace(
        flags=flags, nonfinite_step=-1, mean_loss=1.2))
    trainer = types.SimpleNamespace(sanity_checking=False, global_step=20, current_epoch=1,
                                    callback_metrics={"val_top1": torch.tensor(0.25)})
    with pytest.raises(Diverged, match=r"validation top-1 0.2500 after epoch 2 is at or below chance \(1/4\)"):
        health.on_validation_end(trainer, module)
    trainer.callback_metrics["val_top1"] = torch.tensor(0.5)
    health.on_validation_end(trainer, module)  # learning still: no stop


def test_a_healthy_run_stays_far_below_the_loss_bound(tiny_dataset, tmp_path):
    train(make_spec(tiny_dataset, tmp_path, epochs=2, log_every_steps=1), None, StopRequest())
    with (tmp_path / "steps.csv").open() as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert max(losses) < loss_bound(10, 4) / 4, losses  # warm-up at lr 1.0 included
    assert json.loads((tmp_path / "summary.json").read_text())["finished"] is True
