"""Tests of flashnet.data.loader: batch counts, resume determinism and exact-once val against the
real shard format; the image ops against torchvision's own transforms.

The shards are made once per module by the project's own steps (sample data → index → write
shards → manifest) from small generated images, so the loader reads exactly what training reads.
Samples are recognised in the output by content: a val sample's centre crop is a deterministic
function of its JPEG, so matching output images to the crops computed per sample shows which
samples came out, and how often.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from flashnet.data import loader, sample, shards, sources

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
    manifest = shards.build_manifest(index_path, [part], manifest_path, max_rejected=0)
    paths = loader.shard_paths(manifest_path, manifest)
    samples = {key: (fields["jpg"], int(fields["cls"])) for path in paths
               for key, fields in shards.read_shard_samples(Path(path))}
    return Split(paths, tuple(s["samples"] for s in manifest["shards"]), samples)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Split]:
    """24 train samples in shards of 5 (5,5,5,5,4); 21 val samples in shards of 4 (4,4,4,4,4,1),
    so some ranks and workers get more samples than others, and some none."""
    root = tmp_path_factory.mktemp("loader")
    spec = sample.SampleSpec(classes=3, train_per_class=8, val_per_class=7, min_side=40, max_side=90,
                             odd_files=False, seed=0)
    sample.write_sample_data(root / "images", spec, layouts=("extracted",))
    return {"train": build_split(root / "images", root / "shards", "train", 5),
            "val": build_split(root / "images", root / "shards", "val", 4)}


def drawn_jpeg(seed: int, min_side: int, max_side: int, mode: str = "jpeg") -> bytes:
    spec = sample.SampleSpec(min_side=min_side, max_side=max_side)
    cls = sample.sample_classes(spec)[seed % spec.classes]
    return sample.encode(sample.draw_image(cls, np.random.default_rng([seed, 99]), spec), mode, 90)


def torchvision_decode(jpeg: bytes, mode=ImageReadMode.RGB) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=mode)


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# --------------------------------------------------------------------------- train


def train_spec(split: Split, workers: int = 0, **changes) -> loader.TrainStreamSpec:
    spec = loader.TrainStreamSpec(
        shards=split.shards, seed=0, epoch=0, rank=0, steps=STEPS, batch_size=BATCH, image_size=IMAGE_SIZE,
        crop_scale=(0.25, 1.0), shuffle_buffer=6, workers=max(workers, 1),
    )
    return dataclasses.replace(spec, **changes)


def train_batches(spec: loader.TrainStreamSpec, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.train_loader(spec, workers))


def assert_same_batches(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for i, ((images, labels), (images_expected, labels_expected)) in enumerate(zip(actual, expected)):
        assert torch.equal(labels, labels_expected), f"batch {i}: labels differ"
        assert torch.equal(images, images_expected), f"batch {i}: images differ"


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_rank_yields_steps_full_batches(data, workers):
    known_labels = {label for _, label in data["train"].samples.values()}
    for rank in (0, 1):
        spec = train_spec(data["train"], workers, rank=rank)
        batches = train_batches(spec, workers)
        assert len(batches) == STEPS == len(loader.TrainBatches(spec))
        for images, labels in batches:
            assert images.shape == (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == torch.uint8
            assert labels.shape == (BATCH,) and labels.dtype == torch.long
            assert set(labels.tolist()) <= known_labels


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_yields_the_tail_of_the_epoch(data, workers):
    """Batches from start_batch=k equal batches k.. of the whole epoch, for k inside a round of
    workers, on its boundary (k = W) and just after; ``__len__`` stays the whole epoch (Lightning
    counts the batches already done itself)."""
    full = train_batches(train_spec(data["train"], workers), workers)
    streams = max(workers, 1)
    for k in sorted({1, streams, streams + 1, STEPS - 1}):
        spec = train_spec(data["train"], workers, start_batch=k)
        assert len(loader.TrainBatches(spec)) == STEPS
        assert_same_batches(train_batches(spec, workers), full[k:])


def test_zero_and_one_worker_give_the_same_batches(data):
    assert_same_batches(train_batches(train_spec(data["train"], 1), 1), train_batches(train_spec(data["train"], 0), 0))


def test_direct_iteration_matches_the_loader_workers(data):
    """Outside DataLoader workers, TrainBatches interleaves its streams as the workers would."""
    for start in (0, 2):
        spec = train_spec(data["train"], 3, start_batch=start)
        assert_same_batches(list(loader.TrainBatches(spec)), train_batches(spec, 3))


def test_batches_are_a_function_of_seed_epoch_and_rank(data):
    base = train_batches(train_spec(data["train"]), 0)
    assert_same_batches(train_batches(train_spec(data["train"]), 0), base)
    for change in ({"epoch": 1}, {"rank": 1}, {"seed": 1}):
        other = train_batches(train_spec(data["train"], **change), 0)
        differing = sum(not torch.equal(a[0], b[0]) for a, b in zip(other, base))
        assert differing == STEPS, f"{change}: only {differing} of {STEPS} batches differ"


def test_a_stream_resamples_all_shards_by_its_seed(data):
    """A stream draws shards with replacement, endlessly: every sample turns up, the sequence is a
    function of (seed, epoch, rank, stream), and labels are the samples' own."""
    split = data["train"]

    def keys(spec, stream, n=300):
        samples = loader._stream_samples(spec, stream)
        drawn = [next(samples) for _ in range(n)]
        assert all(int(s["cls"]) == split.samples[s["__key__"]][1] for s in drawn)
        assert [s["__index__"] for s in drawn] == list(range(n))  # the position seeds the crop
        return [s["__key__"] for s in drawn]

    spec = train_spec(split, 2)
    first = keys(spec, 0)
    assert set(first) == set(split.samples)
    assert keys(spec, 0) == first
    assert keys(spec, 1) != first
    assert keys(dataclasses.replace(spec, epoch=1), 0) != first


