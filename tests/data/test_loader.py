"""Tests of flashnet.data.loader: real epochs (every train sample once per epoch but the < B tail),
batch counts, resume determinism and exact-once val against the real shard format.

The shards are made once per module by the project's own steps (sample data → index → write
shards → manifest) from small generated images, so the loader reads exactly what training reads.
Samples are recognised in the output by content: a val sample's centre crop is a deterministic
function of its JPEG, and the train loader's device-decode path hands out the JPEG bytes
themselves, so matching them to the samples' shows which samples came out, and how often.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from flashnet.data import loader, sample, shards, sources, tarfiles
from flashnet.data.batch import Batch
from flashnet.data.epochs import TrainSamples, shard_paths
from flashnet.data.manifest import build_manifest, read_shard_samples
from flashnet.data.transforms import Augmentation

pytestmark = [
    # Three loader workers on this two-core machine are the point of some tests.
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
    # torchvision 0.29 deprecates its image decoders (for TorchCodec); the loader's device path
    # still uses decode_jpeg, so these tests do too.
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"),
]

IMAGE_SIZE = 16  # train crop and val crop
VAL_RESIZE = 18
STEPS = 7
BATCH = 3


@dataclasses.dataclass(frozen=True)
class Split:
    shards: tuple[str, ...]
    shard_samples: tuple[int, ...]
    samples: dict[str, tuple[bytes, int]]  # key → (jpeg, label), read back with tarfile
    train_samples: TrainSamples | None = None  # from the manifest

def build_split(data_dir: Path, out: Path, split: str, samples_per_shard: int) -> Split:
    """Index, shard and verify one split as the workflow's rules do."""
    index = sources.index_split(data_dir, split)
    folder = out / split
    folder.mkdir(parents=True)
    index_path = folder / "index.json"
    shards.save_index(shards.shuffled(index, 0), data_dir, samples_per_shard, 0, index_path)
    part = folder / "parts" / "0.json"
    part.parent.mkdir()
    shards.write_part(index_path, 0, 1, part, max_side=None, quality=90)
    manifest_path = folder / "manifest.json"
    manifest = build_manifest(index_path, [part], manifest_path, max_rejected=0)
    paths = shard_paths(manifest_path, manifest)
    samples = {key: (fields["jpg"], int(fields["cls"])) for path in paths
               for key, fields in read_shard_samples(Path(path))}
    return Split(paths, tuple(s["samples"] for s in manifest["shards"]), samples,
                 TrainSamples.from_manifest(manifest_path, manifest))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Split]:
    """24 train samples in shards of 5 (5,5,5,5,4), and the same in one shard and in 24; 21 val
    samples in shards of 4 (4,4,4,4,4,1), so some ranks and workers get more samples than others,
    and some none."""
    root = tmp_path_factory.mktemp("loader")
    spec = sample.SampleSpec(classes=3, train_per_class=8, val_per_class=7, min_side=40, max_side=90,
                             odd_files=False, seed=0)
    sample.write_sample_data(root / "images", spec, layouts=("extracted",))
    return {"train": build_split(root / "images", root / "shards", "train", 5),
            "train-1-shard": build_split(root / "images", root / "one-shard", "train", 24),
            "train-24-shards": build_split(root / "images", root / "24-shards", "train", 1),
            "val": build_split(root / "images", root / "shards", "val", 4)}


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# --------------------------------------------------------------------------- train


def train_spec(split: Split, **changes) -> loader.TrainStreamSpec:
    settings = dict(samples=split.train_samples, seed=0, epoch=0, rank=0, world_size=1, steps=STEPS, batch_size=BATCH,
                    image_size=IMAGE_SIZE,
                    augmentation=Augmentation(crop_scale=(0.25, 1.0), crop_ratio=(3 / 4, 4 / 3)))
    return loader.TrainStreamSpec(**{**settings, **changes})


def train_batches(spec: loader.TrainStreamSpec, workers: int) -> list[Batch]:
    return list(loader.train_loader(spec, workers))


