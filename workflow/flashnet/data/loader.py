"""Train and val loaders from the shards to uint8 batches.

Train: one stream of seeded passes over all samples, planned by :mod:`.epochs` (every sample once
per pass; equal batches on every rank; every batch a pure function of (seed, global step, world,
rank), whatever the number of loader workers). Batch ``b`` of those still to
come is made by worker ``(b - start_batch) mod W``, the order DataLoader collects them in; a
resume at batch ``k`` starts there, reading nothing before it. A sample is one ``pread`` of its
byte range (from the manifest step's ``sample-ranges.npy``), parsed by the tar reader of
:mod:`.tarfiles`, which reads only ``jpg`` and ``cls`` (nothing from a shard is unpickled).
Within a batch the samples are read in (shard, offset) order and put back in batch order; each
worker keeps its most recently used shards open. Each sample is augmented with a generator seeded
by (seed, pass, sample).

Val: shards are dealt round-robin to ranks, then to workers, so every sample is read exactly once
across all ranks; ranks with fewer batches get batches of masked padding, because evaluation
through DDP runs collectives per batch and every rank must take part in each.

Images are decoded on CPU workers (libjpeg-turbo through simplejpeg; at 1/2, 1/4 or 1/8 scale when
the crop still covers twice the output size there), cropped and resized with antialiased bilinear
interpolation on uint8, and flipped. With ``decode_device: cuda`` the workers only pick the crops
and the JPEGs are decoded by nvJPEG on the device. Every path yields a :class:`.batch.Batch`
(labels, validity mask, uint8 NHWC images or JPEGs); normalisation happens on the device. A JPEG
that fails to decode raises :class:`SampleError`, naming its shard and key. The image operations
live in :mod:`.transforms`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import signal
import threading
from typing import Iterable, Iterator

import numpy as np
import simplejpeg
import torch
import webdataset as wds
from torch.utils.data import ChainDataset, DataLoader, IterableDataset, get_worker_info

from .batch import Batch, JpegCrops
from .epochs import TrainSamples, batch_stream, worker_batches
from .tarfiles import ShardError, shard_samples, tar_samples
from .transforms import Augmentation, center_crop_box, decode_crop


class SampleError(ValueError):
    """A sample that cannot be turned into a training or validation input; names shard and key."""


def _tar_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: ``{"url": shard path}`` → its samples, each told where it came from."""
    for source in sources:
        for sample in shard_samples(source["url"]):
            sample["__url__"] = source["url"]
            yield sample


def _prepared(sample: dict, prepare):
    """``prepare(jpeg, label)`` of a sample; a JPEG that does not decode names its shard and key."""
    try:
        return prepare(sample["jpg"], int(sample["cls"]))
    except (ValueError, KeyError) as error:
        raise SampleError(f"{sample['__url__']}: sample {sample['__key__']}: {error}") from error


# --------------------------------------------------------------------------- train


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


# --------------------------------------------------------------------------- train reading


class ShardReader:
    """Reads samples by byte range, keeping the most recently used shards open."""

    def __init__(self, samples: TrainSamples, open_files: int = 64):
        self.samples, self.open_files = samples, open_files
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()

    def _fd(self, shard: int) -> int:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= self.open_files:
            os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd = os.open(self.samples.shards[shard], os.O_RDONLY)
        return fd

    def read(self, numbers: np.ndarray) -> list[dict]:
        """The samples ``numbers`` (``{"__key__", "__url__", "jpg", "cls", "__sample__"}``), read
        in shard and offset order, returned in the order asked."""
        shards = self.samples.shard_of(numbers)
        ranges = self.samples.ranges[numbers]
        out: list[dict] = [{}] * len(numbers)
        for i in np.lexsort((ranges[:, 0], shards)):
            out[i] = self._read_one(int(numbers[i]), int(shards[i]), int(ranges[i, 0]), int(ranges[i, 1]))
        return out

    def _read_one(self, number: int, shard: int, start: int, end: int) -> dict:
        path = self.samples.shards[shard]
        data = os.pread(self._fd(shard), end - start, start)
        if len(data) != end - start:
            raise ShardError(f"{path}: cut short at byte {start + len(data)} (the sample ranges say {end})")
        samples = list(tar_samples(io.BytesIO(data), path))
        if len(samples) != 1 or not {"jpg", "cls"} <= samples[0].keys():
            raise ShardError(f"{path}: bytes {start}..{end} are not one sample with jpg and cls "
                             "(shards changed since their manifest step?)")
        return {**samples[0], "__url__": path, "__sample__": number}

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])


