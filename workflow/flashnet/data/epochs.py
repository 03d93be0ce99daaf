"""Which train samples each rank's batches hold, from the manifest alone (:class:`TrainStreamSpec`,
:func:`batch_stream`, :func:`worker_batches`).

The samples are one stream: a concatenation of passes, pass ``p`` a permutation of all N train
samples (numbered in shard order) seeded by (seed, p, N), the same on every rank. Global step
``t`` trains on the stream's samples [tB, (t + 1)B), B = world × b, and rank ``r`` takes the
``r``-th b of them; so every sample is read once per pass and none is dropped, and a step may
straddle two passes (its samples then come from the end of one permutation and the start of the
next). An epoch is ``steps_per_epoch`` steps of this stream (train/schedule.py, the one definition,
counted as the recipe's source counts them: floor(N / B), or NVIDIA's and Fujitsu's
ceil(floor(N / W) / b)); epoch ``e`` (0-based) is steps [e·S, (e + 1)·S). Each sample's crop and
flip are drawn from (seed, pass, sample): a pure function of where it is in the stream, whatever
epoch it falls in. At the seed's scale (1,281,167 images in 1,282 shards of 1,000, 2,048 ranks ×
40, B = 81,920, floor: 15 steps an epoch) an epoch is 0.96 of a pass and a rank reads 600
samples from ~480 shards. A global batch does not depend on how it is split over ranks, and no
batch depends on the number of loader workers. MLPerf's rules ask no more of the order: "arbitrary
sharding, batching, and packing are allowed provided that (1) the data is still overall randomly
ordered ... and (2) each datum still appears exactly once" (training_rules.adoc, per pass here).

A sample is read by its byte range in its shard, which the manifest step records for every sample
(``sample-ranges.npy`` beside the manifest, 16 bytes a sample, 20 MB for ImageNet, memory-mapped:
a rank touches only the pages of its own samples). Chosen over the alternatives: walking a shard's
tar headers to find one sample costs ~1,000 reads for one, and every rank would walk nearly every
shard each epoch; an index file per shard would be a second file per shard to write, check and
open.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterable

import numpy as np

from .manifest import load_sample_ranges
from .tarfiles import sample_byte_ranges
from .transforms import Augmentation


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


@dataclasses.dataclass(frozen=True)
class TrainStreamSpec:
    """Everything that determines the train batches of one rank in one epoch."""

    samples: TrainSamples
    seed: int
    epoch: int
    rank: int
    world_size: int
    steps: int  # batches in this epoch, on every rank: steps_per_epoch, or fewer in a fractional last epoch
    batch_size: int  # per device
    image_size: int
    augmentation: Augmentation  # not drawn from where center_crop_resize is set
    start_batch: int = 0  # resume: batches of this epoch already trained
    decode_on_device: bool = False
    center_crop_resize: int | None = None  # set: the val transform (resize, centre crop, no flip) instead
    epoch_steps: int = 0  # steps of a whole epoch (0: steps); epoch e starts at global step e × epoch_steps

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")


@functools.lru_cache(maxsize=2)
def epoch_order(samples: int, seed: int, epoch: int) -> np.ndarray:
    """Pass ``epoch``'s permutation of sample numbers, the same on every rank (~20 ms for ImageNet).
    (A pass is what the stream's ``epoch``-th run of N samples is; named for the days the two were one.)"""
    order = np.random.default_rng([seed, epoch, samples]).permutation(samples)
    order.flags.writeable = False
    return order


def global_step(spec: TrainStreamSpec, batch: int) -> int:
    """The global step of the epoch's batch ``batch``: epochs are ``epoch_steps`` steps long
    (``steps`` may be fewer, in a fractional last epoch)."""
    return spec.epoch * (spec.epoch_steps or spec.steps) + batch


def stream_slice(samples: int, seed: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(passes, sample numbers) of the stream's positions [start, start + count)."""
    positions = np.arange(start, start + count, dtype=np.int64)
    passes, offsets = np.divmod(positions, samples)
    numbers = np.empty(count, dtype=np.int64)
    for p in np.unique(passes):
        mine = passes == p
        numbers[mine] = epoch_order(samples, seed, int(p))[offsets[mine]]
    return passes, numbers


def batch_stream(spec: TrainStreamSpec, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(passes, sample numbers) of this rank's batch ``batch`` of the epoch: the rank's slice of the
    step's global batch."""
    global_batch = spec.world_size * spec.batch_size
    start = global_step(spec, batch) * global_batch + spec.rank * spec.batch_size
    return stream_slice(len(spec.samples), spec.seed, start, spec.batch_size)


def batch_samples(spec: TrainStreamSpec, batch: int) -> np.ndarray:
    """Sample numbers of this rank's batch ``batch`` of the epoch."""
    return batch_stream(spec, batch)[1]


def worker_batches(spec: TrainStreamSpec, worker: int, workers: int) -> range:
    """The batch indices loader worker ``worker`` of ``workers`` makes (DataLoader collects one
    batch from each worker in turn, from worker 0)."""
    return range(spec.start_batch + worker, spec.steps, workers)


def shard_paths(manifest_path: str | Path, manifest: dict) -> tuple[str, ...]:
    """Absolute shard paths from a verified manifest (plain file names in its folder)."""
    folder = Path(manifest_path).resolve().parent
    return tuple(str(folder / shard["name"]) for shard in manifest["shards"])