def assert_same_batches(actual: list[Batch], expected: list[Batch]) -> None:
    assert len(actual) == len(expected)
    for i, (batch, batch_expected) in enumerate(zip(actual, expected)):
        assert torch.equal(batch.labels, batch_expected.labels), f"batch {i}: labels differ"
        assert torch.equal(batch.images, batch_expected.images), f"batch {i}: images differ"


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_rank_yields_steps_full_batches(data, workers):
    known_labels = {label for _, label in data["train"].samples.values()}
    for rank in (0, 1):
        spec = train_spec(data["train"], rank=rank, world_size=2, steps=4)
        batches = train_batches(spec, workers)
        assert len(batches) == 4 == len(loader.TrainBatches(spec))
        for batch in batches:
            assert batch.jpegs is None
            assert batch.images.shape == (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3) and batch.images.dtype == torch.uint8
            assert batch.labels.shape == (BATCH,) and batch.labels.dtype == torch.long
            assert batch.valid.dtype == torch.bool and batch.valid.all(), "a train sample marked as padding"
            assert set(batch.labels.tolist()) <= known_labels


def rank_keys(split: Split, spec: loader.TrainStreamSpec, workers: int, resume_at: int | None = None) -> list[str]:
    """The keys of one rank's samples, batch by batch (JPEG bytes from the device-decode path
    matched to the samples'); with ``resume_at``, the batches before it from an uninterrupted
    epoch and the rest from a loader resumed there."""
    by_jpeg = {jpeg: key for key, (jpeg, _) in split.samples.items()}
    spec = dataclasses.replace(spec, decode_on_device=True)
    batches = train_batches(spec, workers)
    if resume_at is not None:
        resumed = train_batches(dataclasses.replace(spec, start_batch=resume_at), workers)
        assert len(resumed) == spec.steps - resume_at
        batches = batches[:resume_at] + resumed
    keys = []
    for batch in batches:
        assert batch.images is None and len(batch.jpegs) == spec.batch_size
        batch_keys = [by_jpeg[jpeg.numpy().tobytes()] for jpeg in batch.jpegs.jpegs]
        assert batch.labels.tolist() == [split.samples[key][1] for key in batch_keys]
        keys += batch_keys
    return keys


@pytest.mark.parametrize("split_name, world_size, workers, batch_size", [
    ("train", 1, 0, 3),             # B = 3: 8 steps, no tail
    ("train", 2, 2, 5),             # B = 10: 2 steps, tail of 4
    ("train-1-shard", 3, 3, 2),     # fewer shards than ranks: B = 6, 4 steps
    ("train-1-shard", 5, 2, 1),     # B = 5: 4 steps, tail of 4
    ("train-24-shards", 4, 1, 5),   # a shard per sample: B = 20, 1 step, tail of 4
])
def test_the_stream_reads_every_sample_once_a_pass(data, split_name, world_size, workers, batch_size):
    """Over all ranks and workers, epochs 0 and 1 (floor(N / B) steps each, the first resumed
    mid-epoch) read the stream's first 2 × steps × B samples: all N of pass 0 once, then the first
    of pass 1 (distinct), so none sits out; every rank yields the same number of full batches."""
    split = data[split_name]
    n, global_batch = len(split.samples), world_size * batch_size
    steps = n // global_batch
    seen: list[str] = []
    for epoch in (0, 1):
        epoch_keys: list[str] = []
        for rank in range(world_size):
            spec = train_spec(split, epoch=epoch, rank=rank, world_size=world_size, steps=steps, batch_size=batch_size)
            keys = rank_keys(split, spec, workers, resume_at=steps // 2 if epoch == 0 else None)
            assert len(keys) == steps * batch_size, f"rank {rank}: {len(keys)} samples"
            epoch_keys += keys
        if epoch == 0:  # within pass 0
            assert len(epoch_keys) == len(set(epoch_keys)), "a sample read twice in one pass"
        seen += epoch_keys
    counts = collections.Counter(seen)
    assert set(counts) == set(split.samples), "a sample sat out a whole pass"
    twice = 2 * steps * global_batch - n
    assert collections.Counter(counts.values()) == collections.Counter({1: n - twice, 2: twice})


def test_the_epoch_order_changes_with_epoch_and_seed(data):
    split = data["train"]
    spec = train_spec(split, steps=8)  # all 24 samples
    base = rank_keys(split, spec, 0)
    assert sorted(base) == sorted(split.samples) == sorted(rank_keys(split, dataclasses.replace(spec, epoch=1), 0))
    assert rank_keys(split, dataclasses.replace(spec, epoch=1), 0) != base
    assert rank_keys(split, dataclasses.replace(spec, seed=1), 0) != base
    assert rank_keys(split, spec, 0) == base


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_yields_the_tail_of_the_epoch(data, workers):
    """Batches from start_batch=k equal batches k.. of the whole epoch, for k inside a round of
    workers, on its boundary (k = W) and just after; ``__len__`` stays the whole epoch (Lightning
    counts the batches already done itself)."""
    full = train_batches(train_spec(data["train"]), workers)
    streams = max(workers, 1)
    for k in sorted({1, streams, streams + 1, STEPS - 1}):
        spec = train_spec(data["train"], start_batch=k)
        assert len(loader.TrainBatches(spec)) == STEPS
        assert_same_batches(train_batches(spec, workers), full[k:])


def test_resume_skips_the_consumed_samples_without_decoding_them(data, monkeypatch):
    decoded = []
    real = loader.decode_crop

    def counting(*args, **kwargs):
        decoded.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "decode_crop", counting)
    train_batches(train_spec(data["train"], start_batch=STEPS - 2), 0)
    assert len(decoded) == 2 * BATCH  # only the two batches trained after the resume


