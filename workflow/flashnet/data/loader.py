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

The shards are read by a small tar reader of our own (a stage in the WebDataset pipelines) instead
of ``wds.tarfile_to_samples``, whose Python ``tarfile`` parsing cost ~130 µs of CPU per sample,
~15 % of a worker's time; ours takes ~25 µs. Only the ``jpg`` and ``cls`` fields are read; other
fields are skipped unread, so nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import signal
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- shard reading

TAR_BLOCK = 512
READ_FIELDS = frozenset({"jpg", "cls"})
_ZERO_BLOCK = bytes(TAR_BLOCK)


class ShardError(ValueError):
    """A shard that is not a readable tar of samples; the message names the shard."""


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records, position = {}, 0
    while position < len(data) and data[position] != 0:
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def tar_members(f: BinaryIO, path: str) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file of the tar ``f``, with ``f`` at the start of its data; the
    consumer reads as much of it as it wants, and the next member is found from the header's own
    position. Knows the ustar, GNU long-name and pax headers Python's tarfile (which writes the
    shards) emits; other entries (folders, links) are skipped."""
    long_name, pax = None, {}
    while True:
        start = f.tell()
        header = f.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK or header == _ZERO_BLOCK:
            if header.strip(b"\0"):
                raise ShardError(f"{path}: truncated tar header at byte {start}")
            return
        # The checksum counts its own 8-byte field as spaces (0x20 each).
        if sum(header) - sum(header[148:156]) + 8 * 0x20 != _tar_number(header[148:156]):
            raise ShardError(f"{path}: bad tar header checksum at byte {start}")
        size, kind = _tar_number(header[124:136]), header[156:157]
        data_start = start + TAR_BLOCK
        if kind == b"x":
            pax = _pax_records(f.read(size))
        elif kind == b"L":
            long_name = f.read(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            size = int(pax.get("size", size))
            yield pax.get("path", long_name or name), size
            long_name, pax = None, {}
        f.seek(data_start + size + (-size % TAR_BLOCK))


def shard_samples(path: str) -> Iterator[dict]:
    """The samples of one shard, in order: ``{"__key__", "jpg", "cls"}``. Files are grouped into
    samples as WebDataset does (key = the name up to the first dot of its last part, field = the
    rest, lower-cased); fields other than ``jpg`` and ``cls`` are never read."""
    sample = None
    with open(path, "rb") as f:
        for name, size in tar_members(f, path):
            folder, slash, base = name.rpartition("/")
            stem, dot, field = base.partition(".")
            if not dot:
                continue
            key, field = folder + slash + stem, field.lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if field in sample:
                raise ShardError(f"{path}: sample {key} has two {field!r} files")
            if field in READ_FIELDS:
                sample[field] = f.read(size)
                if len(sample[field]) != size:
                    raise ShardError(f"{path}: {name} is cut short ({len(sample[field])} of {size} bytes)")
    if sample is not None:
        yield sample


def _tar_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: ``{"url": shard path}`` → its samples (what ``wds.tarfile_to_samples`` does
    for local files, at a fifth of the CPU time)."""
    for source in sources:
        yield from shard_samples(source["url"])


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


def _kept_span(original: int, resized: int, size: int) -> tuple[int, int]:
    """(start, length) in original pixels of the ``size`` centre pixels of an axis resized from
    ``original`` to ``resized`` pixels, offset as CenterCrop does (``round((resized - size) / 2)``)."""
    if size >= resized:  # CenterCrop pads instead of cropping: the whole axis is kept
        return 0, original
    offset = round((resized - size) / 2)
    start = round(offset * original / resized)
    end = min(original, round((offset + size) * original / resized))
    return start, max(1, end - start)


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """The region of the original that torchvision's ``Resize(resize)`` then ``CenterCrop(size)``
    keeps, to the nearest pixel. Resize truncates the longer side to ``int(resize · long / short)``,
    so the two axes' scales differ slightly; at eval sizes like 73 that moves an edge by >1 %."""
    short, long = min(width, height), max(width, height)
    resized_long = int(resize * long / short)
    resized_w, resized_h = (resize, resized_long) if width <= height else (resized_long, resize)
    left, w = _kept_span(width, resized_w, size)
    top, h = _kept_span(height, resized_h, size)
    return left, top, w, h