# --------------------------------------------------------------------------- val


def test_val_assignment_hand_computed():
    # Shards of 5, 3, 4, 2, 6 samples; 2 ranks, 2 workers each, batches of 2.
    # rank 0 gets shards 0, 2, 4: worker 0 → 0, 4 (11 samples, 6 batches); worker 1 → 2 (4, 2)
    # rank 1 gets shards 1, 3:    worker 0 → 1 (3 samples, 2 batches);    worker 1 → 3 (2, 1)
    assignment, padding = loader.val_assignment((5, 3, 4, 2, 6), world_size=2, workers=2, batch_size=2)
    assert assignment == [[[0, 4], [2]], [[1], [3]]]
    assert padding == [0, 5]
    # No workers is one stream per rank; a rank without shards pads all the way.
    assignment, padding = loader.val_assignment((5, 3), world_size=3, workers=0, batch_size=2)
    assert assignment == [[[0]], [[1]], [[]]]
    assert padding == [0, 1, 3]


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
    spec = loader.ValSpec(shards=split.shards, shard_samples=split.shard_samples, rank=rank, world_size=world_size,
                          batch_size=BATCH, image_size=IMAGE_SIZE, resize=VAL_RESIZE, workers=workers)
    return dataclasses.replace(spec, **changes)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_val_reads_every_sample_exactly_once(data, world_size, workers):
    split = data["val"]
    crops = expected_val_crops(split)
    _, padding = loader.val_assignment(split.shard_samples, world_size, workers, BATCH)
    seen: list[str] = []
    batch_counts = []
    for rank in range(world_size):
        batches = list(loader.val_loader(val_spec(split, rank, world_size, workers)))
        batch_counts.append(len(batches))
        assert sum(not valid.any() for _, _, valid in batches) == padding[rank]
        for images, labels, valid in batches:
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


def test_val_batches_do_not_depend_on_where_they_are_made(data):
    """Iterated directly (no DataLoader), ValBatches still batches each worker's shards on their
    own, so the batch count is the one the padding was planned for."""
    spec = val_spec(data["val"], rank=0, world_size=2, workers=3)
    direct = list(loader.ValBatches(spec))
    through_loader = list(loader.val_loader(spec))
    assert len(direct) == len(through_loader)
    key = lambda batch: (batch[0].numpy().tobytes(), batch[1].tolist())  # noqa: E731
    assert sorted(map(key, direct)) == sorted(map(key, through_loader))


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
    assert [sorted(s) for s in loader.shard_samples(str(path))] == [["__key__", "cls", "jpg"]] * 8

    trapped = Split((str(path),), (8,), {})
    for workers in (0, 2):
        assert len(train_batches(train_spec(trapped, workers, steps=3), workers)) == 3
        val = list(loader.val_loader(val_spec(trapped, rank=0, world_size=1, workers=workers)))
        assert sum(int(valid.sum()) for _, _, valid in val) == 8
    assert not marker.exists(), "the loader unpickled a field it should never have read"


