"""WebDataset pipelines from the shards to uint8 batches.

Train: every batch is a pure function of (seed, epoch, rank, batch index), so a resumed run sees
exactly the batches an uninterrupted one would, and every rank yields exactly ``steps_per_epoch``
batches (DDP hangs otherwise). Batch ``b`` comes from stream ``b mod W`` (W loader workers): a
stream is an endless seeded draw of shards with replacement (resampling), read through a seeded
shuffle buffer. A resume at batch ``k`` skips the consumed samples of each stream without decoding
them. Each sample is augmented with a generator seeded by its position in its stream.

Val: shards are dealt round-robin to ranks, then to workers, so every sample is read exactly once
across all ranks; ranks with fewer batches get batches of masked padding, because evaluation
through DDP runs collectives per batch and every rank must take part in each.

Images are decoded on CPU workers (libjpeg-turbo through simplejpeg; at 1/2, 1/4 or 1/8 scale when
the crop still covers twice the output size there), cropped and resized with antialiased bilinear
interpolation on uint8, and flipped; batches are uint8 NHWC. Normalisation happens on the device.
With ``decode_device: cuda`` the workers only pick the crops and the JPEGs are decoded by nvJPEG.

The shards are read by the tar reader of :mod:`.tarfiles` (a stage in the WebDataset pipelines)
instead of ``wds.tarfile_to_samples``, at a fifth of its CPU time; only the ``jpg`` and ``cls``
fields are read, so nothing from a shard is ever unpickled. The image operations live in
:mod:`.transforms`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import signal
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .tarfiles import shard_samples
from .transforms import center_crop_box, decode_crop, random_resized_crop_box


# --------------------------------------------------------------------------- shard reading


def _tar_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: ``{"url": shard path}`` → its samples (what ``wds.tarfile_to_samples`` does
    for local files, at a fifth of the CPU time)."""
    for source in sources:
        yield from shard_samples(source["url"])


# --------------------------------------------------------------------------- train


@dataclasses.dataclass(frozen=True)
class TrainStreamSpec:
    """Everything that determines the train batches of one rank in one epoch."""

    shards: tuple[str, ...]
    seed: int
    epoch: int
    rank: int
    steps: int  # batches per epoch (every rank)
    batch_size: int  # per device
    image_size: int
    crop_scale: tuple[float, float]
    shuffle_buffer: int
    workers: int  # streams (max(loader workers, 1)): batch b comes from stream b % workers
    start_batch: int = 0  # resume: batches of this epoch already trained
    decode_on_device: bool = False
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    center_crop_resize: int | None = None  # set: the val transform (resize, centre crop, no flip) instead


def _resampled_shards(shards: tuple[str, ...], rng: random.Random) -> Iterator[dict]:
    while True:
        yield {"url": shards[rng.randrange(len(shards))]}


def _numbered(samples):
    for i, sample in enumerate(samples):
        sample["__index__"] = i
        yield sample


def _stream_samples(spec: TrainStreamSpec, stream: int) -> Iterator[dict]:
    """The endless, seeded sample sequence of one stream, before decoding."""
    rng = random.Random(f"{spec.seed}/{spec.epoch}/{spec.rank}/{stream}")
    pipeline = wds.DataPipeline(
        lambda: _resampled_shards(spec.shards, rng),
        _tar_samples,
        wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng),
        _numbered,
    )
    return iter(pipeline)


def _augment(spec: TrainStreamSpec, stream: int, sample: dict):
    """One sample's crop and flip, drawn from a generator seeded by its place in its stream."""
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, stream, sample["__index__"]])
    jpeg = sample["jpg"]
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    if spec.center_crop_resize is None:
        box = random_resized_crop_box(width, height, spec.crop_scale, rng, spec.crop_ratio)
        flip = bool(rng.random() < 0.5)
    else:
        box, flip = center_crop_box(width, height, spec.center_crop_resize, spec.image_size), False
    label = int(sample["cls"])
    if spec.decode_on_device:
        return jpeg, box, flip, label
    return decode_crop(jpeg, box, spec.image_size, flip), label


def collate_decoded(items) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return images, labels


def collate_encoded(items) -> dict:
    """Undecoded batch for nvJPEG: the JPEG bytes, crop boxes, flips and labels."""
    return {
        "jpegs": [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg, _, _, _ in items],
        "boxes": torch.tensor([box for _, box, _, _ in items], dtype=torch.long),
        "flips": torch.tensor([flip for _, _, flip, _ in items], dtype=torch.bool),
        "labels": torch.tensor([label for _, _, _, label in items], dtype=torch.long),
    }


