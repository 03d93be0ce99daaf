"""The manifest: it accounts for every input, records each sample's byte range, refuses a manifest
or shards of another format with the command that rewrites them, and verification notices damage."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from flashnet.data import checksums, shards, sources, tarfiles
from flashnet.data.manifest import build_manifest, load_sample_ranges, read_shard_samples, verify_manifest
from flashnet.data.sources import DataError

SHARD_COUNT = {"train": 4, "val": 2}  # 32 train and 12 val images, 8 per shard



def test_manifest_accounts_for_every_input(official_results):
    for split in sources.SPLITS:
        manifest = json.loads(official_results.manifest_path(split).read_text())
        keys = [key for key, _ in official_results.samples(split)]
        assert manifest["samples"] == len(keys) == len(set(keys)) == sum(s["samples"] for s in manifest["shards"])
        assert manifest["samples"] + len(manifest["rejected"]) == manifest["found"] == manifest["expected"]
        assert {item["key"] for item in manifest["converted"]} <= set(keys)
        assert (manifest["classes"], manifest["wnids"]) == (4, sorted(manifest["wnids"]))
        assert [s["name"] for s in manifest["shards"]] == [f"{split}-{i:06d}.tar" for i in range(SHARD_COUNT[split])]
        for shard, path in zip(manifest["shards"], official_results.shard_paths(split)):
            assert shard["bytes"] == path.stat().st_size and shard["sha256"] == checksums.sha256_file(path)
        assert verify_manifest(official_results.manifest_path(split), full=True) == manifest
        assert (manifest["format"], manifest["shard_format"]) == ("flashnet-manifest/3", shards.SHARD_FORMAT)


@pytest.fixture
def shard_copy(official_results, tmp_path):
    """A copy of the official train shards and manifest, to damage."""
    dest = tmp_path / "train"
    shutil.copytree(official_results.shard_dir("train"), dest)
    return dest


def test_manifest_records_each_samples_byte_range(official_results):
    """sample-ranges.npy: one [start, end) per sample in shard order; each range read from its
    shard holds that sample (keys and bytes as tarfile reads them)."""
    for split in sources.SPLITS:
        path = official_results.manifest_path(split)
        manifest = verify_manifest(path, full=True)
        ranges = load_sample_ranges(path, manifest)
        assert ranges.shape == (manifest["samples"], 2)
        assert manifest["sample_ranges"]["name"] == "sample-ranges.npy"
        position = 0
        for shard, shard_path in zip(manifest["shards"], official_results.shard_paths(split)):
            data = shard_path.read_bytes()
            for (key, fields), (start, end) in zip(read_shard_samples(shard_path),
                                                   ranges[position:position + shard["samples"]], strict=True):
                [sample] = tarfiles.tar_samples(io.BytesIO(data[start:end]), str(shard_path))
                assert (sample["__key__"], sample["jpg"], sample["cls"]) == (key, fields["jpg"], fields["cls"])
            position += shard["samples"]


OTHER_FORMATS = {
    "format 1 (no sample ranges)": ("flashnet-manifest/1", None),
    "format 2 (no shard format: what flashnet wrote before it had one)": ("flashnet-manifest/2", None),
    "shards of another format": ("flashnet-manifest/3", "flashnet-shards/1"),
}


@pytest.mark.parametrize("formats", OTHER_FORMATS.values(), ids=OTHER_FORMATS.keys())
def test_a_manifest_of_another_format_is_refused_naming_both_and_the_command_that_rewrites_it(shard_copy, formats):
    """Every reader goes through load_manifest: verify_manifest before and in every job, and so the
    train loader's sample ranges (data/epochs.py) and the sha256 check (data/checksums.py)."""
    path = shard_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"], manifest["shard_format"] = formats
    if manifest["shard_format"] is None:
        del manifest["shard_format"]
    path.write_text(json.dumps(manifest))
    expected = (f"{path}: manifest format {formats[0]!r} of shard format {formats[1]!r}, this flashnet reads "
                f"manifest format 'flashnet-manifest/3' of shard format '{shards.SHARD_FORMAT}'; rewrite shards "
                "and manifests: snakemake --forcerun write_shards --until manifest")
    for full in (False, True):
        with pytest.raises(DataError) as refused:
            verify_manifest(path, full=full)
        assert str(refused.value) == expected


