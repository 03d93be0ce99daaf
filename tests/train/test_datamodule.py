"""Tests of flashnet.train.datamodule through Lightning's own fit loop: one train loader for the run
(the same workers every epoch, shut down when fit ends), the batches of per-epoch loaders, a
fractional last epoch validated, a resume mid-epoch, and the augmentation switch from run.augments."""

from __future__ import annotations

import hashlib
import math
import multiprocessing

import pytest
import pytorch_lightning as pl
import torch

from flashnet.config import RunConfig
from flashnet.data.epochs import TrainSamples
from flashnet.data.loader import train_loader
from flashnet.data.manifest import load_manifest
from flashnet.train.datamodule import ShardData, augmenting_epochs, train_run_spec
from flashnet.train.schedule import steps_per_epoch, total_steps

pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|dataloader is not resumable).*")

WORKERS = 2


def batch_key(batch) -> str:
    return hashlib.sha256(batch.images.numpy().tobytes() + batch.labels.numpy().tobytes()).hexdigest()[:16]


class Recorder(pl.LightningModule):
    """Trains one weight on the batches, recording what each step saw, the loader processes alive
    at each epoch's start, and after which epochs validation ran."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, str]] = []  # (epoch, global step, batch)
        self.children_at_epoch_start: list[set[int]] = []
        self.validated_after: list[int] = []

    def on_train_epoch_start(self):
        self.children_at_epoch_start.append({child.pid for child in multiprocessing.active_children()})

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, self.global_step, batch_key(batch)))
        return self.weight * batch.images.float().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.validated_after.append(self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset):
    """2.5 epochs of 10 steps (160 samples, 16 a batch), epoch 3 without augmentation."""
    run = RunConfig.from_dict(tiny_dataset.run(epochs=2.5, no_augment_from_epoch=3))
    samples = {split: TrainSamples.from_manifest(path, load_manifest(path))
               for split, path in (("train", tiny_dataset.train_manifest), ("val", tiny_dataset.val_manifest))}
    spe = steps_per_epoch(len(samples["train"]), run.batch_size)
    return run, samples, spe, total_steps(run.epochs, spe)


def fit(tiny_run, tmp_path, max_steps: int, ckpt_path=None) -> tuple[Recorder, pl.Trainer]:
    run, samples, spe, total = tiny_run
    module = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=math.ceil(run.epochs), max_steps=max_steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=tmp_path)
    data = ShardData(run, samples["train"], samples["val"], spe, total, run.per_device_batch, WORKERS)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
    return module, trainer


def per_epoch_keys(tiny_run) -> list[str]:
    """The run's batches from loaders of one epoch each (how training made them before)."""
    run, samples, spe, total = tiny_run
    spec = train_run_spec(run, samples["train"], 0, 1, spe, total, 0)
    return [batch_key(batch) for epoch in range(math.ceil(total / spe))
            for batch in train_loader(spec.epoch_spec(epoch), 0)]


def test_one_loader_serves_every_epoch_and_ends_with_the_fit(tiny_run, tmp_path):
    run, _, spe, total = tiny_run
    module, trainer = fit(tiny_run, tmp_path, total)
    assert trainer.global_step == total == 25
    assert [key for _, _, key in module.seen] == per_epoch_keys(tiny_run)
    assert [epoch for epoch, _, _ in module.seen] == [step // spe for step in range(total)]
    assert module.validated_after == [0, 1, 2], "every epoch validated, the fractional last one too"
    train_workers = module.children_at_epoch_start[0]
    assert len(train_workers) == WORKERS
    assert all(train_workers <= alive for alive in module.children_at_epoch_start), "train workers re-forked"
    assert len(module.children_at_epoch_start[-1]) == 2 * WORKERS  # and the val workers, kept across validations
    assert not multiprocessing.active_children(), "loader workers outlived the fit"


def test_a_fit_resumed_mid_epoch_trains_the_uninterrupted_batches(tiny_run, tmp_path):
    """Stopped at step 13 (mid-epoch 2), checkpointed, resumed: steps 13.. see the batches the
    uninterrupted run saw, read by a loader that starts there."""
    total = tiny_run[3]
    first, trainer = fit(tiny_run, tmp_path, 13)
    assert not multiprocessing.active_children()
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, _ = fit(tiny_run, tmp_path, total, ckpt_path=tmp_path / "mid.ckpt")
    assert [step for _, step, _ in resumed.seen] == list(range(13, total))
    assert [key for _, _, key in first.seen + resumed.seen] == per_epoch_keys(tiny_run)


def test_the_epochs_that_augment_are_run_augments(tiny_run):
    run, _, spe, total = tiny_run
    spec = train_run_spec(run, tiny_run[1]["train"], 0, 1, spe, total, 0)
    assert augmenting_epochs(run, total, spe) == 2
    assert [spec.epoch_spec(epoch).center_crop_resize is None for epoch in range(3)] == [run.augments(e) for e in range(3)]
    always = run.replace(no_augment_from_epoch=None)
    assert augmenting_epochs(always, total, spe) is None
