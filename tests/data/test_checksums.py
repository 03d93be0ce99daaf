"""Shards checked against their manifest's sha256 values, with a per-shard cache."""

from __future__ import annotations

import shutil

import pytest

from flashnet.data import checksums
from flashnet.data.manifest import verify_manifest
from flashnet.data.sources import DataError


@pytest.fixture
def shard_copy(official_results, tmp_path):
    dest = tmp_path / "train"
    shutil.copytree(official_results.shard_dir("train"), dest)
    return dest


@pytest.fixture
def hashed(monkeypatch):
    """The names of the shards hashed, in calls to sha256_file."""
    names = []
    real = checksums.sha256_file

    def counting(path):
        if path.suffix == ".tar":  # the manifest's small sample-ranges file is hashed on each full check
            names.append(path.name)
        return real(path)

    monkeypatch.setattr(checksums, "sha256_file", counting)
    return names


def flip_a_byte(path, offset=2000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_unchanged_shard_is_hashed_once_then_trusted_by_its_stat(shard_copy, hashed, monkeypatch):
    monkeypatch.setattr(checksums, "RACY_WINDOW_S", -1.0)  # these shards were written a moment ago
    manifest_path = shard_copy / "manifest.json"
    manifest = verify_manifest(manifest_path, full=True)
    assert sorted(hashed) == sorted(s["name"] for s in manifest["shards"])
    assert checksums.cache_path(manifest_path).name == "manifest.verified.json"
    hashed.clear()
    verify_manifest(manifest_path, full=True)
    assert hashed == []
    flip_a_byte(shard_copy / "train-000002.tar")  # same size; the write changes its ctime
    with pytest.raises(DataError, match=r"train-000002.tar: sha256 differs from .*manifest.json"):
        verify_manifest(manifest_path, full=True)
    assert hashed == ["train-000002.tar"]


def test_a_shard_written_within_the_racy_window_is_never_trusted_from_the_cache(shard_copy, hashed):
    manifest_path = shard_copy / "manifest.json"
    verify_manifest(manifest_path, full=True)
    hashed.clear()
    verify_manifest(manifest_path, full=True)
    assert len(hashed) == len(list(shard_copy.glob("*.tar"))), "written just now: hashed again"


def test_a_damaged_cache_is_ignored(shard_copy, monkeypatch):
    monkeypatch.setattr(checksums, "RACY_WINDOW_S", -1.0)
    manifest_path = shard_copy / "manifest.json"
    checksums.cache_path(manifest_path).write_text("{not json")
    verify_manifest(manifest_path, full=True)
    flip_a_byte(shard_copy / "train-000000.tar")
    checksums.cache_path(manifest_path).write_text("[]")
    with pytest.raises(DataError, match="train-000000.tar: sha256 differs"):
        verify_manifest(manifest_path, full=True)