@pytest.mark.parametrize("text", ['{"format": "flashnet-index/1"}', "[1, 2]"])
def test_json_that_is_no_manifest_is_refused_as_such(tmp_path, text):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(DataError, match=r"manifest.json: not a flashnet manifest \(format '?[\w/-]*'?\)$"):
        verify_manifest(path)


def test_build_manifest_refuses_a_conversion_job_of_another_shard_format(official_results, sample_root, stage):
    run = stage(sample_root / "official")
    run.index("val")
    run.write("val")
    part = run.part_paths("val")[1]
    record = json.loads(part.read_text())
    del record["shard_format"]  # as the jobs of a flashnet before the format had a name wrote it
    part.write_text(json.dumps(record))
    with pytest.raises(DataError, match=rf"^{part}: shards of format None, this flashnet reads .* of shard format "
                                        rf"'{shards.SHARD_FORMAT}'; rewrite shards and manifests: snakemake "
                                        "--forcerun write_shards --until manifest$"):
        run.manifest("val")


def test_verify_manifest_catches_missing_or_changed_sample_ranges(shard_copy):
    ranges = shard_copy / "sample-ranges.npy"
    with open(ranges, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    verify_manifest(shard_copy / "manifest.json")  # same size
    with pytest.raises(DataError, match="sample-ranges.npy: differs from what the manifest recorded"):
        verify_manifest(shard_copy / "manifest.json", full=True)
    ranges.unlink()
    with pytest.raises(DataError, match="lists sample ranges 'sample-ranges.npy', which are missing"):
        verify_manifest(shard_copy / "manifest.json")


def test_verify_manifest_catches_a_missing_shard(shard_copy):
    (shard_copy / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"manifest.json: lists train-000002.tar, which is missing"):
        verify_manifest(shard_copy / "manifest.json")


def test_verify_manifest_catches_a_shard_of_the_wrong_size(shard_copy):
    path = shard_copy / "train-000001.tar"
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match=rf"train-000001.tar: {size + 512} bytes, the manifest says {size}"):
        verify_manifest(shard_copy / "manifest.json")


def test_verify_manifest_full_catches_a_changed_byte(shard_copy):
    path = shard_copy / "train-000003.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x01  # inside the first image, same size
    path.write_bytes(bytes(data))
    verify_manifest(shard_copy / "manifest.json")  # sizes alone cannot tell
    with pytest.raises(DataError, match=r"train-000003.tar: sha256 differs from .*manifest.json"):
        verify_manifest(shard_copy / "manifest.json", full=True)


def test_verify_manifest_catches_accounting_that_does_not_add_up(shard_copy):
    path = shard_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["found"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="samples \\+ rejected != found"):
        verify_manifest(path)
    with pytest.raises(DataError, match="manifest missing"):
        verify_manifest(shard_copy / "nothing.json")


def test_build_manifest_catches_a_shard_changed_after_its_job(official_results, sample_root, stage):
    run = stage(sample_root / "official")
    run.index("val")
    run.write("val")
    path = run.shard_dir("val") / "val-000001.tar"
    data = bytearray(path.read_bytes())
    data[1500] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val-000001.tar: sha256 differs from what its conversion job recorded"):
        run.manifest("val")


def test_an_input_gone_after_indexing_stops_the_job_naming_it_and_leaves_no_shard(layout_copy, stage):
    data_dir = layout_copy("extracted")
    run = stage(data_dir)
    run.index("val")
    plan = shards.load_plan(run.index_path("val"))
    gone = data_dir / plan.index.files[plan.index.file_ids[0]]  # the first sample of the first shard
    gone.unlink()
    with pytest.raises(DataError, match=rf"{gone}: cannot be read \(No such file or directory\)"):
        run.write("val")
    assert not list(run.shard_dir("val").glob("*.tar*")) and not list(run.shard_dir("val").glob(".*"))


def test_build_manifest_needs_every_jobs_record(official_results, sample_root, stage):
    run = stage(sample_root / "official")
    run.index("train")
    run.write("train", part=0)
    with pytest.raises(DataError, match="no conversion job wrote train-000002.tar, train-000003.tar"):
        build_manifest(run.index_path("train"), run.part_paths("train")[:1], run.manifest_path("train"), 10)