def test_the_batches_do_not_depend_on_the_number_of_workers(data):
    base = train_batches(train_spec(data["train"]), 0)
    for workers in (1, 2, 3):
        assert_same_batches(train_batches(train_spec(data["train"]), workers), base)


def test_direct_iteration_matches_the_loader_workers(data):
    """Outside DataLoader workers, TrainBatches makes the batches the workers would."""
    for start in (0, 2):
        spec = train_spec(data["train"], start_batch=start)
        assert_same_batches(list(loader.TrainBatches(spec)), train_batches(spec, 3))


def test_batches_are_a_function_of_seed_epoch_and_rank(data):
    spec = train_spec(data["train"], world_size=2, steps=4)
    base = train_batches(spec, 0)
    assert_same_batches(train_batches(spec, 0), base)
    for change in ({"epoch": 1}, {"rank": 1}, {"seed": 1}):
        other = train_batches(dataclasses.replace(spec, **change), 0)
        differing = sum(not torch.equal(a.images, b.images) for a, b in zip(other, base))
        assert differing == 4, f"{change}: only {differing} of 4 batches differ"


def test_a_samples_crop_depends_on_its_pass_not_on_the_epoch_it_falls_in(data):
    """Global steps 8-11 (stream positions 24-35: pass 1's first 12 samples, N = 24, B = 3) as epoch 1
    of 8-step epochs and as epoch 2 of 4-step epochs: the same samples, the same crops and flips."""
    split = data["train"]
    long_epochs = train_batches(train_spec(split, epoch=1, steps=4, epoch_steps=8), 0)
    short_epochs = train_batches(train_spec(split, epoch=2, steps=4, epoch_steps=4), 0)
    assert_same_batches(short_epochs, long_epochs)
    other_pass = train_batches(train_spec(split, epoch=0, steps=4, epoch_steps=4), 0)  # pass 0
    assert not all(torch.equal(a.images, b.images) for a, b in zip(other_pass, long_epochs))


def test_an_epoch_longer_than_a_pass_reads_on_into_the_next(data):
    """9 steps × 3 = 27 of 24 samples (an epoch as NVIDIA's ceil counts it): the last step is the
    first 3 samples of pass 1, after all 24 of pass 0 once."""
    split = data["train"]
    keys = rank_keys(split, train_spec(split, steps=9), 0)
    assert sorted(keys[:24]) == sorted(split.samples) and len(set(keys[24:])) == 3
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        train_spec(data["train"], rank=2, world_size=2, steps=1)


# --------------------------------------------------------------------------- the run's loader

RUN_EPOCH_STEPS, RUN_STEPS = 4, 10  # 2.5 epochs: the last one fractional


