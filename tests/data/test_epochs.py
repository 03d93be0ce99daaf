"""Tests of flashnet.data.epochs: the real-epoch plan at the seed's scale, by simulation over the
sample index alone (no shards, no images): 1,281,167 samples in 1,282 shards of 1,000, 2,048 ranks
× 8 loader workers × 40 a device (Fujitsu's global batch of 81,920)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flashnet.data import epochs, loader
from flashnet.data.transforms import Augmentation
from flashnet.train.recipe import steps_per_epoch

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


def rank_spec(samples, rank: int, epoch: int, **changes) -> loader.TrainStreamSpec:
    settings = dict(samples=samples, seed=0, epoch=epoch, rank=rank, world_size=WORLD,
                    steps=steps_per_epoch(len(samples), WORLD * PER_DEVICE), batch_size=PER_DEVICE, image_size=224,
                    augmentation=Augmentation(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)))
    return loader.TrainStreamSpec(**{**settings, **changes})


def epoch_plan(samples, epoch: int, resume_at: int | None = None) -> list[list[np.ndarray]]:
    """Every rank's batches (sample numbers), as its workers make them. With ``resume_at``, each
    rank's first batches come from the epoch as planned from its start and the rest from a
    loader resumed at that batch."""
    plan = []
    for rank in range(WORLD):
        spec = rank_spec(samples, rank, epoch)
        starts = [spec] if resume_at is None else [spec, dataclasses.replace(spec, start_batch=resume_at)]
        made: dict[int, np.ndarray] = {}
        for part, start_spec in enumerate(starts):
            for worker in range(WORKERS):
                for batch in epochs.worker_batches(start_spec, worker, WORKERS):
                    if part == len(starts) - 1 or batch < resume_at:
                        made[batch] = epochs.batch_samples(start_spec, batch)
        plan.append([made[b] for b in sorted(made)])
    return plan


def test_each_seed_scale_epoch_reads_every_sample_once_but_a_tail_under_one_global_batch(imagenet):
    global_batch = WORLD * PER_DEVICE
    steps = steps_per_epoch(IMAGENET_TRAIN, global_batch)
    assert steps == 15 and IMAGENET_TRAIN - steps * global_batch == 52_367 < global_batch
    tails = []
    for epoch, resume_at in ((0, None), (1, 7)):
        plan = epoch_plan(imagenet, epoch, resume_at)
        assert {len(rank) for rank in plan} == {steps}, "ranks with different batch counts hang DDP"
        assert {len(batch) for rank in plan for batch in rank} == {PER_DEVICE}
        counts = np.bincount(np.concatenate([b for rank in plan for b in rank]), minlength=IMAGENET_TRAIN)
        assert counts.max() == 1, "a sample read twice in one epoch"
        assert counts.sum() == steps * global_batch
        tails.append(np.flatnonzero(counts == 0))
        # a rank's share of an epoch is a few hundred samples drawn from hundreds of shards
        assert len(np.unique(imagenet.shard_of(np.concatenate(plan[0])))) > 300
    assert len(np.intersect1d(tails[0], tails[1])) < len(tails[0]) // 10, "the tail did not change between epochs"


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
