"""The learning-rate schedule of the large-batch records: linear warmup, then polynomial decay,
stepped every iteration (Goyal et al. 2017 §2.2 for the warmup; You et al. 2017 and MLPerf's
LARS reference for the polynomial decay)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class WarmupPolySchedule:
    """lr(step) for ``total_steps`` optimizer steps:

        step < W:  lr = peak · (step + 1) / W
        step ≥ W:  lr = end + (peak − end) · (1 − (step − W) / (T − W)) ^ power

    with W = ``warmup_steps`` and T = ``total_steps``. The warmup reaches the peak on its last step
    (step W − 1) and the decay starts from it, reaching ``end`` after the last step.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    power: float
    end_lr: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - progress) ** self.power


def schedule_for_run(run, steps_per_epoch: int) -> WarmupPolySchedule:
    return WarmupPolySchedule(
        peak_lr=run.lr,
        warmup_steps=math.ceil(run.warmup_epochs * steps_per_epoch),
        total_steps=total_steps(run.epochs, steps_per_epoch),
        power=run.lr_decay_power,
        end_lr=run.end_lr,
    )


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    return math.ceil(epochs * steps_per_epoch)