# libjpeg-turbo has SIMD inverse DCTs for full size and for 1/2, 1/4 and 1/8 scaling; its 5/8, 6/8
# and 7/8 scales run plain-C IDCTs and decode *slower* than full size (CPU time on 300–500 px JPEGs,
# docs/benchmarks/loader.md: 1.4x, 1.6x, 1.8x the full-size time; 1/2 and 3/8 0.93x, 1/4 0.76x,
# 1/8 0.64x). Picking the smallest n/8 that covers the crop, as this did before, made the train
# pipeline 1.19x slower at 224 px from 300–500 px images.
FAST_DCT_SCALES = (1, 2, 4)  # in eighths, smallest first
# A scaled decode averages over the JPEG's blocks, and its box snaps to the coarser pixel grid.
# Leaving the last factor of two or more to the antialiased resize (Pillow's ``reducing_gap`` makes
# the same trade) keeps both small: on random crops of the textured test drawings, the mean
# difference to a full-size decode + resize was 1.6 / 2.1 / 2.6 grey levels at 1/2 / 1/4 / 1/8
# scale, against 2.0 / 2.3 / 3.9 when decoding right down to the output size (full size: 1.0,
# from the fast IDCT).
DCT_REDUCING_GAP = 2


def dct_scale(crop_width: int, crop_height: int, size: int) -> int:
    """The decode scale in eighths: the smallest of :data:`FAST_DCT_SCALES` at which the crop still
    has ``DCT_REDUCING_GAP`` × ``size`` pixels each way, else 8 (full size, also for crops smaller
    than ``size``). So a decode is never smaller than the output needs."""
    least = 8 * DCT_REDUCING_GAP * size
    for eighths in FAST_DCT_SCALES:
        if crop_width * eighths >= least and crop_height * eighths >= least:
            return eighths
    return 8


def decode_crop(jpeg: bytes, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    """Decode ``jpeg``, cut ``box`` (in original pixels) and resize it to ``size``×``size``:
    uint8, HWC. Large crops are decoded at 1/2, 1/4 or 1/8 scale (:func:`dct_scale`), which skips
    most of the inverse DCT and colour conversion; the box's edges then snap to the scaled pixel
    grid (by at most 4/eighths original pixels)."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    left, top, w, h = box
    eighths = dct_scale(w, h, size)
    # simplejpeg picks the smallest scale whose output is at least min_width × min_height.
    image = simplejpeg.decode_jpeg(
        jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
        min_width=-(-width * eighths // 8), min_height=-(-height * eighths // 8),
    )
    # Scaled pixel i covers original pixels [8i/eighths, 8(i+1)/eighths) (the last one may cover a
    # partial block): map the box with exactly that scale, not the ratio of the rounded-up sizes.
    scale = eighths / 8
    y0, x0 = round(top * scale), round(left * scale)
    y1 = min(image.shape[0], max(y0 + 1, round((top + h) * scale)))
    x1 = min(image.shape[1], max(x0 + 1, round((left + w) * scale)))
    # channels_last uint8 takes torch's vectorised antialiased-bilinear kernel. The batch dimension
    # goes in before the permute: added after it, its stride reads as NCHW to torch, which then
    # returns an NCHW result that every later copy has to transpose.
    crop = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).unsqueeze(0).permute(0, 3, 1, 2)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out[0].permute(1, 2, 0)
    return out.flip(1) if flip else out


def normalize(images: torch.Tensor, memory_format=torch.channels_last) -> torch.Tensor:
    """uint8 NHWC → float NCHW normalised with ImageNet's mean and std. channels_last (the NHWC
    bytes as they come) suits GPU convolutions; CPU ones run faster on plain NCHW here."""
    x = images.permute(0, 3, 1, 2).float()
    mean, std = _normalisation_constants(x.device)
    return ((x - mean) / std).contiguous(memory_format=memory_format)


@functools.lru_cache(maxsize=None)
def _normalisation_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host-to-device copy every step would make the host wait.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


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
