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

Images are decoded on CPU workers (libjpeg-turbo through simplejpeg, asking its DCT scaling for
the smallest size that still covers the crop), cropped and resized with antialiased bilinear
interpolation on uint8, and flipped; batches are uint8 NHWC. Normalisation happens on the device.
With ``decode_device: cuda`` the workers only pick the crops and the JPEGs are decoded by nvJPEG.
Only the ``jpg`` and ``cls`` fields are read; nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- image ops


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) as torchvision's RandomResizedCrop draws it: up to ten
    tries at a random area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, else the
    largest centred crop within ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """The region of the original that ``Resize(resize)`` then ``CenterCrop(size)`` keeps."""
    scale = resize / min(width, height)
    w = min(width, round(size / scale))
    h = min(height, round(size / scale))
    return (width - w) // 2, (height - h) // 2, w, h


def decode_crop(jpeg: bytes, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    """Decode ``jpeg``, cut ``box`` (in original pixels) and resize it to ``size``×``size``:
    uint8, HWC. DCT scaling decodes at the smallest 1/8-step scale that keeps the crop at least
    ``size`` pixels wide and high, which skips most of the work for small outputs."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    left, top, w, h = box
    image = simplejpeg.decode_jpeg(
        jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
        min_width=min(width, math.ceil(size * width / w)), min_height=min(height, math.ceil(size * height / h)),
    )
    sy, sx = image.shape[0] / height, image.shape[1] / width
    y0, x0 = int(top * sy), int(left * sx)
    y1, x1 = max(y0 + 1, round((top + h) * sy)), max(x0 + 1, round((left + w) * sx))
    crop = torch.from_numpy(image[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
    # channels_last uint8 takes torch's vectorised antialiased-bilinear kernel.
    crop = crop.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out[0].permute(1, 2, 0)
    return out.flip(1) if flip else out


def normalize(images: torch.Tensor, memory_format=torch.channels_last) -> torch.Tensor:
    """uint8 NHWC → float NCHW normalised with ImageNet's mean and std. channels_last (the NHWC
    bytes as they come) suits GPU convolutions; CPU ones run faster on plain NCHW here."""
    x = images.permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).contiguous(memory_format=memory_format)


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
        wds.tarfile_to_samples(),
        wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng),
        _numbered,
    )
    return iter(pipeline)


def _augment(spec: TrainStreamSpec, stream: int, sample: dict):
    """One sample's crop and flip, drawn from a generator seeded by its place in its stream."""
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, stream, sample["__index__"]])
    jpeg = sample["jpg"]
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    box = random_resized_crop_box(width, height, spec.crop_scale, rng)
    flip = bool(rng.random() < 0.5)
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


class TrainBatches(IterableDataset):
    """The batches of one rank for one epoch (from ``start_batch`` on, when resuming).

    DataLoader hands out batches round-robin from worker 0; batch ``start_batch + i`` must come
    from stream ``(start_batch + i) mod W``, so worker ``w`` serves stream ``(start_batch + w) mod W``.
    """

    def __init__(self, spec: TrainStreamSpec):
        self.spec = spec

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts the batches already done itself.
        return self.spec.steps

    def __iter__(self):
        info = get_worker_info()
        if info is None:  # num_workers=0: the main process serves the single stream
            yield from stream_batches(self.spec, 0)
            return
        if info.num_workers != self.spec.workers:
            raise RuntimeError(f"train batches planned for {self.spec.workers} streams run in {info.num_workers} workers")
        yield from stream_batches(self.spec, (self.spec.start_batch + info.id) % info.num_workers)


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
        # A 1×1 black JPEG: the device decoder needs real JPEG bytes even for padding.
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

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        owned = self.assignment[self.spec.rank]
        shard_ids = owned[worker] if info else [i for w in owned for i in w]
        collate = collate_encoded if self.spec.decode_on_device else collate_decoded
        if shard_ids:
            samples = wds.DataPipeline(
                wds.SimpleShardList([self.spec.shards[i] for i in shard_ids]),
                wds.tarfile_to_samples(),
                wds.map(lambda sample: _val_sample(self.spec, sample)),
                wds.batched(self.spec.batch_size, collation_fn=collate, partial=True),
            )
            for batch in samples:
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
    )


# --------------------------------------------------------------------------- device decoding


def decode_on_device(batch: dict, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """nvJPEG-decode a batch from :func:`collate_encoded` on ``device``, crop, resize and flip
    there: uint8 NHWC, like the CPU path."""
    from torchvision.io import decode_jpeg

    images = decode_jpeg(batch["jpegs"], device=device)
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
