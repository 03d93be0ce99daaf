"""Train and val loaders from the shards to uint8 batches.

Train: one stream of seeded passes over all samples, planned by :mod:`.epochs` (every sample once
per pass; equal batches on every rank; every batch a pure function of (seed, global step, world,
rank), whatever the number of loader workers). A sample is one ``pread`` of its byte range (from
the manifest step's ``sample-ranges.npy``), parsed by the tar reader of :mod:`.tarfiles`, which
reads only ``jpg`` and ``cls`` (nothing from a shard is unpickled).
Within a batch the samples are read in (shard, offset) order and put back in batch order; each
worker keeps its most recently used shards open. Each sample is augmented with a generator seeded
by (seed, pass, sample).

Training reads through one loader for the whole run (:class:`TrainRunSpec`, :class:`TrainEpochs`):
the batches of global steps ``start_step`` (the restored step; nothing before it is read) to the
run's end are one stream, batch ``i`` of it made by worker ``i mod W``, the order DataLoader collects
them in, so the workers fork once per job, keep their shards open across epochs and make the next
epoch's first batches while this one trains. A worker derives each batch's epoch, its place in the
epoch and whether it is augmented from its global step, and makes it with that epoch's
:class:`.epochs.TrainStreamSpec`: the batches are those of a loader of that epoch alone
(:func:`train_loader`, for benchmarks and tests). Measured on the tiny sample data (160 images,
10 steps an epoch, 2 workers, a 55 ms step emulated by sleeping; a 2-core AMD EPYC VM shared with
other jobs, load 10–18; 2026-12-05): through Lightning's fit loop, an epoch's first step began a
median 570–580 ms after ``on_train_epoch_start`` with a loader per epoch, 6–39 ms with one loader
for the run (6 epochs: fit 17.0–18.6 s before, 8.4–10.6 s after); the loaders alone, 100–270 ms
and 2–4 ms from an epoch's start to its first batch.

Val: each rank reads a contiguous run of N // world samples or one more (numbered in shard order,
read by byte range as train samples are), whatever the shards, in batches dealt to its workers in
turn; a rank with one batch fewer than the largest share runs one batch of masked padding, because
evaluation through DDP runs collectives per batch and every rank must take part in each. Every
sample is read exactly once across all ranks. ImageNet's 50,000 val images in 196 shards of 256
on 2,048 ranks × 8 workers at 40 a device (``val_batches``, simulated over the index alone): every
rank reads 24 or 25 samples in one batch, no rank pads; dealt by shard, as before, 196 ranks read
256 samples each in 7 batches and 1,852 ranks ran 7 batches of padding (10.5× the balanced share).
The val loader's workers persist across the validations of a fit.

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
from typing import Callable, Iterable, Iterator

import numpy as np
import simplejpeg
import torch
from torch.utils.data import ChainDataset, DataLoader, IterableDataset, get_worker_info

from .batch import Batch, JpegCrops
from .epochs import TrainSamples, TrainStreamSpec, batch_stream, worker_batches
from .tarfiles import ShardError, tar_samples
from .transforms import center_crop_box, decode_crop


class SampleError(ValueError):
    """A sample that cannot be turned into a training or validation input; names shard and key."""


def _prepared(sample: dict, prepare):
    """``prepare(jpeg, label)`` of a sample; a JPEG that does not decode names its shard and key."""
    try:
        return prepare(sample["jpg"], int(sample["cls"]))
    except (ValueError, KeyError) as error:
        raise SampleError(f"{sample['__url__']}: sample {sample['__key__']}: {error}") from error


# --------------------------------------------------------------------------- train


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


def make_batches(planned: Iterable[tuple[TrainStreamSpec, int]]) -> Iterator[Batch]:
    """The batches ``(spec, batch)``, read and augmented, through one :class:`ShardReader`: a worker
    that makes batches of several epochs keeps its shards open across their boundaries."""
    reader: ShardReader | None = None
    try:
        for spec, batch in planned:
            reader = reader or ShardReader(spec.samples)
            collate = collate_encoded if spec.decode_on_device else collate_decoded
            passes, numbers = batch_stream(spec, batch)
            yield collate([_augment(spec, sample, int(p)) for sample, p in zip(reader.read(numbers), passes)])
    finally:
        if reader is not None:
            reader.close()


def _worker() -> tuple[int, int]:
    """(this loader worker, workers); outside a DataLoader worker, a single stream (0, 1)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainBatches(IterableDataset):
    """The batches of one rank for one epoch (from ``start_batch`` on, when resuming), made by
    DataLoader workers in turn; iterated outside a worker, it makes them all in order itself."""

    def __init__(self, spec: TrainStreamSpec):
        self.spec = spec

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts the batches already done itself.
        return self.spec.steps

    def __iter__(self):
        worker, workers = _worker()
        yield from make_batches((self.spec, batch) for batch in worker_batches(self.spec, worker, workers))