# --------------------------------------------------------------------------- shard reader


def test_shard_samples_match_tarfile(data):
    for path in data["train"].shards + data["val"].shards:
        ours = [(s["__key__"], s["jpg"], s["cls"]) for s in loader.shard_samples(path)]
        reference = [(key, fields["jpg"], fields["cls"]) for key, fields in shards.read_shard_samples(Path(path))]
        assert ours == reference


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_shard_samples_read_long_names_and_skip_folders(tmp_path, tar_format):
    """pax and GNU long-name headers, ustar's name prefix, a folder entry and a name without a
    field are all handled as WebDataset groups them."""
    folder = "a" * 60 + "/" + "b" * 60  # over tar's 100-byte name field
    members = {f"{folder}/x01.jpg": b"J1", f"{folder}/x01.CLS": b"3", f"{folder}/x01.txt": b"unread",
               "README": b"no field", "x02.jpg": b"J2", "x02.cls": b"4"}
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    assert list(loader.shard_samples(str(path))) == [
        {"__key__": f"{folder}/x01", "jpg": b"J1", "cls": b"3"},
        {"__key__": "x02", "jpg": b"J2", "cls": b"4"},
    ]


def test_shard_samples_reject_damaged_shards(data, tmp_path):
    raw = Path(data["val"].shards[0]).read_bytes()
    damaged = bytearray(raw)
    damaged[2 * 512 + 10] ^= 0xFF  # in the name of the second header (after the cls header and its data)
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(loader.ShardError, match="checksum"):
        list(loader.shard_samples(str(tmp_path / "damaged.tar")))
    (tmp_path / "cut.tar").write_bytes(raw[:512 * 3 + 100])  # cut inside the first jpg
    with pytest.raises(loader.ShardError, match="cut short"):
        list(loader.shard_samples(str(tmp_path / "cut.tar")))


# --------------------------------------------------------------------------- crop boxes


def box_statistics(boxes: np.ndarray, width: int, height: int) -> dict[str, np.ndarray]:
    left, top, w, h = boxes.T.astype(float)
    return {"area": w * h / (width * height), "log_aspect": np.log(w / h),
            "centre_x": (left + w / 2) / width, "centre_y": (top + h / 2) / height}


def test_random_resized_crop_box_stays_within_scale_ratio_and_image():
    width, height, scale, ratio = 400, 300, (0.08, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    boxes = np.array([loader.random_resized_crop_box(width, height, scale, rng) for _ in range(4000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    # w and h are rounded to whole pixels, so area and aspect may pass the bounds by that much.
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * width * height).all()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * width * height).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()


def test_random_resized_crop_box_falls_back_to_the_largest_centred_crop():
    rng = np.random.default_rng(0)
    # A full-area crop never fits a 10:1 image within 3/4..4/3: centred 4:3 of the full height.
    assert loader.random_resized_crop_box(1000, 100, (1.0, 1.0), rng) == (433, 0, 133, 100)
    assert loader.random_resized_crop_box(100, 1000, (1.0, 1.0), rng) == (0, 433, 100, 133)
    # An impossible area on an image whose own aspect is allowed: the whole image.
    assert loader.random_resized_crop_box(400, 300, (2.0, 2.0), rng) == (0, 0, 400, 300)


def test_random_resized_crop_box_draws_like_torchvision():
    """Two-sample KS distance to torchvision's RandomResizedCrop.get_params, per statistic."""
    width, height, n = 400, 300, 4000
    rng = np.random.default_rng(1)
    ours = np.array([loader.random_resized_crop_box(width, height, (0.08, 1.0), rng) for _ in range(n)])
    torch.manual_seed(1)
    image = torch.empty(3, height, width)
    theirs = []
    for _ in range(n):
        top, left, h, w = transforms.RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
        theirs.append((left, top, w, h))
    ours_stats, theirs_stats = box_statistics(ours, width, height), box_statistics(np.array(theirs), width, height)
    for name in ours_stats:
        assert ks_2samp(ours_stats[name], theirs_stats[name]).statistic < 0.05, name


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (300, 300), (67, 225), (662, 698), (1000, 90)])
@pytest.mark.parametrize("resize,size", [(256, 224), (73, 64), (36, 32)])
def test_center_crop_box_is_the_region_torchvision_keeps(width, height, resize, size):
    """Resize + CenterCrop applied to an image of pixel numbers: the kept corner says where the
    crop starts in the resized image; the resized size says how resized pixels map back."""
    resized = v2.Resize(resize, antialias=True)(torch.zeros(1, height, width))
    resized_h, resized_w = resized.shape[1:]
    numbers = torch.arange(resized_h * resized_w).reshape(1, resized_h, resized_w)
    corner = int(v2.CenterCrop(size)(numbers)[0, 0, 0])
    crop_top, crop_left = divmod(corner, resized_w)
    kept_w, kept_h = min(size, resized_w), min(size, resized_h)
    expected = (crop_left * width / resized_w, crop_top * height / resized_h,
                kept_w * width / resized_w, kept_h * height / resized_h)
    left, top, w, h = loader.center_crop_box(width, height, resize, size)
    edges = (left, top, left + w, top + h)
    expected_edges = (expected[0], expected[1], expected[0] + expected[2], expected[1] + expected[3])
    assert max(abs(a - b) for a, b in zip(edges, expected_edges)) <= 0.5 + 1e-9, (edges, expected_edges)


