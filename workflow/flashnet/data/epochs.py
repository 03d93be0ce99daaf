"""Real epochs: which train samples each rank's batches hold, from the manifest alone.

Epoch ``e`` is a permutation of all N train samples (numbered in shard order), seeded by (seed,
e, N) and the same on every rank. Global step ``t`` of the epoch trains on the permutation's
``t``-th run of B = world × b samples, and rank ``r`` takes the ``r``-th b of them. An epoch is
``steps`` = floor(N / B) steps (``steps_per_epoch`` in train/recipe.py, the one definition), so
each sample is in exactly one batch of each epoch except the permutation's tail of N mod B < B
samples, which changes from epoch to epoch. Every rank has ``steps`` batches of b, whatever the
number of shards: at the seed's scale (1,281,167 images in 1,282 shards of 1,000, 2,048 ranks × 40,
B = 81,920) an epoch is 15 steps, a rank reads 600 samples from ~480 shards, and 52,367 samples
sit the epoch out. A global batch does not depend on how it is split over ranks, and no batch
depends on the number of loader workers.

A sample is read by its byte range in its shard, which the manifest step records for every sample
(``sample-ranges.npy`` beside the manifest, 16 bytes a sample, 20 MB for ImageNet, memory-mapped:
a rank touches only the pages of its own samples). Chosen over the alternatives: walking a shard's
tar headers to find one sample costs ~1,000 reads for one, and every rank would walk nearly every
shard each epoch (loader workers do not outlive an epoch); an index file per shard would be a
second file per shard to write, check and open.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .manifest import load_sample_ranges
from .tarfiles import sample_byte_ranges

if TYPE_CHECKING:
    from .loader import TrainStreamSpec


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: compared by identity (it holds an array)
class TrainSamples:
    """The train split as the loader addresses it: shard paths, and each sample's (shard, byte
    range), samples numbered in shard order."""

    shards: tuple[str, ...]
    shard_samples: tuple[int, ...]
    ranges: np.ndarray  # (samples, 2) int64 [start, end) in the sample's shard

    def __post_init__(self):
        if len(self.ranges) != sum(self.shard_samples):
            raise ValueError(f"{len(self.ranges)} byte ranges for {sum(self.shard_samples)} samples")

    def __len__(self) -> int:
        return len(self.ranges)

    @functools.cached_property
    def first_sample(self) -> np.ndarray:
        """Number of each shard's first sample."""
        return np.concatenate([[0], np.cumsum(self.shard_samples)[:-1]]).astype(np.int64)

    def shard_of(self, samples: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first_sample, samples, side="right") - 1

    @classmethod
    def from_manifest(cls, manifest_path: str | Path, manifest: dict) -> "TrainSamples":
        """From a verified manifest (its shards and the byte ranges its manifest step recorded)."""
        return cls(shard_paths(manifest_path, manifest), tuple(s["samples"] for s in manifest["shards"]),
                   load_sample_ranges(manifest_path, manifest))

    @classmethod
    def scan(cls, shards: Iterable[str]) -> "TrainSamples":
        """By walking the shards' tar headers: for shards without a manifest (tests, benchmarks)."""
        shards = tuple(shards)
        ranges = [sample_byte_ranges(path) for path in shards]
        table = np.array([r for shard in ranges for r in shard], dtype=np.int64).reshape(-1, 2)
        return cls(shards, tuple(map(len, ranges)), table)


@functools.lru_cache(maxsize=2)
def epoch_order(samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of sample numbers, the same on every rank (~20 ms for ImageNet)."""
    order = np.random.default_rng([seed, epoch, samples]).permutation(samples)
    order.flags.writeable = False
    return order


def batch_samples(spec: "TrainStreamSpec", batch: int) -> np.ndarray:
    """Sample numbers of this rank's batch ``batch``: the rank's slice of the epoch's global batch."""
    global_batch = spec.world_size * spec.batch_size
    start = batch * global_batch + spec.rank * spec.batch_size
    return epoch_order(len(spec.samples), spec.seed, spec.epoch)[start:start + spec.batch_size]


def worker_batches(spec: "TrainStreamSpec", worker: int, workers: int) -> range:
    """The batch indices loader worker ``worker`` of ``workers`` makes (DataLoader collects one
    batch from each worker in turn, from worker 0)."""
    return range(spec.start_batch + worker, spec.steps, workers)


def shard_paths(manifest_path: str | Path, manifest: dict) -> tuple[str, ...]:
    """Absolute shard paths from a verified manifest (plain file names in its folder)."""
    folder = Path(manifest_path).resolve().parent
    return tuple(str(folder / shard["name"]) for shard in manifest["shards"])