def run_spec(split: Split, start_step: int = 0) -> loader.TrainRunSpec:
    """A run of 2.5 epochs of 4 steps whose third epoch takes the val transform."""
    return loader.TrainRunSpec(train_spec(split, steps=RUN_EPOCH_STEPS), RUN_STEPS, start_step, augmenting_epochs=2,
                               val_resize=VAL_RESIZE)


def run_epochs(run: loader.TrainRunSpec, workers: int) -> list[list[Batch]]:
    """The run loader's batches, epoch by epoch as Lightning iterates it, then shut down."""
    epochs = loader.train_run_loader(run, workers)
    try:
        return [list(epochs) for _ in range(math.ceil(RUN_STEPS / RUN_EPOCH_STEPS) - run.epoch_of(run.start_step))]
    finally:
        epochs.close()


@pytest.fixture(scope="module")
def per_epoch_batches(data) -> list[Batch]:
    """The run's batches from loaders of one epoch each, as training made them before."""
    run = run_spec(data["train"])
    return [batch for epoch in range(3) for batch in train_batches(run.epoch_spec(epoch), 0)]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_the_run_loader_yields_the_per_epoch_loaders_batches_epoch_by_epoch(data, per_epoch_batches, workers):
    """One loader over the run: the batches of per-epoch loaders, whatever the number of workers,
    in whole epochs, the last one fractional; the third epoch takes the val transform."""
    run = run_spec(data["train"])
    assert [run.epoch_spec(epoch).center_crop_resize for epoch in range(3)] == [None, None, VAL_RESIZE]
    epochs = run_epochs(run, workers)
    assert [len(epoch) for epoch in epochs] == [4, 4, 2]
    assert_same_batches([batch for epoch in epochs for batch in epoch], per_epoch_batches)


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("start_step", [1, 4, 6, 9])
def test_the_run_loader_resumes_at_the_restored_step(data, per_epoch_batches, workers, start_step):
    """Resumed at global step k, the first iteration is the rest of k's epoch and the batches are
    the uninterrupted run's from k on (with 3 workers the first epoch's turn does not start at
    worker 0 of the next one)."""
    run = run_spec(data["train"], start_step)
    epochs = run_epochs(run, workers)
    assert len(epochs[0]) == run.epoch_stop(run.epoch_of(start_step)) - start_step
    assert_same_batches([batch for epoch in epochs for batch in epoch], per_epoch_batches[start_step:])


def test_the_run_loader_keeps_its_workers_across_epochs_and_reads_nothing_before_a_resume(data, monkeypatch):
    """The same worker processes make every epoch; closing ends them. A resume at step 9 decodes
    the one batch left and nothing before it."""
    epochs = loader.train_run_loader(run_spec(data["train"]), 2)
    list(epochs)
    workers = list(epochs._iterator._workers)
    assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
    list(epochs), list(epochs)
    assert epochs._iterator._workers == workers and all(worker.is_alive() for worker in workers)
    epochs.close()
    assert not any(worker.is_alive() for worker in workers)

    decoded = []
    real = loader.decode_crop
    monkeypatch.setattr(loader, "decode_crop", lambda *args, **kwargs: decoded.append(1) or real(*args, **kwargs))
    assert [len(epoch) for epoch in run_epochs(run_spec(data["train"], 9), 0)] == [1]
    assert len(decoded) == BATCH


def test_an_epoch_lightning_resumes_with_no_batch_left_yields_none(data):
    """Resumed from a checkpoint written after an epoch's last step, Lightning first finishes that
    epoch (no batch left), then starts the next with another iter()."""
    lightning_epoch = iter([0, 1, 2])
    epochs = loader.train_run_loader(run_spec(data["train"], 4), 0, current_epoch=lambda: next(lightning_epoch))
    assert [len(list(epochs)) for _ in range(3)] == [0, 4, 2]


# --------------------------------------------------------------------------- val