# --------------------------------------------------------------------------- decoding


def test_dct_scale_leaves_the_last_factor_of_two_to_the_resize():
    assert loader.dct_scale(100, 100, 224) == 8  # must be enlarged: full size
    assert loader.dct_scale(895, 2000, 224) == 8
    assert loader.dct_scale(896, 896, 224) == 4  # 1/2 leaves 448 = 2 x 224
    assert loader.dct_scale(1792, 1800, 224) == 2
    assert loader.dct_scale(3584, 4000, 224) == 1
    assert loader.dct_scale(20000, 20000, 224) == 1  # 1/8 is the smallest there is


def reference_crop(jpeg: bytes, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """torchvision: full-size decode, then resized_crop with antialias; HWC."""
    left, top, w, h = box
    return TF.resized_crop(torchvision_decode(jpeg), top, left, h, w, [size, size], antialias=True).permute(1, 2, 0)


def test_decode_crop_is_close_to_torchvision_at_every_dct_scale():
    """Mean absolute difference, in grey levels, to a full decode + antialiased resize. Boxes on the
    DCT block grid isolate the decoder and the filters (< 2 levels at every scale). Random boxes add
    the snap of a reduced decode's box to its coarser pixel grid: at most 1/4 of an output pixel
    (the reducing gap is 2), which this texture (a random colour field every 32 px, near the
    Nyquist frequency of the smallest outputs) turns into 3-4 levels at 1/8 scale."""
    jpeg = drawn_jpeg(3, 600, 640)
    height, width, _, _ = loader.simplejpeg.decode_jpeg_header(jpeg)
    rng = np.random.default_rng(0)
    for size, eighths, bound in ((128, 8, 2), (100, 4, 3), (56, 2, 3), (32, 1, 4)):
        side = 8 * 2 * size // eighths if eighths < 8 else 320  # the smallest crop at that scale
        aligned = (8, 16, side + 16, side + 8)
        assert aligned[0] + aligned[2] <= width and aligned[1] + aligned[3] <= height
        assert loader.dct_scale(aligned[2], aligned[3], size) == eighths
        assert mean_abs_difference(loader.decode_crop(jpeg, aligned, size), reference_crop(jpeg, aligned, size)) < 2
        differences = []
        while len(differences) < 10:
            box = loader.random_resized_crop_box(width, height, (0.08, 1.0), rng)
            if loader.dct_scale(box[2], box[3], size) == eighths:
                differences.append(mean_abs_difference(loader.decode_crop(jpeg, box, size),
                                                       reference_crop(jpeg, box, size)))
        assert np.mean(differences) < bound, (eighths, differences)


def test_decode_crop_never_enlarges_a_reduced_decode(monkeypatch):
    """Spy on the resize: whenever the crop reaching it is smaller than the box (a DCT-scaled
    decode), it still has at least twice the output size each way."""
    jpeg = drawn_jpeg(4, 600, 640)
    height, width, _, _ = loader.simplejpeg.decode_jpeg_header(jpeg)
    crops = []
    interpolate = torch.nn.functional.interpolate

    def spy(input, *args, **kwargs):
        crops.append(tuple(input.shape[-2:]))
        return interpolate(input, *args, **kwargs)

    monkeypatch.setattr(loader.F, "interpolate", spy)
    rng = np.random.default_rng(0)
    reduced = 0
    for size in (16, 32, 64, 112):
        for _ in range(30):
            left, top, w, h = loader.random_resized_crop_box(width, height, (0.08, 1.0), rng)
            loader.decode_crop(jpeg, (left, top, w, h), size)
            crop_h, crop_w = crops[-1]
            eighths = loader.dct_scale(w, h, size)
            assert abs(crop_w - w * eighths / 8) <= 1 and abs(crop_h - h * eighths / 8) <= 1
            if eighths < 8:
                reduced += 1
                assert min(crop_w, crop_h) >= 2 * size
    assert reduced > 30  # the scaled path was exercised


def test_decode_crop_flip_mirrors_the_crop():
    jpeg = drawn_jpeg(1, 120, 160)
    box = (10, 7, 90, 80)
    assert torch.equal(loader.decode_crop(jpeg, box, 48, flip=True), loader.decode_crop(jpeg, box, 48).flip(1))


def test_decode_crop_handles_greyscale_jpegs():
    jpeg = drawn_jpeg(2, 200, 240, mode="grey")
    assert Image.open(io.BytesIO(jpeg)).mode == "L"
    box = (20, 30, 150, 120)
    out = loader.decode_crop(jpeg, box, 64)
    assert out.shape == (64, 64, 3) and out.dtype == torch.uint8
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    grey = torchvision_decode(jpeg, ImageReadMode.GRAY)
    reference = TF.resized_crop(grey, box[1], box[0], box[3], box[2], [64, 64], antialias=True)[0]
    assert mean_abs_difference(out[..., 0], reference) < 2


def test_normalize_values_and_layout():
    images = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8).expand(2, 3, 5, 3).contiguous()  # NHWC
    mean, std = np.array(loader.IMAGENET_MEAN), np.array(loader.IMAGENET_STD)
    expected = (np.array([0, 128, 255]) / 255 - mean) / std  # per channel
    for memory_format in (torch.channels_last, torch.contiguous_format):
        x = loader.normalize(images, memory_format)
        assert x.shape == (2, 3, 3, 5) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=memory_format)
        for channel in range(3):
            assert torch.allclose(x[:, channel], torch.tensor(expected[channel], dtype=torch.float32), atol=1e-5)


