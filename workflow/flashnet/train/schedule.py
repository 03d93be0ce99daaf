"""The step counts and the learning-rate schedule of a run, each derived in one place: steps per
epoch, total steps, and the warmup and polynomial decay stepped every iteration (Goyal et al. 2017
§2.2 for the warmup; You et al. 2017 and MLPerf's LARS reference for the decay).

Weight decay needs no schedule of its own: LARS and SGD here apply lr(step)·λ·w, so the decay term
warms up and decays with the learning rate. That is what Fujitsu's MLPerf v0.6 run had to schedule
by hand (``wd_warmup``, ``wd_decay_mode power``), because MXNet's LARS kernel there does not
multiply weight decay by the scheduled learning rate.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import ConfigError


def steps_per_epoch(train_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: floor(N / B) full global batches, the one definition.

    An epoch is a fresh seeded permutation of all N train samples (data/epochs.py); its first
    floor(N / B) × B samples make the steps, each sample once, and its tail of N mod B < B samples
    is dropped (a different tail each epoch), so every rank runs the same number of equal batches
    (DDP hangs otherwise). MLPerf's ``train_samples`` is N, the dataset size; the RCP tables'
    ``opt_learning_rate_decay_steps`` are absolute optimizer steps and are used as they are. A
    flashnet epoch is thus (N mod B) / N short of an MLPerf epoch (a pass over all N): at most
    2.8 % at batch 65,536 on ImageNet (6 % at 86,016). Where a run is held against MLPerf's or a
    paper's epoch counts, epochs are counted as samples seen / N = steps × B / N."""
    steps = train_samples // batch_size
    if steps == 0:
        raise ConfigError(f"batch_size {batch_size} exceeds the {train_samples} train samples")
    return steps


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
