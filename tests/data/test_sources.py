"""Indexing the three ImageNet layouts: what each yields, that they agree, torchvision's label
convention, and a clear error naming the file and the problem for every kind of bad input."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from flashnet.data import sources
from flashnet.data.sources import DataError

SOURCE_PREFIX = {
    "official": {"train": "ILSVRC2012_img_train.tar/{wnid}.tar/", "val": "ILSVRC2012_img_val.tar/"},
    "extracted": {"train": "train/{wnid}/", "val": "val/{wnid}/"},
    "kaggle": {"train": "ILSVRC/Data/CLS-LOC/train/{wnid}/", "val": "ILSVRC/Data/CLS-LOC/val/"},
}


def extracted_truth(sample_root: Path, split: str) -> dict[str, tuple[str, bytes]]:
    """key → (WNID, bytes), read straight from the extracted layout's folders."""
    return {p.stem: (p.parent.name, p.read_bytes()) for p in (sample_root / "extracted" / split).rglob("*.JPEG")}


# --------------------------------------------------------------------------- the layouts


@pytest.mark.parametrize("layout", ["official", "extracted", "kaggle"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_each_layout_indexes_every_file_with_its_label_and_bytes(sample_root, layout, split):
    data_dir = sample_root / layout
    index = sources.index_split(data_dir, split)
    truth = extracted_truth(sample_root, split)

    assert sources.detect_layout(data_dir) == layout
    assert (index.split, index.layout) == (split, layout)
    assert index.wnids == sorted({wnid for wnid, _ in truth.values()}) and len(index.wnids) == 4
    assert index.keys == sorted(truth) and len(index) == {"train": 32, "val": 12}[split]
    assert index.labels == [index.wnids.index(truth[key][0]) for key in index.keys]
    for i, key in enumerate(index.keys):
        with open(data_dir / index.files[index.file_ids[i]], "rb") as f:
            f.seek(index.offsets[i])
            assert f.read(index.sizes[i]) == truth[key][1], key
        prefix = SOURCE_PREFIX[layout][split].format(wnid=truth[key][0])
        assert index.sources[i] == f"{prefix}{key}.JPEG"
    # What each layout's own metadata promises: the devkit (official), the val CSV (Kaggle);
    # folders alone promise a count only for the full 1000-class ImageNet.
    expected = {"official": len(index), "extracted": None, "kaggle": len(index) if split == "val" else None}
    assert index.expected == expected[layout]


def test_official_samples_are_read_in_place_from_the_tars(sample_root):
    train = sources.index_split(sample_root / "official", "train")
    val = sources.index_split(sample_root / "official", "val")
    assert train.files == [sources.OFFICIAL_TRAIN] and set(train.file_ids) == {0}
    assert val.files == [sources.OFFICIAL_VAL]
    assert len(set(train.offsets)) == 32 and min(train.offsets) >= 1024  # past the outer and inner headers


def test_layouts_agree_on_everything_but_where_the_bytes_are(sample_root):
    for split in sources.SPLITS:
        indexes = [sources.index_split(sample_root / layout, split) for layout in ("official", "extracted", "kaggle")]
        for other in indexes[1:]:
            for field in ("wnids", "keys", "labels", "sizes"):
                assert getattr(other, field) == getattr(indexes[0], field), (split, other.layout, field)


# --------------------------------------------------------------------------- labels


def test_labels_follow_sorted_wnids_not_ilsvrc2012_ids(tmp_path, kit):
    """A devkit whose ILSVRC2012_ID order (n03…, n01…, n02…) differs from the sorted WNID order."""
    jpeg = b"\xff\xd8 the index never decodes images \xff\xd9"
    synsets = [(1, "n03000003", 2), (2, "n01000001", 2), (3, "n02000002", 2)]
    train = {wnid: [(f"{wnid}_{n}.JPEG", jpeg) for n in (1, 2)] for _, wnid, _ in sorted(synsets, key=lambda s: s[1])}
    val = [(f"ILSVRC2012_val_{n:08d}.JPEG", jpeg) for n in (1, 2, 3, 4)]
    data_dir = kit.write_official(tmp_path / "data", kit.Official(synsets, train, val, truth=[1, 2, 3, 1]))

    index = sources.index_split(data_dir, "val")
    assert index.wnids == ["n01000001", "n02000002", "n03000003"]
    # Val image 1 has ILSVRC2012_ID 1 = n03000003: label 2 (its place in the sorted WNIDs), not 0.
    assert dict(zip(index.keys, index.labels)) == {
        "ILSVRC2012_val_00000001": 2, "ILSVRC2012_val_00000002": 0,
        "ILSVRC2012_val_00000003": 1, "ILSVRC2012_val_00000004": 2,
    }
    train_index = sources.index_split(data_dir, "train")
    assert {key: label for key, label in zip(train_index.keys, train_index.labels)}["n03000003_1"] == 2


def test_labels_match_torchvisions_imagenet_dataset(sample_root, tmp_path, monkeypatch):
    """torchvision's ImageNet (devkit → val folders → ImageFolder) labels the same files the same."""
    imagenet = pytest.importorskip("torchvision.datasets.imagenet")
    # torchvision checks the real archives' md5 sums, which the sample data cannot match.
    monkeypatch.setattr(imagenet, "_verify_archive", lambda *args: None)
    root = tmp_path / "torchvision"
    shutil.copytree(sample_root / "official", root)
    for split in sources.SPLITS:
        theirs = {Path(path).stem: target for path, target in imagenet.ImageNet(str(root), split=split).samples}
        index = sources.index_split(sample_root / "official", split)
        assert dict(zip(index.keys, index.labels)) == theirs
        assert len(theirs) == len(index)


# --------------------------------------------------------------------------- bad input
#
# Each case damages a copy of one layout; the index (the first step) must fail with a DataError
# whose message names the file and the problem, so no shard is ever written from bad input.


def edit_official(change):
    def edit(data_dir: Path, kit) -> None:
        official = kit.read_official(data_dir)
        change(official)
        kit.write_official(data_dir, official)

    return edit


def first_wnid(official) -> str:
    return next(iter(official.train))


def add_val_image(number: int):
    def change(official):
        official.val.append((f"ILSVRC2012_val_{number:08d}.JPEG", official.val[0][1]))

    return change


def rename_train_class(official):
    official.train["n09999999"] = official.train.pop(first_wnid(official))


def drop_train_image(official):
    official.train[first_wnid(official)].pop()


def drop_train_class(official):
    official.train.pop(first_wnid(official))


def unknown_val_id(official):
    official.truth[0] = 99


def drop_last_val_image(official):
    official.val.pop()


def dotdot_val_member(official):
    name, data = official.val[0]
    official.val[0] = (f"../{name}", data)


def absolute_train_member(official):
    members = official.train[first_wnid(official)]
    name, data = members[0]
    members[0] = (f"/tmp/{name}", data)


def same_key_in_two_classes(official):
    first, second = list(official.train)[:2]
    official.train[second][0] = official.train[first][0]


def truncate(name: str, keep: float):
    def edit(data_dir: Path, kit) -> None:
        data = (data_dir / name).read_bytes()
        (data_dir / name).write_bytes(data[: int(len(data) * keep)])

    return edit


def truncate_after_member(name: str, members: int):
    """Cut a tar exactly at a member boundary, losing the end-of-archive blocks and the rest."""

    def edit(data_dir: Path, kit) -> None:
        with tarfile.open(data_dir / name) as tar:
            member = tar.getmembers()[members]
        data = (data_dir / name).read_bytes()
        (data_dir / name).write_bytes(data[: member.offset])

    return edit


def truncate_first_inner_tar(data_dir: Path, kit) -> None:
    """The outer tar intact, but its first member (a class's tar) cut in half."""
    outer = kit.tar_members((data_dir / sources.OFFICIAL_TRAIN).read_bytes())
    name, data = outer[0]
    outer[0] = (name, data[: len(data) // 2])
    (data_dir / sources.OFFICIAL_TRAIN).write_bytes(kit.tar_bytes(outer))


def corrupt_devkit(data_dir: Path, kit) -> None:
    (data_dir / sources.OFFICIAL_DEVKIT).write_bytes(gzip.compress(b"this is no tar")[:-8])


def devkit_without_ground_truth(data_dir: Path, kit) -> None:
    official = kit.read_official(data_dir)
    archive = kit.tar_bytes([(sources.DEVKIT_META, kit.meta_mat(official.synsets))])
    (data_dir / sources.OFFICIAL_DEVKIT).write_bytes(gzip.compress(archive))


def devkit_with_garbage_meta_mat(data_dir: Path, kit) -> None:
    """A meta.mat that is not a MATLAB file at all (scipy raises its own errors on it)."""
    official = kit.read_official(data_dir)
    truth = "\n".join(str(i) for i in official.truth).encode()
    archive = kit.tar_bytes([(sources.DEVKIT_META, b"MATLAB 5.0 MAT-file" + bytes(200)),
                             (sources.DEVKIT_VAL_TRUTH, truth)])
    (data_dir / sources.OFFICIAL_DEVKIT).write_bytes(gzip.compress(archive))


def not_utf8(relative: str):
    def edit(data_dir: Path, kit) -> None:
        path = data_dir / relative
        path.write_bytes(b"\xff\xfe" + path.read_bytes())

    return edit


def remove(relative: str):
    def edit(data_dir: Path, kit) -> None:
        path = data_dir / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return edit


def move_class(split_root: str, to: str):
    def edit(data_dir: Path, kit) -> None:
        root = data_dir / split_root
        (root / sorted(os.listdir(root))[0]).rename(root / to)

    return edit


def copy_across_classes(split_root: str):
    def edit(data_dir: Path, kit) -> None:
        first, second = sorted((data_dir / split_root).iterdir())[:2]
        image = sorted(first.iterdir())[0]
        shutil.copy(image, second / image.name)

    return edit


def dotted_file_name(split_root: str):
    """``<key>.v2.JPEG``: WebDataset splits a sample's key at its first dot, so this key cannot be kept."""

    def edit(data_dir: Path, kit) -> None:
        folder = sorted((data_dir / split_root).iterdir())[0]
        image = sorted(folder.iterdir())[0]
        image.rename(folder / f"{image.stem}.v2.JPEG")

    return edit


def stray_file(relative: str):
    def edit(data_dir: Path, kit) -> None:
        (data_dir / relative).write_bytes(b"x")

    return edit


def add_kaggle_val_image(data_dir: Path, kit) -> None:
    root = data_dir / sources.KAGGLE_ROOT / "val"
    shutil.copy(root / "ILSVRC2012_val_00000001.JPEG", root / "ILSVRC2012_val_00000013.JPEG")


def edit_text(relative: str, old: str, new: str, count: int = 1):
    def edit(data_dir: Path, kit) -> None:
        path = data_dir / relative
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, count))

    return edit


def kaggle_label_unknown_wnid(data_dir: Path, kit) -> None:
    path = data_dir / sources.KAGGLE_VAL_SOLUTION
    lines = path.read_text().splitlines()
    image, _ = lines[1].split(",")
    lines[1] = f"{image},n09999999 1 1 5 5"
    path.write_text("\n".join(lines) + "\n")


def kaggle_extra_row(image: str):
    """One more row in LOC_val_solution.csv, labelled like the first."""

    def edit(data_dir: Path, kit) -> None:
        path = data_dir / sources.KAGGLE_VAL_SOLUTION
        text = path.read_text()
        label = text.splitlines()[1].split(",")[1]
        path.write_text(f"{text}{image},{label}\n")

    return edit


# (layout, split, damage, fragments the message must contain)
BAD_INPUTS = {
    "official val image beyond the ground truth": (
        "official", "val", edit_official(add_val_image(13)),
        ["ILSVRC2012_img_val.tar/ILSVRC2012_val_00000013.JPEG", "no label"]),
    "official ground truth with an unknown ILSVRC2012_ID": (
        "official", "val", edit_official(unknown_val_id),
        [sources.OFFICIAL_DEVKIT, "ILSVRC2012_val_00000001.JPEG", "unknown ILSVRC2012_ID 99"]),
    "official train tar of an unknown WNID": (
        "official", "train", edit_official(rename_train_class),
        ["ILSVRC2012_img_train.tar/n09999999.tar", "not a <wnid>.tar of a class in the devkit"]),
    "official class holding fewer images than the devkit says": (
        "official", "train", edit_official(drop_train_image),
        ["ILSVRC2012_img_train.tar/n0", ".tar: holds 7 images", "num_train_images", "is 8"]),
    "official train tar missing a whole class": (
        "official", "train", edit_official(drop_train_class),
        ["ILSVRC2012_img_train.tar", "no <wnid>.tar", "8 images"]),
    "official val tar holding fewer images than the ground truth": (
        "official", "val", edit_official(drop_last_val_image),
        ["ILSVRC2012_img_val.tar", "holds 11 images", "ground truth lists 12"]),
    "official train tar truncated mid-member": (
        "official", "train", truncate(sources.OFFICIAL_TRAIN, 0.5),
        ["ILSVRC2012_img_train.tar", "truncated"]),
    "official val tar truncated mid-member": (
        "official", "val", truncate(sources.OFFICIAL_VAL, 0.5), ["ILSVRC2012_img_val.tar", "truncated"]),
    "official val tar cut at a member boundary": (
        "official", "val", truncate_after_member(sources.OFFICIAL_VAL, 6),
        ["ILSVRC2012_img_val.tar", "truncated", "ILSVRC2012_val_00000006.JPEG"]),
    "official inner tar truncated": (
        "official", "train", truncate_first_inner_tar, ["ILSVRC2012_img_train.tar/n0", ".tar: truncated"]),
    "official member name with '..'": (
        "official", "val", edit_official(dotdot_val_member),
        ["ILSVRC2012_img_val.tar", "'../ILSVRC2012_val_00000001.JPEG'", "absolute path or '..'"]),
    "official member name that is absolute": (
        "official", "train", edit_official(absolute_train_member),
        ["ILSVRC2012_img_train.tar/n0", "'/tmp/n0", "absolute path or '..'"]),
    "official duplicate key in two classes": (
        "official", "train", edit_official(same_key_in_two_classes), ["duplicate sample key", "ILSVRC2012_img_train.tar/n0"]),
    "official devkit that is not a tar.gz": (
        "official", "train", corrupt_devkit, [sources.OFFICIAL_DEVKIT, "unreadable devkit archive"]),
    "official devkit without the ground truth": (
        "official", "val", devkit_without_ground_truth, [sources.OFFICIAL_DEVKIT, "missing", "ground_truth.txt"]),
    "official devkit whose meta.mat is no MATLAB file": (
        "official", "train", devkit_with_garbage_meta_mat,
        [sources.OFFICIAL_DEVKIT, "data/meta.mat has no usable synsets table"]),
    "official layout missing its devkit": (
        "official", "train", remove(sources.OFFICIAL_DEVKIT), ["official layout is missing", sources.OFFICIAL_DEVKIT]),
    "extracted val folder of an unknown WNID": (
        "extracted", "val", move_class("val", "n09999999"), ["val/n09999999", "unknown WNID"]),
    "extracted folder that is no WNID": (
        "extracted", "train", move_class("train", "goldfish"), ["train/goldfish", "not a WNID"]),
    "extracted file outside the class folders": (
        "extracted", "val", stray_file("val/ILSVRC2012_val_00000099.JPEG"),
        ["val/ILSVRC2012_val_00000099.JPEG", "only <wnid>/ class folders"]),
    "extracted duplicate key in two classes": (
        "extracted", "train", copy_across_classes("train"), ["duplicate sample key", "train/n0"]),
    "extracted file name with a dot in its key": (
        "extracted", "train", dotted_file_name("train"), ["train/n0", ".v2.JPEG", "'.'"]),
    "kaggle val image without a label": (
        "kaggle", "val", add_kaggle_val_image,
        ["ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000013.JPEG", "no label in LOC_val_solution.csv"]),
    "kaggle val label of an unknown WNID": (
        "kaggle", "val", kaggle_label_unknown_wnid, ["LOC_val_solution.csv:2", "unknown WNID n09999999"]),
    "kaggle label without an image": (
        "kaggle", "val", kaggle_extra_row("ILSVRC2012_val_00000099"),
        ["LOC_val_solution.csv", "lists 13 images", "holds 12"]),
    "kaggle val image listed twice": (
        "kaggle", "val", kaggle_extra_row("ILSVRC2012_val_00000005"),
        ["LOC_val_solution.csv:14", "ILSVRC2012_val_00000005 is listed a second time"]),
    "kaggle train folder of an unknown WNID": (
        "kaggle", "train", move_class("ILSVRC/Data/CLS-LOC/train", "n09999999"),
        ["ILSVRC/Data/CLS-LOC/train/n09999999", "unknown WNID", "LOC_synset_mapping.txt"]),
    "kaggle synset mapping with a non-WNID": (
        "kaggle", "train", edit_text(sources.KAGGLE_SYNSETS, "n0", "x0"), ["LOC_synset_mapping.txt:1", "not a WNID"]),
    "kaggle synset mapping that is not UTF-8 text": (
        "kaggle", "train", not_utf8(sources.KAGGLE_SYNSETS), ["LOC_synset_mapping.txt: unreadable", "utf-8"]),
    "kaggle val solution that is not UTF-8 text": (
        "kaggle", "val", not_utf8(sources.KAGGLE_VAL_SOLUTION), ["LOC_val_solution.csv: unreadable", "utf-8"]),
    "kaggle layout missing its val solution": (
        "kaggle", "val", remove(sources.KAGGLE_VAL_SOLUTION), ["Kaggle layout is missing", "LOC_val_solution.csv"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_the_index_naming_the_file_and_the_problem(case, layout_copy, stage, kit):
    layout, split, damage, fragments = BAD_INPUTS[case]
    data_dir = layout_copy(layout)
    damage(data_dir, kit)
    run = stage(data_dir)
    with pytest.raises(DataError) as error:
        run.run(split)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not run.out.exists() or not list(run.out.rglob("*")), "nothing may be written from bad input"


def test_data_dir_that_does_not_exist_or_is_a_file(tmp_path):
    with pytest.raises(DataError, match=r"/missing: does not exist"):
        sources.index_split(tmp_path / "missing", "train")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"/file: is not a directory"):
        sources.index_split(tmp_path / "file", "train")


def test_unreadable_data_dir(tmp_path, monkeypatch):
    # Simulated: the tests may run as root, whom file permissions do not stop.
    data_dir = tmp_path / "locked"
    data_dir.mkdir()
    real_listdir = os.listdir

    def listdir(path="."):
        if Path(path) == data_dir:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(DataError) as error:
        sources.index_split(data_dir, "train")
    assert str(error.value) == f"data_dir {data_dir}: cannot be read (Permission denied)"


def test_layout_matching_none_of_the_three_lists_what_was_expected(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "imagenet.zip").write_bytes(b"")
    with pytest.raises(DataError) as error:
        sources.index_split(tmp_path, "train")
    message = str(error.value)
    for fragment in ("matches none of the ImageNet layouts", sources.OFFICIAL_TRAIN, "train/<wnid>/",
                     sources.KAGGLE_ROOT, "it holds imagenet.zip, train"):
        assert fragment in message


def test_unknown_split(sample_root):
    with pytest.raises(DataError, match="split 'test'"):
        sources.index_split(sample_root / "official", "test")


# --------------------------------------------------------------------------- the listing the workflow watches


@pytest.mark.parametrize("layout, split", [("extracted", "train"), ("extracted", "val"), ("kaggle", "train"),
                                           ("kaggle", "val")])
def test_the_listing_changes_when_a_file_is_added_removed_or_renamed(layout_copy, layout, split):
    """Issue 22, case 7: a file added to a class folder changed none of the index rule's inputs."""
    data_dir = layout_copy(layout)
    root = sources.image_folder(data_dir, layout, split)
    folder = root if layout == "kaggle" and split == "val" else sorted(root.iterdir())[0]  # Kaggle's val is flat
    first = sources.listing_fingerprint(data_dir, split)
    files = len(sources.index_split(data_dir, split))
    assert first.startswith(f"{layout}: {files} files, ")
    assert sources.listing_fingerprint(data_dir, split) == first  # the same tree, the same text
    image = sorted(folder.iterdir())[0]
    added = image.with_name("added_" + image.name)
    shutil.copy(image, added)
    after_adding = sources.listing_fingerprint(data_dir, split)
    assert after_adding.startswith(f"{layout}: {files + 1} files, ")
    added.rename(image.with_name("renamed_" + image.name))
    after_renaming = sources.listing_fingerprint(data_dir, split)
    assert after_renaming not in (first, after_adding)
    image.with_name("renamed_" + image.name).unlink()
    image.unlink()
    assert sources.listing_fingerprint(data_dir, split).startswith(f"{layout}: {files - 1} files, ")


def test_the_listing_does_not_depend_on_where_the_data_lies(layout_copy, tmp_path):
    data_dir = layout_copy("extracted")
    moved = tmp_path / "elsewhere" / "imagenet"
    moved.parent.mkdir()
    shutil.copytree(data_dir, moved, copy_function=shutil.copy2)
    for copy, original in zip(sorted(moved.rglob("*")), sorted(data_dir.rglob("*"))):  # folder times too
        os.utime(copy, ns=(original.stat().st_atime_ns, original.stat().st_mtime_ns))
    assert sources.listing_fingerprint(moved, "val") == sources.listing_fingerprint(data_dir, "val")


def test_the_official_tars_are_watched_as_files(sample_root):
    assert sources.listing_fingerprint(sample_root / "official", "train") == "official"
    assert [sources.images_are_files(sample_root / layout) for layout in ("official", "extracted", "kaggle")] == [
        False, True, True]
