"""The training clock: the fit's wall time, and what part of it validation, checkpoint writes and
start-up took (flashnet/train/clock.py), on a clock the test moves by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flashnet.train import clock as clock_module
from flashnet.train.clock import CHECKPOINT, TrainClock


@pytest.fixture
def now(monkeypatch):
    """The seconds perf_counter returns; the test advances it."""
    current = [100.0]
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: current[0])
    return current


def fake_trainer(world_size: int = 2):
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), sanity_checking=False,
                           world_size=world_size)


def run_one_segment(clock: TrainClock, trainer, now: list[float]) -> None:
    """Start-up 5 s (first step included), 3 steps of 2 s, a 4 s validation, a 1.5 s checkpoint."""
    clock.on_fit_start(trainer, None)
    now[0] += 5
    clock.on_train_batch_end(trainer, None, None, None, 0)  # the first step ends the start-up
    for _ in range(3):
        now[0] += 2
        clock.on_train_batch_end(trainer, None, None, None, 0)
    clock.on_validation_start(trainer, None)
    now[0] += 4
    clock.on_validation_end(trainer, None)
    with clock.timed(CHECKPOINT, trainer):
        now[0] += 1.5
    clock.on_train_end(trainer, None)


def test_the_fit_splits_into_steps_validation_checkpoints_and_startup(now):
    clock, trainer = TrainClock(), fake_trainer()
    run_one_segment(clock, trainer, now)
    assert clock.elapsed(trainer) == 16.5
    assert clock.training_elapsed(trainer) == 11  # start-up and steps; validation and checkpoint left out
    assert clock.last["validation"] == 4
    assert clock.summary(trainer, steps=4, global_batch=64) == {
        "train_seconds": 16.5, "step_seconds": 6, "validation_seconds": 4, "validations": 1,
        "checkpoint_seconds": 1.5, "checkpoints": 1, "startup_seconds": 5, "job_segments": 1,
        "images_per_s": 32.0,  # 3 steps × 64 images in 6 s; the first step is start-up
        "images_per_s_per_device": 16.0,
    }


def test_a_validation_in_progress_is_not_training_time(now):
    clock, trainer = TrainClock(), fake_trainer()
    clock.on_fit_start(trainer, None)
    now[0] += 3
    clock.on_train_batch_end(trainer, None, None, None, 0)
    clock.on_validation_start(trainer, None)
    now[0] += 10
    assert clock.training_elapsed(trainer) == 3


def test_a_resumed_segment_adds_to_the_saved_totals(now):
    first, trainer = TrainClock(), fake_trainer()
    run_one_segment(first, trainer, now)
    resumed = TrainClock()
    resumed.load_state_dict(first.state_dict())
    now[0] += 600  # queued: not training time
    run_one_segment(resumed, trainer, now)
    summary = resumed.summary(trainer, steps=8, global_batch=64)
    assert summary["train_seconds"] == 33 and summary["startup_seconds"] == 10 and summary["job_segments"] == 2
    assert summary["images_per_s"] == 32.0  # 6 timed steps in 12 s


def test_a_checkpoint_from_before_phases_were_timed_still_resumes(now):
    clock = TrainClock()
    clock.load_state_dict({"elapsed": 42.0})  # what TrainClock saved before it timed phases
    assert clock.before == 42.0 and clock.spent["validation"] == 0 and clock.startup_steps == 0
