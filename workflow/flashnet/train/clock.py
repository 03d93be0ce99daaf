"""The training clock: the fit's wall time over job segments, and what part of it went to
validation, resume checkpoint writes and each job's start-up, so that throughput is measured over
training steps and the summary says where the rest went.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import pytorch_lightning as pl
import torch


def synchronize(trainer: pl.Trainer) -> None:
    """Wait for queued device work, so a clock read measures it (no-op on CPU)."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# What the fit's wall clock is spent on besides training steps, in TrainClock.spent.
VALIDATION, CHECKPOINT, STARTUP = "validation", "checkpoint", "startup"


class TrainClock(pl.Callback):
    """The fit's wall time summed over job segments (requeues don't count the time spent queued), and
    what part of it went to validation, resume checkpoint writes and each segment's start-up (from
    Lightning's ``on_fit_start``, once the process group and the model are set up, to the end of the
    segment's first training step: restoring the checkpoint, loader workers, compilation, cuDNN
    autotuning, the first batch). Reads are taken after a device synchronisation.

    Phases are timed from the callback hooks (validation), :meth:`timed` (checkpoints) and the first
    training step of a segment (start-up); a checkpoint's own write is not in the state it saves.
    """

    def __init__(self):
        self.before = 0.0  # seconds trained by earlier segments
        self.segment_start = None
        self.spent = {VALIDATION: 0.0, CHECKPOINT: 0.0, STARTUP: 0.0}  # seconds per phase, all segments
        self.count = {VALIDATION: 0, CHECKPOINT: 0, STARTUP: 0}  # times each phase was timed
        self.last = dict.fromkeys(self.spent, 0.0)  # the latest duration of each phase
        self.startup_steps = 0  # steps that ended a start-up (one per segment that trained)
        self._open: dict[str, float] = {}  # phase → when it began (perf_counter)

    def on_fit_start(self, trainer, pl_module) -> None:
        synchronize(trainer)
        self.segment_start = time.perf_counter()
        self._open[STARTUP] = self.segment_start

    def elapsed(self, trainer: pl.Trainer) -> float:
        synchronize(trainer)
        return self.before + (time.perf_counter() - self.segment_start)

    def training_elapsed(self, trainer: pl.Trainer) -> float:
        """The fit's time less validation and checkpoint writes (start-up stays in: it is a step's)."""
        now = self.elapsed(trainer)
        excluded = (VALIDATION, CHECKPOINT)
        running = sum(time.perf_counter() - self._open[p] for p in excluded if p in self._open)
        return now - sum(self.spent[p] for p in excluded) - running

    def begin(self, phase: str, trainer: pl.Trainer) -> None:
        synchronize(trainer)
        self._open[phase] = time.perf_counter()

    def end(self, phase: str, trainer: pl.Trainer) -> None:
        if phase not in self._open:
            return
        synchronize(trainer)
        self.last[phase] = time.perf_counter() - self._open.pop(phase)
        self.spent[phase] += self.last[phase]
        self.count[phase] += 1

    @contextlib.contextmanager
    def timed(self, phase: str, trainer: pl.Trainer) -> Iterator[None]:
        self.begin(phase, trainer)
        try:
            yield
        finally:
            self.end(phase, trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if STARTUP in self._open:
            self.end(STARTUP, trainer)
            self.startup_steps += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self.end(STARTUP, trainer)  # a segment that validates before it trains (resumed at an epoch end)
        if not trainer.sanity_checking:
            self.begin(VALIDATION, trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.end(VALIDATION, trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end(STARTUP, trainer)  # a segment with no step left to train

    def summary(self, trainer: pl.Trainer, steps: int, global_batch: int) -> dict[str, Any]:
        """summary.json's timing: the fit's wall clock and where it went; images/s over the training
        steps only, each segment's first step (its start-up) left out."""
        fit = self.elapsed(trainer)
        step_seconds = fit - sum(self.spent.values())
        rate = (steps - self.startup_steps) * global_batch / step_seconds if step_seconds > 0 else None
        return {
            "train_seconds": round(fit, 3),
            "step_seconds": round(step_seconds, 3),
            "validation_seconds": round(self.spent[VALIDATION], 3),
            "validations": self.count[VALIDATION],
            "checkpoint_seconds": round(self.spent[CHECKPOINT], 3),
            "checkpoints": self.count[CHECKPOINT],
            "startup_seconds": round(self.spent[STARTUP], 3),
            "job_segments": self.count[STARTUP],
            "images_per_s": None if rate is None else round(rate, 2),
            "images_per_s_per_device": None if rate is None else round(rate / trainer.world_size, 2),
        }

    def state_dict(self) -> dict[str, Any]:
        elapsed = self.before if self.segment_start is None else self.before + time.perf_counter() - self.segment_start
        return {"elapsed": elapsed, "spent": dict(self.spent), "count": dict(self.count),
                "startup_steps": self.startup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state["elapsed"]
        # A checkpoint from before phases were timed holds the elapsed time only.
        self.spent.update(state.get("spent", {}))
        self.count.update(state.get("count", {}))
        self.startup_steps = state.get("startup_steps", 0)