def _augment(spec: TrainStreamSpec, sample: dict, stream_pass: int):
    """One sample's crop and flip, from a generator seeded by (seed, pass, sample) (data/epochs.py)."""
    rng = np.random.default_rng([spec.seed, stream_pass, sample["__sample__"]])

    def prepare(jpeg: bytes, label: int):
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        if spec.center_crop_resize is None:
            box, flip = spec.augmentation.draw(width, height, rng)
        else:  # the val transform (no_augment_from_epoch)
            box, flip = center_crop_box(width, height, spec.center_crop_resize, spec.image_size), False
        if spec.decode_on_device:
            return jpeg, box, flip, label
        return decode_crop(jpeg, box, spec.image_size, flip), label

    return _prepared(sample, prepare)


def collate_decoded(items: list[tuple[torch.Tensor, int]], valid: bool = True) -> Batch:
    """``(image, label)`` pairs → a batch of decoded images, all valid or all padding."""
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return Batch(labels, torch.full((len(items),), valid), images=torch.stack([image for image, _ in items]))


def collate_encoded(items: list[tuple[bytes, tuple[int, int, int, int], bool, int]], valid: bool = True) -> Batch:
    """``(jpeg, box, flip, label)`` → a batch of JPEGs for nvJPEG, all valid or all padding."""
    jpegs = JpegCrops(
        jpegs=tuple(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg, _, _, _ in items),
        boxes=torch.tensor([box for _, box, _, _ in items], dtype=torch.long),
        flips=torch.tensor([flip for _, _, flip, _ in items], dtype=torch.bool),
    )
    labels = torch.tensor([label for _, _, _, label in items], dtype=torch.long)
    return Batch(labels, torch.full((len(items),), valid), jpegs=jpegs)


def make_batches(spec: TrainStreamSpec, batches: Iterable[int]) -> Iterator[Batch]:
    """This rank's batches ``batches``, read and augmented."""
    collate = collate_encoded if spec.decode_on_device else collate_decoded
    reader = ShardReader(spec.samples)
    try:
        for batch in batches:
            passes, numbers = batch_stream(spec, batch)
            yield collate([_augment(spec, sample, int(p)) for sample, p in zip(reader.read(numbers), passes)])
    finally:
        reader.close()


class TrainBatches(IterableDataset):
    """The batches of one rank for one epoch (from ``start_batch`` on, when resuming), made by
    DataLoader workers in turn; iterated outside a worker, it makes them all in order itself."""

    def __init__(self, spec: TrainStreamSpec):
        self.spec = spec

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts the batches already done itself.
        return self.spec.steps

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        yield from make_batches(self.spec, worker_batches(self.spec, worker, workers))