# --------------------------------------------------------------------------- decoding on the device


def test_device_decode_path_matches_the_cpu_path(data):
    """decode_on_device (torchvision's decoder; here on CPU, nvJPEG on a GPU) after workers that
    only pick crops gives the CPU path's batches: same shapes and labels, close pixels."""
    cpu = torch.device("cpu")
    for workers in (0, 2):
        plain = train_batches(train_spec(data["train"], workers), workers)
        encoded = train_batches(train_spec(data["train"], workers, decode_on_device=True), workers)
        assert len(encoded) == len(plain) == STEPS
        for batch, (images, labels) in zip(encoded, plain):
            assert set(batch) == {"jpegs", "boxes", "flips", "labels"}
            decoded, device_labels = loader.decode_on_device(batch, IMAGE_SIZE, cpu)
            assert decoded.shape == images.shape and decoded.dtype == torch.uint8
            assert torch.equal(device_labels, labels)
            assert mean_abs_difference(decoded, images) < 3

    spec = val_spec(data["val"], rank=2, world_size=3, workers=2)  # the rank with a padding batch
    plain = list(loader.val_loader(spec))
    encoded = list(loader.val_loader(dataclasses.replace(spec, decode_on_device=True)))
    assert len(encoded) == len(plain)
    padding = 0
    for batch, (images, labels, valid) in zip(encoded, plain):
        decoded, device_labels = loader.decode_on_device(batch, IMAGE_SIZE, cpu)
        assert torch.equal(batch["valid"], valid) and torch.equal(device_labels, labels)
        if valid.all():
            assert mean_abs_difference(decoded, images) < 3
        else:
            assert not valid.any() and decoded.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
            padding += 1
    assert padding == loader.val_assignment(spec.shard_samples, 3, 2, BATCH)[1][2] == 1
