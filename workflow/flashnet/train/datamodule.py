"""Shards → Lightning: one train loader for the whole run, one val loader for every validation.

The train loader (:class:`.loader.TrainEpochs`) is made once per ``fit``, starting at the restored
global step (a resume mid-epoch reads nothing before it), and shows Lightning one epoch per
iteration; its workers fork once and live to the end of the fit, keep their shards open, and make
the next epoch's first batches while this one trains. Which epoch a batch belongs to, and whether it
is augmented (``run.augments``), follows from its global step inside the workers. The val loader's
workers outlive each validation too (``persistent_workers``). Both are shut down when ``fit`` ends,
also on an error (Lightning's teardown), and by :meth:`ShardData.teardown`.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl

from ..config import RunConfig
from ..data.epochs import TrainSamples, TrainStreamSpec
from ..data.loader import TrainEpochs, TrainRunSpec, ValSpec, train_run_loader, val_loader
from ..data.transforms import Augmentation


def augmenting_epochs(run: RunConfig, total_steps: int, steps_per_epoch: int) -> int | None:
    """The number of leading epochs that augment (``run.augments``, the one definition), or None
    when all of the run's epochs do."""
    epochs = math.ceil(total_steps / steps_per_epoch)
    return next((epoch for epoch in range(epochs) if not run.augments(epoch)), None)


def train_run_spec(run: RunConfig, samples: TrainSamples, rank: int, world_size: int, steps_per_epoch: int,
                   total_steps: int, start_step: int) -> TrainRunSpec:
    """One rank's train batches from ``start_step`` (the restored global step) to the run's end."""
    epoch = TrainStreamSpec(samples=samples, seed=run.seed, epoch=0, rank=rank, world_size=world_size,
                            steps=steps_per_epoch, batch_size=run.per_device_batch, image_size=run.image_size,
                            augmentation=Augmentation.from_run(run), decode_on_device=run.decode_device == "cuda",
                            epoch_steps=steps_per_epoch)
    return TrainRunSpec(epoch, total_steps, start_step, augmenting_epochs(run, total_steps, steps_per_epoch),
                        run.eval_resize)


class ShardData(pl.LightningDataModule):
    def __init__(self, run: RunConfig, train_samples: TrainSamples, val_samples: TrainSamples, steps_per_epoch: int,
                 total_steps: int, val_batch_size: int, workers: int):
        super().__init__()
        self.run, self.workers = run, workers
        self.train_samples, self.val_samples = train_samples, val_samples
        self.steps_per_epoch, self.total_steps, self.val_batch_size = steps_per_epoch, total_steps, val_batch_size
        self.train_epochs: TrainEpochs | None = None

    @property
    def _pin_memory(self) -> bool:
        return self.trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> TrainEpochs:
        """Asked for once per fit (no ``reload_dataloaders_every_n_epochs``), after the checkpoint
        is restored; the workers start prefetching here."""
        self._close_train()
        trainer = self.trainer
        run = train_run_spec(self.run, self.train_samples, trainer.global_rank, trainer.world_size,
                             self.steps_per_epoch, self.total_steps, trainer.global_step)
        self.train_epochs = train_run_loader(run, self.workers, pin_memory=self._pin_memory,
                                             current_epoch=lambda: trainer.current_epoch)
        self.train_epochs.start()
        return self.train_epochs

    def val_dataloader(self):
        spec = ValSpec(samples=self.val_samples, rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                       batch_size=self.val_batch_size, image_size=self.run.image_size, resize=self.run.eval_resize,
                       workers=self.workers, decode_on_device=self.run.decode_device == "cuda")
        return val_loader(spec, pin_memory=self._pin_memory)

    def teardown(self, stage: str) -> None:
        self._close_train()

    def _close_train(self) -> None:
        if self.train_epochs is not None:
            self.train_epochs.close()
            self.train_epochs = None
