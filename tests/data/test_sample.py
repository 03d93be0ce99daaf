"""The sample-data generator: counts, real JPEGs of the asked size, the official layout's exact
structure (nested tars, a devkit scipy reads), IDs out of sorted-WNID order, same seed ⇒ same bytes."""

from __future__ import annotations

import csv
import dataclasses
import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from flashnet.data import sample, sources
from flashnet.data.sources import DataError



def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def official_images(root: Path) -> dict[str, bytes]:
    """key → bytes of every image in an official-layout data_dir (train and val)."""
    images = {}
    for _, inner in tar_members((root / sources.OFFICIAL_TRAIN).read_bytes()):
        images.update({Path(name).stem: data for name, data in tar_members(inner)})
    images.update({Path(name).stem: data for name, data in tar_members((root / sources.OFFICIAL_VAL).read_bytes())})
    return images


def test_counts_match_the_spec_in_every_layout(sample_root, kit):
    official = official_images(sample_root / "official")
    extracted = {p.stem: p for p in (sample_root / "extracted").rglob("*.JPEG")}
    kaggle = {p.stem: p for p in (sample_root / "kaggle").rglob("*.JPEG")}
    assert len(official) == len(extracted) == len(kaggle) == kit.COUNTS["train"] + kit.COUNTS["val"] == 44
    per_class = Counter(p.parent.name for p in (sample_root / "extracted" / "train").rglob("*.JPEG"))
    assert sorted(per_class.values()) == [8, 8, 8, 8]
    per_class = Counter(p.parent.name for p in (sample_root / "extracted" / "val").rglob("*.JPEG"))
    assert sorted(per_class.values()) == [3, 3, 3, 3]


def test_layouts_hold_the_same_bytes_under_the_same_names(sample_root):
    official = official_images(sample_root / "official")
    for layout in ("extracted", "kaggle"):
        files = {p.stem: p.read_bytes() for p in (sample_root / layout).rglob("*.JPEG")}
        assert files == official, layout


def test_images_are_real_jpegs_of_the_asked_size_except_the_planted_odd_files(sample_root, kit):
    kinds = Counter()
    for key, data in official_images(sample_root / "official").items():
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert 40 <= image.width <= 80 and 40 <= image.height <= 80, key
            kinds[(image.format, image.mode)] += 1
    # One odd file each in the classes with ILSVRC2012_ID 1, 2 and 3, as the real train set has them.
    assert kinds == {("JPEG", "RGB"): 41, ("JPEG", "CMYK"): 1, ("PNG", "RGB"): 1, ("JPEG", "L"): 1}


def test_jpeg_quality_is_the_asked_one(kit):
    cls = sample.sample_classes(kit.SPEC)[0]
    image = sample.draw_image(cls, np.random.default_rng(0), kit.SPEC)
    q90, q50 = sample.encode(image, "jpeg", 90), sample.encode(image, "jpeg", 50)
    # PIL's quantisation table for quality 90 starts with 3 (libjpeg's 16 scaled by (200 - 2·90)/100).
    with Image.open(io.BytesIO(q90)) as decoded:
        assert decoded.quantization[0][0] == 3
    assert len(q50) < len(q90)


def test_official_train_tar_is_a_tar_of_per_class_tars(sample_root):
    root = sample_root / "official"
    outer = tar_members((root / sources.OFFICIAL_TRAIN).read_bytes())
    wnids = [name.removesuffix(".tar") for name, _ in outer]
    assert [name for name, _ in outer] == [f"{w}.tar" for w in wnids]
    assert wnids == sorted(wnids)  # image-net.org's tar lists the classes in WNID order
    for wnid, inner in zip(wnids, (data for _, data in outer)):
        names = [name for name, _ in tar_members(inner)]
        assert len(names) == 8
        assert all(n.startswith(f"{wnid}_") and n.endswith(".JPEG") and "/" not in n for n in names)


def test_official_val_tar_numbers_its_files_from_one(sample_root):
    names = [name for name, _ in tar_members((sample_root / "official" / sources.OFFICIAL_VAL).read_bytes())]
    assert names == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 13)]