def ignore_sigterm(worker_id: int) -> None:
    """Loader workers outlive a SIGTERM from anyone but their parent. SLURM sends one to every
    process of a job it requeues or preempts, then SIGKILL: dying on it would fail the training
    process with a misleading "worker killed" error while its own checkpoint-and-requeue path is
    under way. The parent's own SIGTERM must still end them: when the training process exits on
    an error raised through its loader (a corrupt JPEG), multiprocessing terminates and then joins
    the workers the error's traceback still holds, and a worker ignoring that would hang the job.
    A thread of the worker takes the signal and looks at its sender."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here inherit it

    def sort_sigterms():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(1)

    threading.Thread(target=sort_sigterms, name="sigterm-from-parent", daemon=True).start()


def train_loader(spec: TrainStreamSpec, workers: int, pin_memory: bool = False) -> DataLoader:
    """``workers`` loader processes (0: in this process); the batches are the same for any number."""
    return _batch_loader(TrainBatches(spec), workers, pin_memory)


def train_loader_over_epochs(specs: Iterable[TrainStreamSpec], workers: int, pin_memory: bool = False) -> DataLoader:
    """Several epochs' batches one after the other through the same workers (for benchmarks that
    time more batches than one epoch of their data holds)."""
    return _batch_loader(ChainDataset([TrainBatches(spec) for spec in specs]), workers, pin_memory)


def _batch_loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
        worker_init_fn=ignore_sigterm,
    )


# --------------------------------------------------------------------------- val


@dataclasses.dataclass(frozen=True)
class ValSpec:
    shards: tuple[str, ...]
    shard_samples: tuple[int, ...]  # from the manifest: sizes the padding is computed from
    rank: int
    world_size: int
    batch_size: int
    image_size: int
    resize: int
    workers: int
    decode_on_device: bool = False


def val_assignment(shard_samples: tuple[int, ...], world_size: int, workers: int, batch_size: int):
    """Deal shards to ranks then workers; return ``shards[rank][worker]`` (shard indices) and the
    padding batches each rank's worker 0 adds so all ranks run the same number of batches."""
    workers = max(workers, 1)
    shards = [[list(range(len(shard_samples)))[rank::world_size][w::workers] for w in range(workers)]
              for rank in range(world_size)]
    batches = [sum(math.ceil(sum(shard_samples[i] for i in worker) / batch_size) for worker in rank)
               for rank in shards]
    padding = [max(batches) - b for b in batches]
    return shards, padding


def _val_sample(spec: ValSpec, sample: dict):
    def prepare(jpeg: bytes, label: int):
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        box = center_crop_box(width, height, spec.resize, spec.image_size)
        if spec.decode_on_device:
            return jpeg, box, False, label
        return decode_crop(jpeg, box, spec.image_size), label

    return _prepared(sample, prepare)


def _padding_batch(spec: ValSpec) -> Batch:
    """One black sample, masked out."""
    if spec.decode_on_device:
        # A small black JPEG: the device decoder needs real JPEG bytes even for padding.
        jpeg = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
        return collate_encoded([(jpeg, (0, 0, 8, 8), False, 0)], valid=False)
    return collate_decoded([(torch.zeros((spec.image_size, spec.image_size, 3), dtype=torch.uint8), 0)], valid=False)


class ValBatches(IterableDataset):
    """One rank's share of the val shards, each sample once; then its padding batches."""

    def __init__(self, spec: ValSpec):
        self.spec = spec
        self.assignment, self.padding = val_assignment(spec.shard_samples, spec.world_size, spec.workers,
                                                       spec.batch_size)

    def _batches(self, shard_ids: list[int]) -> Iterator[Batch]:
        """One worker's shards, batched (the last batch of each worker may be short)."""
        if not shard_ids:
            return iter(())
        collate = collate_encoded if self.spec.decode_on_device else collate_decoded
        return iter(wds.DataPipeline(
            wds.SimpleShardList([self.spec.shards[i] for i in shard_ids]),
            _tar_samples,
            wds.map(lambda sample: _val_sample(self.spec, sample)),
            wds.batched(self.spec.batch_size, collation_fn=collate, partial=True),
        ))

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.num_workers != max(self.spec.workers, 1):
            raise RuntimeError(f"val shards dealt to {self.spec.workers} workers run in {info.num_workers}")
        worker = info.id if info else 0
        owned = self.assignment[self.spec.rank]
        # Outside a worker (num_workers=0, or iterated directly) each planned worker's shards are
        # still batched on their own, so the batch count is the one the padding was planned for.
        shard_lists = [owned[worker]] if info else owned
        for shard_ids in shard_lists:
            yield from self._batches(shard_ids)
        if worker == 0:
            for _ in range(self.padding[self.spec.rank]):
                yield _padding_batch(self.spec)


def val_loader(spec: ValSpec, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        ValBatches(spec),
        batch_size=None,
        num_workers=spec.workers,
        pin_memory=pin_memory,
        multiprocessing_context="fork" if spec.workers else None,
        worker_init_fn=ignore_sigterm,
    )
