"""Shards from the index: the same bytes from every layout and every run, a seeded order that mixes
classes, odd files converted and bad ones rejected (and counted), a manifest that accounts for every
input, verification that notices damage, and conversion jobs that survive being killed."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from flashnet.data import shards, sources
from flashnet.data.manifest import read_shard_samples
from flashnet.data.sources import DataError

LAYOUTS = ("official", "extracted", "kaggle")
SHARD_COUNT = {"train": 4, "val": 2}  # 32 train and 12 val images, 8 per shard


def source_images(sample_root: Path, split: str) -> dict[str, bytes]:
    """key → the input file's bytes, from the extracted layout's folders."""
    return {p.stem: p.read_bytes() for p in (sample_root / "extracted" / split).rglob("*.JPEG")}


def without_sources(manifest: dict) -> dict:
    """The manifest less what depends on the layout rather than on the images."""
    kept = {k: v for k, v in manifest.items() if k not in ("layout", "expected")}
    for listing in ("converted", "rejected"):
        kept[listing] = [{k: v for k, v in item.items() if k != "source"} for item in manifest[listing]]
    return kept


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --------------------------------------------------------------------------- same data, same shards


def test_three_layouts_give_byte_identical_shards_and_the_same_manifest(sample_root, stage):
    runs = {layout: stage(sample_root / layout, name=layout) for layout in LAYOUTS}
    for split in sources.SPLITS:
        manifests = {layout: run.run(split) for layout, run in runs.items()}
        digests = {layout: run.digests(split) for layout, run in runs.items()}
        assert len(digests["official"]) == SHARD_COUNT[split]
        assert digests["extracted"] == digests["official"] == digests["kaggle"], split
        assert without_sources(manifests["extracted"]) == without_sources(manifests["official"]) \
            == without_sources(manifests["kaggle"]), split
        assert {layout: m["layout"] for layout, m in manifests.items()} == {layout: layout for layout in LAYOUTS}
        # Only the official devkit and the Kaggle val CSV promise counts; plain folders promise none.
        assert [manifests[layout]["expected"] for layout in LAYOUTS] == \
            ([32, None, None] if split == "train" else [12, None, 12])


def test_same_inputs_and_seed_give_the_same_bytes(official_results, sample_root, stage):
    again = stage(sample_root / "official")
    for split in sources.SPLITS:
        again.run(split)
        assert again.digests(split) == official_results.digests(split)
        assert again.manifest_path(split).read_bytes() == official_results.manifest_path(split).read_bytes()


def test_another_seed_gives_another_order_of_the_same_samples(official_results, sample_root, stage):
    other = stage(sample_root / "official", seed=1)
    other.run("train")
    ours = [key for key, _ in official_results.samples("train")]
    theirs = [key for key, _ in other.samples("train")]
    assert theirs != ours and sorted(theirs) == sorted(ours)
    assert other.digests("train") != official_results.digests("train")


def test_every_shard_mixes_classes(official_results):
    for path in official_results.shard_paths("train"):
        labels = [int(fields["cls"]) for _, fields in read_shard_samples(path)]
        assert len(labels) == 8 and len(set(labels)) >= 3, (path.name, labels)


def test_samples_keep_their_bytes_key_and_label(official_results, sample_root):
    source = source_images(sample_root, "train")
    index = sources.index_split(sample_root / "official", "train")
    label = dict(zip(index.keys, index.labels))
    converted = {item["key"] for item in json.loads(official_results.manifest_path("train").read_text())["converted"]}
    samples = dict(official_results.samples("train"))
    assert sorted(samples) == sorted(source)
    for key, fields in samples.items():
        assert set(fields) == {"jpg", "cls"}
        assert fields["cls"] == str(label[key]).encode()
        assert (fields["jpg"] == source[key]) == (key not in converted), key


def test_members_are_plain_reproducible_tar_entries(official_results):
    with tarfile.open(official_results.shard_paths("val")[0]) as tar:
        members = tar.getmembers()
    assert [m.name.rsplit(".", 1)[1] for m in members] == ["cls", "jpg"] * 8
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(0, "", "", 0o444)}


def test_shards_are_the_bytes_tarfile_writes(official_results):
    """The writer fills tarfile's own header into a template: the same samples written with
    tarfile's stream writer, as WebDataset's TarWriter drives it, give the same bytes."""
    path = official_results.shard_paths("train")[0]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as tar:
        for key, fields in read_shard_samples(path):
            for extension in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(fields[extension]), 0, 0o444, "", ""
                tar.addfile(info, io.BytesIO(fields[extension]))
    assert buffer.getvalue() == path.read_bytes()


def test_gnu_tar_reads_the_shards(official_results):
    listing = subprocess.run(["tar", "-tvf", str(official_results.shard_paths("val")[1])], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert len(listing) == 8  # 4 samples × (cls, jpg)
    assert all(line.startswith("-r--r--r-- 0/0") and "1970-01-01 00:00" in line for line in listing)


def test_reader_keeps_one_file_open_at_a_time(sample_root, tmp_path):
    """The folder layouts have a file per sample (1.28 million for ImageNet): a reader that kept
    them open would run out of file descriptors."""
    index = sources.index_split(sample_root / "extracted", "train")
    shards.save_index(index, sample_root / "extracted", 32, 0, tmp_path / "index.json")
    reader = shards.SampleReader(shards.load_plan(tmp_path / "index.json"))
    before = len(os.listdir("/proc/self/fd"))
    peak = 0
    for position in range(len(index)):
        reader.read(position)
        peak = max(peak, len(os.listdir("/proc/self/fd")) - before)
    reader.close()
    assert peak == 1 and len(os.listdir("/proc/self/fd")) == before


def test_images_over_the_decompression_bomb_limit_are_rejected_saying_so(sample_root, monkeypatch):
    """Issue 14: a valid photo over the limit was called "unreadable"."""
    jpeg = source_images(sample_root, "val")["ILSVRC2012_val_00000001"]
    width, height = decoded(jpeg).size
    png = io.BytesIO()
    decoded(jpeg).save(png, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 - 1)
    with pytest.raises(shards.Rejected, match=rf"^{width}×{height} image is larger than 1599 pixels \(PIL's "
                                              r"decompression-bomb limit\); set shards.max_side to shrink"):
        shards.prepare_image(jpeg, None, 90)
    with pytest.raises(shards.Rejected, match=rf"^{width}×{height} image is larger than 1599 pixels"):
        shards.prepare_image(png.getvalue(), 32, 90)


def test_a_jpeg_over_the_limit_is_decoded_scaled_down_when_max_side_shrinks_it(sample_root, monkeypatch):
    """Issue 14: with max_side set, such a photo was rejected although it would be shrunk anyway."""
    jpeg = source_images(sample_root, "val")["ILSVRC2012_val_00000001"]
    original = decoded(jpeg).convert("RGB")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", original.width * original.height // 2)
    out, reason, resized = shards.prepare_image(jpeg, 32, 90)
    small = decoded(out)
    assert (reason, resized, max(small.size)) == (None, True, 32)
    assert abs(small.width / small.height - original.width / original.height) < 0.05  # rounding only
    reference = original.resize(small.size, Image.LANCZOS)
    difference = np.abs(np.asarray(small, dtype=float) - np.asarray(reference, dtype=float))
    assert difference.mean() < 12.0


# --------------------------------------------------------------------------- the index file


def test_index_file_round_trips_and_fixes_the_shards(official_results, sample_root):
    plan = shards.load_plan(official_results.index_path("train"))
    index = sources.index_split(sample_root / "official", "train")
    assert plan.index.keys == shards.shuffled(index, 0).keys != index.keys
    assert (plan.split, plan.seed, plan.samples_per_shard, plan.shard_count) == ("train", 0, 8, 4)
    assert plan.data_dir == (sample_root / "official").resolve()
    assert [plan.shard_positions(s) for s in range(4)] == [range(0, 8), range(8, 16), range(16, 24), range(24, 32)]


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5])
def test_conversion_jobs_cover_every_shard_once_in_contiguous_ranges(official_results, parts):
    plan = shards.load_plan(official_results.index_path("train"))
    ranges = [plan.part_shards(part, parts) for part in range(parts)]
    assert [s for r in ranges for s in r] == [0, 1, 2, 3]
    assert all(r.step == 1 for r in ranges)
    with pytest.raises(ValueError, match="outside"):
        plan.part_shards(parts, parts)


def test_load_plan_refuses_other_json(tmp_path):
    (tmp_path / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match=r"index.json: not a flashnet index \(format 'something-else'\)"):
        shards.load_plan(tmp_path / "index.json")


# --------------------------------------------------------------------------- odd and bad images


def test_odd_files_are_converted_to_rgb_jpegs_and_listed(official_results):
    manifest = json.loads(official_results.manifest_path("train").read_text())
    reasons = {item["reason"] for item in manifest["converted"]}
    assert reasons == {"CMYK JPEG converted to RGB", "PNG file converted to an RGB JPEG", "greyscale JPEG converted to RGB"}
    samples = dict(official_results.samples("train"))
    for item in manifest["converted"]:
        assert item["source"].startswith("ILSVRC2012_img_train.tar/") and item["source"].endswith(f"{item['key']}.JPEG")
        image = decoded(samples[item["key"]]["jpg"])
        assert (image.format, image.mode) == ("JPEG", "RGB")
    assert manifest["rejected"] == [] and manifest["resized"] == 0


def test_prepare_image_keeps_rgb_jpegs_and_converts_the_rest(sample_root):
    images = source_images(sample_root, "train")
    kinds = {}
    for key, data in images.items():
        out, reason, resized = shards.prepare_image(data, None, 90)
        kinds[key] = reason
        assert resized is False
        assert (out == data) == (reason is None)
        assert decoded(out).mode == "RGB" and decoded(out).format == "JPEG"
    assert Counter(kinds.values()) == {None: 29, "CMYK JPEG converted to RGB": 1,
                                       "PNG file converted to an RGB JPEG": 1, "greyscale JPEG converted to RGB": 1}


@pytest.mark.parametrize("damage, reason", [
    (lambda jpeg, kit: b"", "empty file (0 bytes)"),
    (lambda jpeg, kit: kit.truncated_jpeg(jpeg), "unreadable image: "),
    (lambda jpeg, kit: kit.corrupt_jpeg(jpeg), "Corrupt JPEG data"),
    (lambda jpeg, kit: jpeg[:2] + b"\0" * 200 + jpeg[202:], "unreadable image: "),
    (lambda jpeg, kit: b"GIF89a but no image follows", "unreadable image: "),
])
def test_prepare_image_rejects_what_cannot_be_decoded(sample_root, kit, damage, reason):
    jpeg = source_images(sample_root, "val")["ILSVRC2012_val_00000001"]
    with pytest.raises(shards.Rejected, match=re.escape(reason)):
        shards.prepare_image(damage(jpeg, kit), None, 90)


def test_corrupt_data_the_loader_would_refuse_is_rejected(sample_root, kit):
    """The loader decodes with libjpeg-turbo through simplejpeg, which raises on corrupt entropy
    data that PIL decodes without complaint: the check must refuse what training would crash on."""
    corrupt = kit.corrupt_jpeg(source_images(sample_root, "val")["ILSVRC2012_val_00000001"])
    decoded(corrupt)  # PIL: no error
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(corrupt)
    with pytest.raises(shards.Rejected):
        shards.prepare_image(corrupt, None, 90)


def test_header_check_finds_truncation_but_not_corrupt_data(sample_root, kit):
    """check: header reads headers and the end-of-image marker only: cheaper, and blind to damage
    inside the compressed data (the default decode check is not)."""
    jpeg = source_images(sample_root, "val")["ILSVRC2012_val_00000001"]
    assert shards.prepare_image(jpeg, None, 90, check="header") == (jpeg, None, False)
    with pytest.raises(shards.Rejected, match="no end-of-image marker"):
        shards.prepare_image(kit.truncated_jpeg(jpeg), None, 90, check="header")
    with pytest.raises(shards.Rejected, match="empty file"):
        shards.prepare_image(b"", None, 90, check="header")
    corrupt = kit.corrupt_jpeg(jpeg)
    assert shards.prepare_image(corrupt, None, 90, check="header")[0] == corrupt
    with pytest.raises(shards.Rejected):
        shards.prepare_image(corrupt, None, 90, check="decode")


def damage_train_images(data_dir: Path, kit) -> dict[str, str]:
    """Make three train images unreadable (one each: truncated, corrupt, empty); returns their sources."""
    files = sorted((data_dir / "train").rglob("*.JPEG"))
    changes = {files[5]: kit.truncated_jpeg, files[13]: kit.corrupt_jpeg, files[21]: lambda data: b""}
    for path, change in changes.items():
        path.write_bytes(change(path.read_bytes()))
    return {str(path.relative_to(data_dir)): path.stem for path in changes}


def test_unreadable_train_images_are_skipped_and_listed_with_the_reason(layout_copy, stage, kit):
    data_dir = layout_copy("extracted")
    damaged = damage_train_images(data_dir, kit)
    manifest = stage(data_dir, max_rejected=3).run("train")

    rejected = {item["source"]: item for item in manifest["rejected"]}
    assert sorted(rejected) == sorted(damaged)
    assert {damaged[s]: item["key"] for s, item in rejected.items()} == {k: k for k in damaged.values()}
    reasons = sorted(item["reason"] for item in manifest["rejected"])
    assert reasons[0] == "empty file (0 bytes)"
    assert any("Corrupt JPEG data" in r for r in reasons) and any("truncated" in r.lower() or "premature" in r.lower()
                                                                   for r in reasons)
    assert (manifest["samples"], manifest["found"], len(manifest["rejected"])) == (29, 32, 3)


def test_more_rejections_than_max_rejected_fail_the_manifest(layout_copy, stage, kit):
    data_dir = layout_copy("extracted")
    damaged = damage_train_images(data_dir, kit)
    run = stage(data_dir, max_rejected=2)
    with pytest.raises(DataError) as error:
        run.run("train")
    message = str(error.value)
    assert "train: 3 unreadable images exceed shards.max_rejected=2" in message
    assert all(source in message for source in damaged)
    assert not run.manifest_path("train").exists()


def test_any_unreadable_val_image_fails_the_manifest_naming_it(layout_copy, stage, kit):
    data_dir = layout_copy("kaggle")
    path = data_dir / sources.KAGGLE_ROOT / "val" / "ILSVRC2012_val_00000007.JPEG"
    path.write_bytes(kit.truncated_jpeg(path.read_bytes()))
    run = stage(data_dir, max_rejected=100)
    with pytest.raises(DataError) as error:
        run.run("val")
    message = str(error.value)
    assert message.startswith("val: 1 unreadable image(s), and val accuracy needs every one: ")
    assert "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000007.JPEG: unreadable image: " in message
    assert not run.manifest_path("val").exists()


def test_max_side_reencodes_only_larger_images(layout_copy, stage, sample_root):
    run = stage(layout_copy("extracted"), max_side=60)
    manifest = run.run("train")
    source = source_images(sample_root, "train")
    larger = {key for key, data in source.items() if max(decoded(data).size) > 60}
    converted = {item["key"] for item in manifest["converted"]}
    assert 0 < len(larger) < len(source)
    assert manifest["resized"] == len(larger)

    samples = dict(run.samples("train"))
    assert sorted(samples) == sorted(source)
    for key, fields in samples.items():
        image = decoded(fields["jpg"])
        if key in larger:
            assert max(image.size) == 60 and image.mode == "RGB", key
            original = decoded(source[key]).size
            assert abs(image.size[0] / image.size[1] - original[0] / original[1]) < 0.05, key
        elif key not in converted:
            assert fields["jpg"] == source[key], key


# --------------------------------------------------------------------------- every mode PIL opens

_RAMP = np.linspace(0.0, 1.0, 96 * 64).reshape(64, 96)  # a smooth ramp: JPEG keeps it within a level or two


def _png_or_tiff(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    rgb = np.stack([_RAMP * 255, 255 - _RAMP * 255, np.full_like(_RAMP, 90)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB").quantize(64)
    return image, np.asarray(image.convert("RGB"), dtype=np.float64)


def _source(mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image in ``mode`` and the 8-bit RGB pixels a correct conversion gives."""
    grey8 = np.repeat((_RAMP * 255)[..., None], 3, axis=-1)
    if mode == "I;16":
        return Image.fromarray(np.rint(_RAMP * 65535).astype(np.uint16)), grey8
    if mode == "I":
        return Image.fromarray(np.rint(_RAMP * (2**31 - 1)).astype(np.int32)), grey8
    if mode == "F":
        return Image.fromarray(_RAMP.astype(np.float32)), grey8
    if mode == "P":
        return _palette_image()
    if mode == "1":
        bits = _RAMP > 0.5
        return Image.fromarray(bits), np.repeat(bits[..., None] * 255.0, 3, axis=-1)
    if mode in ("RGBA", "LA"):
        grey = (_RAMP * 255).astype(np.uint8)
        alpha = np.full_like(grey, 128)
        channels = [grey, 255 - grey, np.full_like(grey, 60), alpha] if mode == "RGBA" else [grey, alpha]
        image = Image.fromarray(np.stack(channels, axis=-1))
        colour = np.stack(channels[:3], axis=-1) if mode == "RGBA" else grey8
        return image, colour.astype(np.float64)
    return Image.fromarray((_RAMP * 255).astype(np.uint8)), grey8