def epoch_position(global_step: int, epoch: int, steps_per_epoch: int, total_steps: int) -> tuple[int, int]:
    """(batches in ``epoch``, batches of it trained by ``global_step``). Every epoch but a fractional
    last one has ``steps_per_epoch`` batches."""
    start_of_epoch = epoch * steps_per_epoch
    steps = max(0, min(steps_per_epoch, total_steps - start_of_epoch))
    done = min(max(global_step - start_of_epoch, 0), steps)
    return steps, done


@dataclasses.dataclass(frozen=True)
class TrainRunSpec:
    """Everything that determines one rank's train batches for the rest of a run: global steps
    ``start_step`` to ``total_steps``, epoch after epoch. Each batch is made by the
    :class:`TrainStreamSpec` of its epoch (:meth:`epoch_spec`), so it is the batch a loader of that
    epoch alone would make."""

    epoch: TrainStreamSpec  # a whole epoch of this rank: its steps are the steps of every whole epoch;
    # its epoch, start_batch and center_crop_resize are set per epoch by epoch_spec
    total_steps: int  # the run's steps: a fractional last epoch ends at total_steps
    start_step: int = 0  # resume: global steps already trained
    augmenting_epochs: int | None = None  # epochs before this (0-based) one augment, later ones take the val
    # transform at val_resize (no_augment_from_epoch); None: every epoch augments
    val_resize: int | None = None

    def __post_init__(self):
        if self.augmenting_epochs is not None and self.val_resize is None:
            raise ValueError("epochs without augmentation need the val transform's resize (val_resize)")
        if not 0 <= self.start_step <= self.total_steps:
            raise ValueError(f"start step {self.start_step} is outside the run's {self.total_steps} steps")

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch.steps

    def augments(self, epoch: int) -> bool:
        return self.augmenting_epochs is None or epoch < self.augmenting_epochs

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def epoch_stop(self, epoch: int) -> int:
        """The global step at which ``epoch`` ends (exclusive)."""
        return min((epoch + 1) * self.steps_per_epoch, self.total_steps)

    def epoch_spec(self, epoch: int) -> TrainStreamSpec:
        """Epoch ``epoch`` of this rank, from the batch the run resumes at when it is the first."""
        steps, done = epoch_position(self.start_step, epoch, self.steps_per_epoch, self.total_steps)
        return dataclasses.replace(self.epoch, epoch=epoch, steps=steps, start_batch=done,
                                   epoch_steps=self.steps_per_epoch,
                                   center_crop_resize=None if self.augments(epoch) else self.val_resize)


def run_worker_batches(run: TrainRunSpec, worker: int, workers: int) -> Iterator[tuple[TrainStreamSpec, int]]:
    """The (epoch spec, batch) pairs loader worker ``worker`` of ``workers`` makes, in order. The
    run's remaining batches are one stream, and DataLoader collects one from each worker in turn
    across epoch boundaries: batch ``i`` of the stream (global step ``start_step + i``) is
    worker ``i mod W``'s. Within an epoch that is :func:`.epochs.worker_batches` of the worker
    whose turn the epoch's first batch falls on."""
    if run.start_step >= run.total_steps:
        return
    for epoch in range(run.epoch_of(run.start_step), run.epoch_of(run.total_steps - 1) + 1):
        spec = run.epoch_spec(epoch)
        turn = (epoch * run.steps_per_epoch + spec.start_batch - run.start_step) % workers
        for batch in worker_batches(spec, (worker - turn) % workers, workers):
            yield spec, batch


class TrainRunBatches(IterableDataset):
    """One rank's batches for the rest of the run, made by DataLoader workers in turn across
    epochs (workers, open shards and prefetched batches carry over epoch boundaries); iterated
    outside a worker, it makes them all in order itself."""

    def __init__(self, run: TrainRunSpec):
        self.run = run

    def __iter__(self):
        worker, workers = _worker()
        yield from make_batches(run_worker_batches(self.run, worker, workers))


