"""Shards → Lightning: a fresh train loader each epoch, seeded by the epoch and resumed mid-epoch
where the restored global step says training stopped."""

from __future__ import annotations

import pytorch_lightning as pl

from ..config import RunConfig
from ..data.epochs import TrainSamples
from ..data.loader import TrainStreamSpec, ValSpec, train_loader, val_loader
from ..data.transforms import Augmentation


def epoch_position(global_step: int, epoch: int, steps_per_epoch: int, total_steps: int) -> tuple[int, int]:
    """(batches in this epoch, batches of it already trained). Every epoch but a fractional last one
    has ``steps_per_epoch`` batches; after a resume the restored global step tells how far it got."""
    start_of_epoch = epoch * steps_per_epoch
    steps = max(0, min(steps_per_epoch, total_steps - start_of_epoch))
    done = min(max(global_step - start_of_epoch, 0), steps)
    return steps, done


class ShardData(pl.LightningDataModule):
    def __init__(self, run: RunConfig, train_samples: TrainSamples, val_shards: tuple[str, ...],
                 val_shard_samples: tuple[int, ...], steps_per_epoch: int, total_steps: int, val_batch_size: int):
        super().__init__()
        self.run = run
        self.train_samples, self.val_shards, self.val_shard_samples = train_samples, val_shards, val_shard_samples
        self.steps_per_epoch, self.total_steps, self.val_batch_size = steps_per_epoch, total_steps, val_batch_size

    @property
    def _pin_memory(self) -> bool:
        return self.trainer.strategy.root_device.type == "cuda"

    def _placement(self) -> dict:
        """What the train and val loaders of this process share: its rank in the world, the image
        size, and where JPEGs are decoded."""
        return dict(rank=self.trainer.global_rank, world_size=self.trainer.world_size, image_size=self.run.image_size,
                    decode_on_device=self.run.decode_device == "cuda")

    def train_dataloader(self):
        trainer, run = self.trainer, self.run
        steps, done = epoch_position(trainer.global_step, trainer.current_epoch, self.steps_per_epoch, self.total_steps)
        spec = TrainStreamSpec(
            samples=self.train_samples,
            seed=run.seed,
            epoch=trainer.current_epoch,
            steps=steps,
            batch_size=run.per_device_batch,
            augmentation=Augmentation.from_run(run),
            center_crop_resize=None if run.augments(trainer.current_epoch) else run.eval_resize,
            start_batch=done,
            epoch_steps=self.steps_per_epoch,
            **self._placement(),
        )
        return train_loader(spec, run.loader_workers, pin_memory=self._pin_memory)

    def val_dataloader(self):
        spec = ValSpec(shards=self.val_shards, shard_samples=self.val_shard_samples, batch_size=self.val_batch_size,
                       resize=self.run.eval_resize, workers=self.run.loader_workers, **self._placement())
        return val_loader(spec, pin_memory=self._pin_memory)
