"""The step counts and the learning-rate schedule of a run, each derived in one place: steps per
epoch, total steps, and the warmup and polynomial decay stepped every iteration (Goyal et al. 2017
§2.2 for the warmup; You et al. 2017 and MLPerf's LARS reference for the decay).

Weight decay needs no schedule of its own: LARS and SGD here apply lr(step)·λ·w, so the decay term
warms up and decays with the learning rate. That is what Fujitsu's MLPerf v0.6 run had to schedule
by hand (``wd_warmup``, ``wd_decay_mode power``), because MXNet's LARS kernel there does not
multiply weight decay by the scheduled learning rate. Its trust ratio, though, divides by the
unscheduled wd = 5e-5 × 13 = 6.5e-4 (``fit.py``: ``'wd': args.wd * args.lr``; ``mxnet_op.h``), so
τ ≤ η / wd = 3.85: its preset sets ``lars_trust_weight_decay`` to that (train/lars.py). Its counts,
as its ``fit.py`` makes them and this module reproduces them (``epoch_steps: ceil_per_rank``): 15
steps an epoch, warmup 540 steps, the 0.0325 floor at step 1,320, 90 epochs = 1,350 steps.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import ConfigError


EPOCH_STEP_RULES = ("floor", "ceil_per_rank")


def steps_per_epoch(train_samples: int, batch_size: int, rule: str = "floor", ranks: int = 1) -> int:
    """Optimizer steps in one epoch, counted as the recipe's source counts them: the one definition.

    - ``floor``: floor(N / B) (flashnet's default; the MLPerf TF2 reference, ``common.py``
      ``get_num_train_iterations`` with its default ``drop_train_remainder``);
    - ``ceil_per_rank``: ceil(floor(N / W) / b) with W ranks of b = B / W (NVIDIA's MXNet
      ``fit.py`` ``get_epoch_size`` in mlcommons/training_results_v4.0, and Fujitsu's in v0.6):
      each rank reads its 1/W of the data set rounded up to whole batches, so an epoch holds at
      least N samples (DALI fills the last batch from the next epoch's).

    Either way the samples are one stream, a concatenation of seeded permutations of all N train
    samples (passes), and global step t trains on the stream's samples [tB, (t + 1)B)
    (data/epochs.py): every sample once per pass, none dropped, a step may straddle two passes. An
    epoch is this many steps of it, so warmup, validation epochs and a run's length come out in
    the source's own step counts; MLPerf's ``train_samples`` is N and an epoch covers
    steps × B / N passes (0.97-1.00 under floor, 1.00-1.06 under ceil_per_rank at ImageNet's
    scale). Where a run is held against MLPerf's epochs to converge, epochs are counted as samples
    seen / N = steps × B / N."""
    if rule not in EPOCH_STEP_RULES:
        raise ConfigError(f"epoch_steps: {rule!r} is not one of {', '.join(EPOCH_STEP_RULES)}")
    if batch_size > train_samples:
        raise ConfigError(f"batch_size {batch_size} exceeds the {train_samples} train samples")
    if rule == "floor":
        return train_samples // batch_size
    if batch_size % ranks:
        raise ConfigError(f"batch_size {batch_size} is not a multiple of the {ranks} ranks")
    return math.ceil((train_samples // ranks) / (batch_size // ranks))


def run_steps_per_epoch(run, train_samples: int) -> int:
    """:func:`steps_per_epoch` of a run: its ``epoch_steps`` rule over its ranks."""
    return steps_per_epoch(train_samples, run.batch_size, run.epoch_steps, run.world_size)


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of a run of ``epochs`` (a fractional last epoch is cut at its step)."""
    return math.ceil(epochs * steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class WarmupPolySchedule:
    """lr(step) of the 0-based optimizer ``step``, with t = step + 1 the step's 1-based number:

        t ≤ W:  lr = peak · t / W
        t > W:  lr = end + (peak − end) · (1 − min(t − W, D) / D) ^ power

    with W = ``warmup_steps`` and D = ``decay_steps``. The warmup reaches the peak on its last
    step, the decay reaches ``end`` on its D-th step and stays there: D is MLPerf's
    ``opt_learning_rate_decay_steps`` (counted as NVIDIA's MXNet PolyScheduler counts iterations,
    from 1), so the horizon can outlast the run that stops at its target.
    """

    peak_lr: float
    warmup_steps: int
    decay_steps: int
    power: float
    end_lr: float

    def __call__(self, step: int) -> float:
        t = step + 1
        if t <= self.warmup_steps:
            return self.peak_lr * t / self.warmup_steps
        progress = min(t - self.warmup_steps, self.decay_steps) / self.decay_steps
        return self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - progress) ** self.power

    @property
    def horizon_steps(self) -> int:
        """Steps until the LR reaches its floor."""
        return self.warmup_steps + self.decay_steps


def schedule_for_run(run, steps_per_epoch: int) -> WarmupPolySchedule:
    """The run's LR schedule: its decay horizon is ``lr_decay_steps``, or ``lr_decay_epochs``
    epochs, or else the rest of the run after the warmup."""
    warmup = math.ceil(run.warmup_epochs * steps_per_epoch)
    if run.lr_decay_steps is not None:
        decay = run.lr_decay_steps
    elif run.lr_decay_epochs is not None:
        decay = math.ceil(run.lr_decay_epochs * steps_per_epoch)
    else:
        decay = total_steps(run.epochs, steps_per_epoch) - warmup
    return WarmupPolySchedule(peak_lr=run.lr, warmup_steps=warmup, decay_steps=max(decay, 1),
                              power=run.lr_decay_power, end_lr=run.end_lr)