def test_devkit_meta_mat_is_readable_by_scipy_with_the_synsets_fields(sample_root, kit):
    with tarfile.open(sample_root / "official" / sources.OFFICIAL_DEVKIT, "r:gz") as tar:
        meta = tar.extractfile(sources.DEVKIT_META).read()
        truth = tar.extractfile(sources.DEVKIT_VAL_TRUTH).read().decode()
    synsets = loadmat(io.BytesIO(meta))["synsets"]  # as torchvision and the devkit's own code read it
    assert synsets.shape == (6, 1)
    assert set(synsets.dtype.names) >= {"ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                        "wordnet_height", "num_train_images"}
    leaves = [s for s in synsets[:, 0] if int(s["num_children"].squeeze()) == 0]
    assert [int(s["ILSVRC2012_ID"].squeeze()) for s in leaves] == [1, 2, 3, 4]
    assert [int(s["num_train_images"].squeeze()) for s in leaves] == [8, 8, 8, 8]
    classes = sample.sample_classes(kit.SPEC)
    assert [str(s["WNID"].squeeze()) for s in leaves] == [c.wnid for c in classes]
    # Ground truth: one ILSVRC2012_ID per line, val image 1 first, each class val_per_class times.
    lines = truth.splitlines()
    assert len(lines) == 12 and all(line.strip() == line for line in lines)
    assert Counter(int(line) for line in lines) == {1: 3, 2: 3, 3: 3, 4: 3}
    assert [int(line) for line in lines] != sorted(int(line) for line in lines)  # shuffled class order


def test_ilsvrc_ids_are_not_in_sorted_wnid_order():
    for seed in range(5):
        classes = sample.sample_classes(sample.SampleSpec(classes=4, seed=seed))
        by_id = [c.wnid for c in sorted(classes, key=lambda c: c.ilsvrc_id)]
        assert by_id != sorted(by_id), seed
        assert all(sources.WNID.fullmatch(w) for w in by_id)


def test_kaggle_metadata_files(sample_root, kit):
    root = sample_root / "kaggle"
    classes = sorted(sample.sample_classes(kit.SPEC), key=lambda c: c.wnid)
    assert (root / sources.KAGGLE_SYNSETS).read_text().splitlines() == [f"{c.wnid} {c.words}" for c in classes]
    with (root / sources.KAGGLE_VAL_SOLUTION).open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    assert [r[0] for r in rows[1:]] == [f"ILSVRC2012_val_{n:08d}" for n in range(1, 13)]
    # Each val image's label in the CSV is the class the devkit's ground truth gives it.
    truth = (sample_root / "extracted" / "val")
    wnid_of = {p.stem: p.parent.name for p in truth.rglob("*.JPEG")}
    assert {r[0]: r[1].split()[0] for r in rows[1:]} == wnid_of


def test_same_seed_same_bytes_other_seed_other_bytes(sample_root, tmp_path, kit):
    again = tmp_path / "again"
    sample.write_sample_data(again, kit.SPEC, layouts=sample.LAYOUTS)
    assert {k: kit.sha256(v) for k, v in all_files(again).items()} == \
        {k: kit.sha256(v) for k, v in all_files(sample_root).items()}

    other = tmp_path / "other"
    sample.write_sample_data(other, dataclasses.replace(kit.SPEC, seed=1), layouts=("official",))
    first = all_files(sample_root / "official")
    assert all(all_files(other)[name] != first[name] for name in first)


def test_unknown_layout_is_refused(tmp_path, kit):
    with pytest.raises(ValueError, match="unknown layout"):
        sample.write_sample_data(tmp_path, kit.SPEC, layouts=("official", "zip"))


def test_the_generator_writes_only_into_an_empty_folder_or_its_own(tmp_path, kit):
    """Issue 14, case 1: it must never add its tars to a user's data set."""
    user = tmp_path / "imagenet"
    (user / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(DataError, match=f"^{user}: not empty and not written by the sample-data generator"):
        sample.write_sample_data(user, kit.SPEC)
    assert sorted(p.name for p in user.iterdir()) == ["train"]
    own = tmp_path / "sample"
    sample.write_sample_data(own, kit.SPEC)
    sample.write_sample_data(own, kit.SPEC)  # its own folder: rewritten
    assert (own / sample.MARKER).exists()