def stream_batches(spec: TrainStreamSpec, stream: int) -> Iterator:
    """The batches of ``stream`` from ``spec.start_batch`` to the end of the epoch."""
    owned = len(range(stream, spec.steps, spec.workers))
    consumed = len(range(stream, spec.start_batch, spec.workers))
    samples = _stream_samples(spec, stream)
    for _ in range(consumed * spec.batch_size):  # skipped without decoding
        next(samples)
    collate = collate_encoded if spec.decode_on_device else collate_decoded
    for _ in range(owned - consumed):
        yield collate([_augment(spec, stream, next(samples)) for _ in range(spec.batch_size)])


def _round_robin(iterators: list[Iterator]) -> Iterator:
    """One item from each iterator in turn, dropping those that end (DataLoader's worker order)."""
    while iterators:
        active = []
        for iterator in iterators:
            for item in itertools.islice(iterator, 1):
                yield item
                active.append(iterator)
        iterators = active


class TrainBatches(IterableDataset):
    """The batches of one rank for one epoch (from ``start_batch`` on, when resuming).

    DataLoader hands out batches round-robin from worker 0; batch ``start_batch + i`` must come
    from stream ``(start_batch + i) mod W``, so worker ``w`` serves stream ``(start_batch + w) mod W``.
    Iterated outside a DataLoader worker, it interleaves all W streams the same way itself, so the
    batches do not depend on where they are made.
    """

    def __init__(self, spec: TrainStreamSpec):
        self.spec = spec

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts the batches already done itself.
        return self.spec.steps

    def __iter__(self):
        info = get_worker_info()
        if info is None:  # num_workers=0 (one stream), or iterated directly
            streams = [(self.spec.start_batch + w) % self.spec.workers for w in range(self.spec.workers)]
            yield from _round_robin([stream_batches(self.spec, stream) for stream in streams])
            return
        if info.num_workers != self.spec.workers:
            raise RuntimeError(f"train batches planned for {self.spec.workers} streams run in {info.num_workers} workers")
        yield from stream_batches(self.spec, (self.spec.start_batch + info.id) % info.num_workers)


def ignore_sigterm(worker_id: int) -> None:
    """Loader workers outlive a SIGTERM (SLURM sends one to every process of a job it requeues or
    preempts, then SIGKILL): dying on it would fail the training process with a misleading
    "worker killed" error while its own checkpoint-and-requeue path is under way. Workers still
    exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(spec: TrainStreamSpec, workers: int, pin_memory: bool = False) -> DataLoader:
    """``workers`` loader processes; the batches are the same with 0 or 1 (one stream either way)."""
    if spec.workers != max(workers, 1):
        raise ValueError(f"spec plans {spec.workers} streams for {workers} workers")
    return DataLoader(
        TrainBatches(spec),
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
    jpeg = sample["jpg"]
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    box = center_crop_box(width, height, spec.resize, spec.image_size)
    label = int(sample["cls"])
    if spec.decode_on_device:
        return jpeg, box, False, label
    return decode_crop(jpeg, box, spec.image_size), label


def _with_valid(batch, valid: bool):
    if isinstance(batch, dict):
        batch["valid"] = torch.full((len(batch["labels"]),), valid)
        return batch
    images, labels = batch
    return images, labels, torch.full((len(labels),), valid)


def _padding_batch(spec: ValSpec):
    if spec.decode_on_device:
        # A small black JPEG: the device decoder needs real JPEG bytes even for padding.
        jpeg = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
        return _with_valid(collate_encoded([(jpeg, (0, 0, 8, 8), False, 0)]), False)
    images = torch.zeros((1, spec.image_size, spec.image_size, 3), dtype=torch.uint8)
    return images, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool)


class ValBatches(IterableDataset):
    """One rank's share of the val shards, each sample once; then its padding batches."""

    def __init__(self, spec: ValSpec):
        self.spec = spec
        self.assignment, self.padding = val_assignment(spec.shard_samples, spec.world_size, spec.workers,
                                                       spec.batch_size)

    def _batches(self, shard_ids: list[int]) -> Iterator:
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
            for batch in self._batches(shard_ids):
                yield _with_valid(batch, True)
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


# --------------------------------------------------------------------------- device decoding


def decode_on_device(batch: dict, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """nvJPEG-decode a batch from :func:`collate_encoded` on ``device``, crop, resize and flip
    there: uint8 NHWC, like the CPU path."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # RGB mode: a greyscale JPEG would otherwise come back with one channel.
    images = decode_jpeg(batch["jpegs"], mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=device)
    for i, (image, (left, top, w, h), flip) in enumerate(zip(images, batch["boxes"].tolist(), batch["flips"].tolist())):
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        resized = resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
        out[i] = resized.flip(1) if flip else resized
    return out, batch["labels"].to(device, non_blocking=True)


def shard_paths(manifest_path: str | Path, manifest: dict) -> tuple[str, ...]:
    """Absolute shard paths from a verified manifest (plain file names in its folder)."""
    folder = Path(manifest_path).resolve().parent
    return tuple(str(folder / shard["name"]) for shard in manifest["shards"])