@pytest.mark.parametrize("mode, fmt", [
    ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
    ("1", "PNG"), ("L", "PNG"),
])
def test_every_mode_converts_to_the_pixels_of_its_source(mode, fmt):
    """Issue 14, case 4: 16-bit greyscale was clipped at 255 (near white) instead of scaled."""
    image, expected = _source(mode)
    data = _png_or_tiff(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    out, reason, _ = shards.prepare_image(data, None, 95)
    pixels = np.asarray(decoded(out).convert("RGB"), dtype=np.float64)
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).mean() < 3.0, (mode, fmt, pixels.mean(), expected.mean())
    assert reason.startswith(f"{fmt} file converted to an RGB JPEG")
    if mode in ("I;16", "I", "F"):
        assert reason.endswith("greyscale scaled to 8 bits)"), reason


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A folder on its own tiny tmpfs (needs root, as the SLURM tests do); unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_leaves_no_temporary_shard_and_says_so_in_one_line(sample_root, stage, small_tmpfs, capsys):
    """Issue 14, case 5: discard() flushed before unlinking, hit ENOSPC again, left the temporary
    shard behind and reported a chained traceback without the shard's path."""
    from flashnet import cli

    run = stage(sample_root / "official")
    run.index("train")
    index = small_tmpfs / "index.json"
    shutil.copy(run.index_path("train"), index)
    code = cli.main(["write-shards", str(index), "--part", "0", "--parts", "1", "--out",
                     str(small_tmpfs / "parts" / "0.json")])
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress line
    assert code == 2
    assert re.fullmatch(rf"flashnet write-shards: error: {small_tmpfs}/train-00000\d\.tar: no space left on device "
                        rf"in {small_tmpfs} while writing this shard \(its temporary file was removed\); free space "
                        r"there and rerun", err), err
    assert not list(small_tmpfs.glob(".*.tmp-*"))
