"""Run health at log steps: the ranks' one agreement (stop requested, non-finite loss, the train loss
averaged over all ranks) and the divergence rules, taken by every rank at once.

Bounds (README "When a run goes wrong"):

- a non-finite train loss on any rank stops the run at the next check, naming the first step;
- the mean train loss of a log interval, over all ranks, above ``divergence_loss_factor`` × ln(classes)
  stops it: ln(classes) is the loss of a uniform guess, where every run starts (label smoothing
  lowers the minimum, never raises this); a mean loss ten times it gives the right class a
  geometric-mean probability below classes^-10, which warm-up noise does not reach (the tiny test
  run logs at most a quarter of its bound); 10 × ln(1000) = 69 is passed by a run that has left the loss surface (the
  LARS run at ``lr: 1e4`` logged 7e7). 0 turns the rule off;
- a validation top-1 at or below chance (1 / classes) after an earlier validation of the same run
  reached twice chance stops it: a run at chance from the start (early epochs on tiny data) never
  trips it; one that learned and then lost everything has diverged.
"""

from __future__ import annotations

import math
from typing import Callable

import pytorch_lightning as pl

from .callbacks import NonFiniteLoss, RunRecords


class Diverged(FloatingPointError):
    """The run's loss or accuracy says training has diverged (finite, but lost)."""


def loss_bound(factor: float, classes: int) -> float:
    """The mean train loss past which a run has diverged: ``factor`` × the uniform guess's loss."""
    return factor * math.log(classes) if factor > 0 else math.inf


def fell_to_chance(top1: float, earlier_top1: list[float], classes: int) -> bool:
    """Top-1 at or below chance after an earlier validation reached twice chance."""
    chance = 1.0 / classes
    return top1 <= chance and any(value >= 2 * chance for value in earlier_top1)


class RunHealth(pl.Callback):
    """First of the callbacks at a log step's batch end: every rank agrees once
    (``ImageNetClassifier.agree_across_ranks``), so the records and progress lines after it log the
    loss averaged over all ranks, and the checkpoint callback reuses the same answer. Fails the run
    on a non-finite or diverging loss, and on a validation fallen to chance, before a checkpoint
    of the bad state is written (the checkpoint callback comes after it)."""

    def __init__(self, flags: Callable[[pl.Trainer], dict[str, bool]], log_every_steps: int, classes: int,
                 divergence_loss_factor: float, records: RunRecords):
        # flags: what the ranks agree on besides the loss (ResumeCheckpoints.agreement_flags)
        self.flags, self.log_every_steps, self.classes = flags, log_every_steps, classes
        self.bound = loss_bound(divergence_loss_factor, classes)
        self.factor = divergence_loss_factor
        self.records = records  # earlier validations (restored with the checkpoint on a resume)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.log_every_steps:
            return
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        step = trainer.global_step
        agreed = pl_module.agree_across_ranks(self.flags(trainer))
        if agreed.nonfinite_step >= 0:
            raise NonFiniteLoss(f"loss became NaN or infinite at step {agreed.nonfinite_step} on at least one rank; "
                                "the run diverged")
        if agreed.mean_loss is not None and agreed.mean_loss > self.bound:
            raise Diverged(f"train loss {agreed.mean_loss:.4g} (mean over all ranks, up to step {step}) is above "
                           f"divergence_loss_factor {self.factor:g} × ln({self.classes} classes) = {self.bound:.3g}; "
                           "the run diverged")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.check(trainer, pl_module)  # also catches what happened since the last log step
        top1 = float(trainer.callback_metrics["val_top1"])
        earlier = [row["val_top1"] for row in self.records.epochs if row["epoch"] < trainer.current_epoch + 1]
        if fell_to_chance(top1, earlier, self.classes):
            raise Diverged(f"validation top-1 {top1:.4f} after epoch {trainer.current_epoch + 1} is at or below "
                           f"chance (1/{self.classes}) after reaching {max(earlier):.4f}; the run diverged")