class TrainEpochs:
    """Lightning's train loader for a whole run: each iteration is the rest of the current epoch,
    taken from one DataLoader iterator over :class:`TrainRunBatches`, so its workers fork once per
    job and make the next epoch's first batches while this one trains.

    Lightning (2.6.6, without ``reload_dataloaders_every_n_epochs``) asks for the train loader
    once per ``fit`` and calls ``iter()`` on it at the start of every epoch but a resumed one
    (``fit_loop.setup_data``, ``training_epoch_loop.on_run_start``). The epoch is Lightning's
    (``current_epoch``, read at ``iter()``): a resume from a checkpoint written after an epoch's
    last step restarts Lightning in that epoch with no batch left in it, and the next epoch's
    batches must wait for the next ``iter()``. Having no ``__len__``, an epoch ends where this
    iterator stops: Lightning then looks one batch ahead to find the end (``_PrefetchDataFetcher``)
    and validates after the last step, also after a fractional last epoch (given a length, it would
    read it once, at the first epoch, and validate only after batch ``steps_per_epoch`` of an
    epoch: never after a short last one). At the end of ``fit``,
    also on an error, Lightning shuts the workers down through ``_iterator`` as it does a
    DataLoader's (``combined_loader._shutdown_workers_and_reset_iterator``); :meth:`close` does the
    same for anyone else."""

    def __init__(self, run: TrainRunSpec, loader: DataLoader, current_epoch: Callable[[], int] | None = None):
        self.run, self.loader = run, loader
        # Without a trainer (benchmarks, tests): the epoch of the next batch.
        self.current_epoch = current_epoch or (lambda: run.epoch_of(self.step))
        self.step = run.start_step  # global step of the next batch handed out
        self._iterator = None

    def start(self) -> None:
        """Fork the workers and let them prefetch, if not yet done."""
        if self._iterator is None:
            if self.step != self.run.start_step:
                raise RuntimeError(f"train batches asked for at step {self.step} after their loader was shut down")
            self._iterator = iter(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        self.start()
        return self._take(self.run.epoch_stop(self.current_epoch()))

    def _take(self, stop: int) -> Iterator[Batch]:
        while self.step < stop:
            batch = next(self._iterator)
            self.step += 1
            yield batch

    def close(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


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


def train_run_loader(run: TrainRunSpec, workers: int, pin_memory: bool = False,
                     current_epoch: Callable[[], int] | None = None) -> TrainEpochs:
    """The run's train loader, epoch by epoch through one set of ``workers`` (0: in this process);
    the batches are the same for any number of workers, and those of per-epoch loaders."""
    return TrainEpochs(run, _batch_loader(TrainRunBatches(run), workers, pin_memory), current_epoch)


def _batch_loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # iterated once: a train loader is one epoch, or the whole run
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
        worker_init_fn=ignore_sigterm,
    )


# --------------------------------------------------------------------------- val


@dataclasses.dataclass(frozen=True)
class ValSpec:
    samples: TrainSamples  # the val split: shards and each sample's byte range (from its manifest)
    rank: int
    world_size: int
    batch_size: int
    image_size: int
    resize: int
    workers: int
    decode_on_device: bool = False


def val_share(samples: int, world_size: int, rank: int) -> range:
    """The val samples (numbered in shard order) of ``rank``: a contiguous run of N // world or one
    more, whatever the shards."""
    return range(rank * samples // world_size, (rank + 1) * samples // world_size)


def val_batches(samples: int, world_size: int, rank: int, batch_size: int) -> list[range]:
    """The val batches of ``rank``: its share in runs of ``batch_size`` (the last may be short),
    then empty ones (padding) up to the batch count of the largest share, so that every rank runs
    the same number (evaluation through DDP runs collectives per batch). Batch ``j`` is made by
    loader worker ``j mod W``, the order DataLoader collects them in."""
    share = val_share(samples, world_size, rank)
    most = math.ceil(math.ceil(samples / world_size) / batch_size)
    batches = [share[start:start + batch_size] for start in range(0, len(share), batch_size)]
    return batches + [range(0)] * (most - len(batches))


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
    """One rank's share of the val samples, each once, read by byte range; then its padding batch,
    if any. The batches do not depend on the number of workers."""

    def __init__(self, spec: ValSpec):
        self.spec = spec
        self.batches = val_batches(len(spec.samples), spec.world_size, spec.rank, spec.batch_size)

    def __iter__(self):
        worker, workers = _worker()
        collate = collate_encoded if self.spec.decode_on_device else collate_decoded
        reader = ShardReader(self.spec.samples)
        try:
            for numbers in self.batches[worker::workers]:
                if not numbers:
                    yield _padding_batch(self.spec)
                    continue
                samples = reader.read(np.arange(numbers.start, numbers.stop, dtype=np.int64))
                yield collate([_val_sample(self.spec, sample) for sample in samples])
        finally:
            reader.close()


def val_loader(spec: ValSpec, pin_memory: bool = False) -> DataLoader:
    """The rank's val batches through ``spec.workers`` processes that outlive each pass: Lightning
    iterates the one val loader it asks for again at every validation of a fit."""
    return DataLoader(
        ValBatches(spec),
        batch_size=None,
        num_workers=spec.workers,
        pin_memory=pin_memory,
        persistent_workers=spec.workers > 0,
        multiprocessing_context="fork" if spec.workers else None,
        worker_init_fn=ignore_sigterm,
    )