def test_val_batches_hand_computed():
    """10 samples, 3 ranks, batches of 2: shares 0..3, 3..6, 6..10; the 4-sample rank runs 2
    batches, the others a short one and a padding batch (empty), so all run 2."""
    assert [loader.val_share(10, 3, rank) for rank in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    assert loader.val_batches(10, 3, 0, 2) == [range(0, 2), range(2, 3)]
    assert loader.val_batches(10, 3, 2, 2) == [range(6, 8), range(8, 10)]
    # More ranks than samples: the rank without a sample pads all the way.
    assert loader.val_batches(2, 3, 0, 4) == [range(0, 0)] and loader.val_batches(2, 3, 1, 4) == [range(0, 1)]


@pytest.mark.parametrize("samples, world_size, workers, batch_size", [
    (21, 4, 3, 3), (21, 7, 2, 5), (5, 8, 2, 2),  # more ranks than samples (and than shards)
    (1_000, 64, 8, 7), (50_000, 2_048, 8, 40),  # ImageNet's val at the record's scale
])
def test_val_batches_read_every_sample_once_within_one_batch_of_the_balanced_share(samples, world_size, workers,
                                                                                 batch_size):
    """Exact-once over all ranks; every rank runs the same number of batches; every rank reads
    N / world rounded down or up, and every worker of a rank within one batch of its others."""
    counts = np.zeros(samples, dtype=np.int64)
    batch_counts = set()
    for rank in range(world_size):
        batches = loader.val_batches(samples, world_size, rank, batch_size)
        batch_counts.add(len(batches))
        read = [len(batch) for batch in batches]
        assert sum(read) in (samples // world_size, -(-samples // world_size))
        per_worker = [sum(read[worker::workers]) for worker in range(workers)]
        assert max(per_worker) - min(per_worker) <= batch_size
        for batch in batches:
            assert 0 < len(batch) <= batch_size or len(batch) == 0
            counts[batch.start:batch.stop] += 1
    assert counts.min() == counts.max() == 1, "val samples dropped or repeated"
    assert len(batch_counts) == 1, f"ranks ran different numbers of batches: {batch_counts}"


def expected_val_crops(split: Split) -> dict[bytes, str]:
    """Each val sample's centre crop (as bytes) → its key."""
    crops = {}
    for key, (jpeg, _) in split.samples.items():
        height, width, _, _ = loader.simplejpeg.decode_jpeg_header(jpeg)
        box = loader.center_crop_box(width, height, VAL_RESIZE, IMAGE_SIZE)
        crops[loader.decode_crop(jpeg, box, IMAGE_SIZE).numpy().tobytes()] = key
    assert len(crops) == len(split.samples), "two val samples have the same crop: cannot tell them apart"
    return crops


def val_spec(split: Split, rank: int, world_size: int, workers: int, **changes) -> loader.ValSpec:
    spec = loader.ValSpec(samples=split.train_samples, rank=rank, world_size=world_size, batch_size=BATCH,
                          image_size=IMAGE_SIZE, resize=VAL_RESIZE, workers=workers)
    return dataclasses.replace(spec, **changes)


@pytest.mark.parametrize("world_size", [1, 2, 4, 7])  # 7: more ranks than the 6 shards
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_val_reads_every_sample_exactly_once(data, world_size, workers):
    split = data["val"]
    crops = expected_val_crops(split)
    seen: list[str] = []
    batch_counts = []
    for rank in range(world_size):
        batches = list(loader.val_loader(val_spec(split, rank, world_size, workers)))
        batch_counts.append(len(batches))
        padding = sum(not planned for planned in loader.val_batches(len(split.samples), world_size, rank, BATCH))
        assert sum(not batch.valid.any() for batch in batches) == padding
        read = sum(int(batch.valid.sum()) for batch in batches)
        assert read in (len(split.samples) // world_size, -(-len(split.samples) // world_size))
        for batch in batches:
            images, labels, valid = batch.images, batch.labels, batch.valid
            assert images.dtype == torch.uint8 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
            assert 1 <= len(images) <= BATCH and len(labels) == len(valid) == len(images)
            for image, label, is_valid in zip(images, labels.tolist(), valid.tolist()):
                if not is_valid:  # padding: black and masked
                    assert not image.any()
                    continue
                key = crops.get(image.numpy().tobytes())
                assert key is not None, f"rank {rank}: a val image that is no sample's centre crop"
                assert label == split.samples[key][1]
                seen.append(key)
    assert sorted(seen) == sorted(split.samples), "val samples dropped or repeated"
    assert len(set(batch_counts)) == 1, f"ranks ran different numbers of batches: {batch_counts}"


def test_val_batches_do_not_depend_on_the_workers_and_persist_across_passes(data):
    """Iterated directly or through 1 or 3 workers, a rank's val batches are the same, in the same
    order; a second pass (the next validation) goes through the same worker processes."""
    spec = val_spec(data["val"], rank=0, world_size=2, workers=0)
    direct = list(loader.ValBatches(spec))
    for workers in (1, 3):
        val = loader.val_loader(dataclasses.replace(spec, workers=workers))
        assert_same_val_batches(list(val), direct)
        first_workers = val._iterator._workers
        assert_same_val_batches(list(val), direct)
        assert val._iterator._workers == first_workers and all(worker.is_alive() for worker in first_workers)
        val._iterator._shutdown_workers()


def assert_same_val_batches(actual: list[Batch], expected: list[Batch]) -> None:
    assert len(actual) == len(expected)
    for batch, batch_expected in zip(actual, expected):
        assert torch.equal(batch.images, batch_expected.images) and torch.equal(batch.valid, batch_expected.valid)


# --------------------------------------------------------------------------- fields read


class CreatesFileWhenUnpickled:
    """Unpickling this opens ``path`` for writing, which leaves an empty file behind."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_only_jpg_and_cls_are_read(data, tmp_path):
    """A shard carrying a ``.pyd`` pickle: the loader must never unpickle (or even read) it."""
    marker = tmp_path / "unpickled"
    trap = pickle.dumps(CreatesFileWhenUnpickled(marker))
    pickle.loads(trap)  # the trap works: unpickling it makes the marker
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "trapped-000000.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        for key, (jpeg, label) in sorted(data["val"].samples.items())[:8]:
            writer.write({"__key__": key, "jpg": jpeg, "cls": str(label).encode(), "pyd": trap})
    assert [sorted(s) for s in tarfiles.shard_samples(str(path))] == [["__key__", "cls", "jpg"]] * 8

    trapped = Split((str(path),), (8,), {}, TrainSamples.scan([str(path)]))
    for workers in (0, 2):
        assert len(train_batches(train_spec(trapped, steps=2), workers)) == 2
        val = list(loader.val_loader(val_spec(trapped, rank=0, world_size=1, workers=workers)))
        assert sum(int(batch.valid.sum()) for batch in val) == 8
    assert not marker.exists(), "the loader unpickled a field it should never have read"


# --------------------------------------------------------------------------- decoding on the device


def test_device_decode_path_matches_the_cpu_path(data):
    """Decoding on the device (torchvision's decoder; here on CPU, nvJPEG on a GPU) after workers
    that only pick crops gives the CPU path's batches: same shapes, labels and mask, close pixels."""
    cpu = torch.device("cpu")
    for workers in (0, 2):
        plain = train_batches(train_spec(data["train"]), workers)
        encoded = train_batches(train_spec(data["train"], decode_on_device=True), workers)
        assert len(encoded) == len(plain) == STEPS
        for batch, plain_batch in zip(encoded, plain):
            assert batch.images is None and len(batch.jpegs) == BATCH
            decoded = batch.device_images(IMAGE_SIZE, cpu)
            assert decoded.shape == plain_batch.images.shape and decoded.dtype == torch.uint8
            assert torch.equal(batch.labels, plain_batch.labels) and torch.equal(batch.valid, plain_batch.valid)
            assert mean_abs_difference(decoded, plain_batch.images) < 3

    spec = val_spec(data["val"], rank=0, world_size=6, workers=2)  # 3 of 21 samples and a padding batch
    plain = list(loader.val_loader(spec))
    encoded = list(loader.val_loader(dataclasses.replace(spec, decode_on_device=True)))
    assert len(encoded) == len(plain)
    padding = 0
    for batch, plain_batch in zip(encoded, plain):
        decoded = batch.device_images(IMAGE_SIZE, cpu)
        assert torch.equal(batch.valid, plain_batch.valid) and torch.equal(batch.labels, plain_batch.labels)
        if batch.valid.all():
            assert mean_abs_difference(decoded, plain_batch.images) < 3
        else:
            assert not batch.valid.any() and decoded.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
            padding += 1
    assert padding == sum(not planned for planned in loader.val_batches(len(data["val"].samples), 6, 0, BATCH)) == 1


def test_train_batches_without_augmentation_are_the_val_transform(data):
    """``center_crop_resize`` (Fujitsu's last epochs): resize, centre crop, no flip, for every sample."""
    from flashnet.data.transforms import center_crop_box, decode_crop
    import simplejpeg

    expected = set()
    for jpeg, label in data["train"].samples.values():
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        crop = decode_crop(jpeg, center_crop_box(width, height, VAL_RESIZE, IMAGE_SIZE), IMAGE_SIZE)
        expected.add((crop.numpy().tobytes(), label))
    batches = train_batches(train_spec(data["train"], center_crop_resize=VAL_RESIZE), 0)
    seen = [(image.numpy().tobytes(), int(label))
            for batch in batches for image, label in zip(batch.images, batch.labels)]
    assert len(seen) == STEPS * BATCH and set(seen) <= expected
    augmented = train_batches(train_spec(data["train"]), 0)
    assert not {(i.numpy().tobytes(), int(l)) for b in augmented for i, l in zip(b.images, b.labels)} <= expected
# --------------------------------------------------------------------------- decode errors


def corrupt_shard(split: Split, kit, path: Path) -> tuple[str, str]:
    """A shard of 6 samples whose 4th JPEG has garbage in its entropy-coded data; returns (shard,
    damaged sample's key)."""
    items = sorted(split.samples.items())[:6]
    shard = tarfiles.ShardFile(path)
    for i, (key, (jpeg, label)) in enumerate(items):
        shard.add(key, {"jpg": kit.corrupt_jpeg(jpeg) if i == 3 else jpeg, "cls": str(label).encode()})
    shard.finish()
    return str(path), items[3][0]


def loader_error(batches) -> str:
    """The message of the error iterating ``batches`` raises. Its workers are left as an error
    leaves them in training: alive, held by the error's traceback until the interpreter's exit,
    where they must end on multiprocessing's SIGTERM (``ignore_sigterm``) for the process to exit."""
    try:
        for _ in batches:
            pass
    except Exception as error:  # noqa: BLE001 - the test checks what it says
        return f"{type(error).__name__}: {error}"
    raise AssertionError("no error")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_jpeg_names_its_shard_and_key(data, kit, tmp_path, workers):
    """A decode error met by the train or val loader names the shard and the sample's key (not a
    bare "Corrupt JPEG data"), also from inside a loader worker."""
    path, key = corrupt_shard(data["val"], kit, tmp_path / "corrupt-000000.tar")
    spec = train_spec(Split((path,), (6,), {}, TrainSamples.scan([path])), steps=2)  # all 6 samples
    expected = rf"{path}: sample {key}: Corrupt JPEG data"
    assert re.search(expected, loader_error(loader.train_loader(spec, workers)))
    val = loader.val_loader(val_spec(Split((path,), (6,), {}, TrainSamples.scan([path])), rank=0, world_size=1,
                                     workers=workers))
    assert re.search(expected, loader_error(val))


def test_loader_workers_ignore_sigterm_from_others_but_not_from_their_parent():
    """SLURM's SIGTERM (another sender) leaves a worker running; its parent's SIGTERM (what
    multiprocessing sends at exit) ends it, or a process exiting on a loader error hangs."""
    import multiprocessing
    import subprocess

    context = multiprocessing.get_context("fork")
    requests, replies = context.Pipe()

    def worker(connection):
        loader.ignore_sigterm(0)
        while True:
            connection.send(connection.recv())  # echo: proves it is alive and running

    process = context.Process(target=worker, args=(replies,), daemon=True)
    process.start()
    try:
        requests.send("before")
        assert requests.recv() == "before"
        subprocess.run(["kill", "-TERM", str(process.pid)], check=True)  # sent by another process
        requests.send("after a stranger's SIGTERM")
        assert requests.recv() == "after a stranger's SIGTERM"
        process.terminate()  # SIGTERM from the parent
        process.join(timeout=60)
        assert process.exitcode == 1
    finally:
        if process.is_alive():
            process.kill()
