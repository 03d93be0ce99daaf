"""Tests of flashnet.data.epochs: the sample stream at the seed's scale, by simulation over the
sample index alone (no shards, no images): 1,281,167 samples in 1,282 shards of 1,000, 2,048 ranks
× 8 loader workers × 40 a device (Fujitsu's global batch of 81,920)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flashnet.data import epochs
from flashnet.data.transforms import Augmentation
from flashnet.train.schedule import steps_per_epoch

IMAGENET_TRAIN = 1_281_167
SHARD_SIZE = 1_000
WORLD, WORKERS, PER_DEVICE = 2_048, 8, 40


@pytest.fixture(scope="module")
def imagenet() -> epochs.TrainSamples:
    """ImageNet's train split as the loader sees it, with made-up byte ranges (never read)."""
    full, last = divmod(IMAGENET_TRAIN, SHARD_SIZE)
    sizes = (SHARD_SIZE,) * full + ((last,) if last else ())
    assert len(sizes) == 1_282
    ranges = np.zeros((IMAGENET_TRAIN, 2), dtype=np.int64)
    return epochs.TrainSamples(tuple(f"train-{i:06d}.tar" for i in range(len(sizes))), sizes, ranges)


def rank_spec(samples, rank: int, epoch: int, **changes) -> epochs.TrainStreamSpec:
    settings = dict(samples=samples, seed=0, epoch=epoch, rank=rank, world_size=WORLD,
                    steps=steps_per_epoch(len(samples), WORLD * PER_DEVICE), batch_size=PER_DEVICE, image_size=224,
                    augmentation=Augmentation(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)))
    return epochs.TrainStreamSpec(**{**settings, **changes})


def epoch_plan(samples, epoch: int, resume_at: int | None = None, **changes) -> list[list[np.ndarray]]:
    """Every rank's batches as (pass, sample) pairs (rows of 2), as its workers make them. With
    ``resume_at``, each rank's first batches come from the epoch as planned from its start and the
    rest from a loader resumed at that batch."""
    plan = []
    for rank in range(WORLD):
        spec = rank_spec(samples, rank, epoch, **changes)
        starts = [spec] if resume_at is None else [spec, dataclasses.replace(spec, start_batch=resume_at)]
        made: dict[int, np.ndarray] = {}
        for part, start_spec in enumerate(starts):
            for worker in range(WORKERS):
                for batch in epochs.worker_batches(start_spec, worker, WORKERS):
                    if part == len(starts) - 1 or batch < resume_at:
                        made[batch] = np.stack(epochs.batch_stream(start_spec, batch), axis=1)
        plan.append([made[b] for b in sorted(made)])
    return plan


def read(plan) -> np.ndarray:
    """(pass, sample) rows of a plan, all ranks and batches."""
    return np.concatenate([b for rank in plan for b in rank])


def test_the_stream_reads_every_sample_once_a_pass_and_drops_none(imagenet):
    global_batch = WORLD * PER_DEVICE
    steps = steps_per_epoch(IMAGENET_TRAIN, global_batch)
    assert steps == 15 and IMAGENET_TRAIN - steps * global_batch == 52_367  # an epoch is 0.96 of a pass
    plans = [epoch_plan(imagenet, 0), epoch_plan(imagenet, 1, resume_at=7)]
    for plan in plans:
        assert {len(rank) for rank in plan} == {steps}, "ranks with different batch counts hang DDP"
        assert {len(batch) for rank in plan for batch in rank} == {PER_DEVICE}
        # a rank's share of an epoch is a few hundred samples drawn from hundreds of shards
        assert len(np.unique(imagenet.shard_of(read(plan)[:, 1][:steps * PER_DEVICE]))) > 300
    rows = np.concatenate([read(plan) for plan in plans])
    assert len(np.unique(rows, axis=0)) == len(rows) == 2 * steps * global_batch, "a sample read twice in a pass"
    first_pass = rows[rows[:, 0] == 0, 1]
    assert np.array_equal(np.sort(first_pass), np.arange(IMAGENET_TRAIN)), "pass 0 is not every sample once"
    # epoch 1's first step straddles the passes: pass 0's last 52,367 samples, then pass 1's first
    step_15 = np.concatenate([rank[0] for rank in plans[1]])
    assert np.bincount(step_15[:, 0]).tolist() == [52_367, global_batch - 52_367]
    assert (rows[:, 0] <= 1).all()


def test_an_epoch_of_nvidias_length_holds_more_than_a_pass(imagenet):
    """ceil_per_rank: ceil(floor(N / 2,048) / 40) = 16 steps of 81,920 = 1,310,720 samples > N."""
    steps = steps_per_epoch(IMAGENET_TRAIN, WORLD * PER_DEVICE, "ceil_per_rank", WORLD)
    assert steps == 16
    spec = rank_spec(imagenet, 5, 2, steps=steps)
    # epoch 2 starts at global step 32: the stream's sample 32 × 81,920 + 5 × 40, in pass 2
    passes, numbers = epochs.batch_stream(spec, 0)
    assert (passes == 2).all()
    assert np.array_equal(numbers, epochs.epoch_order(IMAGENET_TRAIN, 0, 2)[
        32 * 81_920 + 200 - 2 * IMAGENET_TRAIN:][:PER_DEVICE])


def test_a_short_last_epoch_starts_where_whole_epochs_end(imagenet):
    whole = rank_spec(imagenet, 0, 3)
    short = rank_spec(imagenet, 0, 3, steps=4, epoch_steps=whole.steps)
    assert epochs.global_step(short, 2) == epochs.global_step(whole, 2) == 3 * 15 + 2
    assert np.array_equal(epochs.batch_samples(short, 2), epochs.batch_samples(whole, 2))


def test_a_global_batch_is_the_same_whatever_the_world_size(imagenet):
    """Step t trains on the same samples split over 2,048 ranks of 40 or 1,024 of 80."""
    step = 3
    wide = np.concatenate([epochs.batch_samples(rank_spec(imagenet, r, 0), step) for r in range(WORLD)])
    narrow = np.concatenate([epochs.batch_samples(rank_spec(imagenet, r, 0, world_size=WORLD // 2,
                                                            batch_size=2 * PER_DEVICE), step)
                             for r in range(WORLD // 2)])
    assert np.array_equal(wide, narrow)


def test_shard_of_finds_each_samples_shard(imagenet):
    numbers = np.array([0, 999, 1_000, 1_280_999, 1_281_000, IMAGENET_TRAIN - 1])
    assert imagenet.shard_of(numbers).tolist() == [0, 0, 1, 1280, 1281, 1281]
