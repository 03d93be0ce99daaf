"""Tests of flashnet.data.tarfiles: the writer's bytes read back by Python's tarfile, the reader
against tarfile on every header kind tarfile writes, and damaged shards refused by name."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from flashnet.data import tarfiles
from flashnet.data.manifest import read_shard_samples


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    shard = tarfiles.ShardFile(path)
    for key, fields in samples.items():
        shard.add(key, fields)
    shard.finish()
    return path


SAMPLES = {f"n0144{i:04d}_{i}": {"jpg": bytes([i]) * (100 + 37 * i), "cls": str(i).encode()} for i in range(8)}


def test_long_and_non_ascii_keys_get_tarfiles_extended_headers(tmp_path):
    keys = ["k" * 95, "k" * 120, "clé_ünïcode", "n01440764_10026"]
    shard = tarfiles.ShardFile(tmp_path / "odd.tar")
    for key in keys:
        shard.add(key, {"jpg": key.encode() * 3, "cls": b"7"})
    shard.finish()
    assert shard.size % tarfile.RECORDSIZE == 0 == (tmp_path / "odd.tar").stat().st_size - shard.size
    assert [(key, fields) for key, fields in read_shard_samples(tmp_path / "odd.tar")] == \
        [(key, {"cls": b"7", "jpg": key.encode() * 3}) for key in keys]
    assert [s["__key__"] for s in tarfiles.shard_samples(str(tmp_path / "odd.tar"))] == keys


def test_discarded_shard_leaves_nothing(tmp_path):
    shard = tarfiles.ShardFile(tmp_path / "half.tar")
    shard.add("a", {"jpg": b"x", "cls": b"0"})
    shard.discard()
    assert not (tmp_path / "half.tar").exists()


def test_shard_samples_match_tarfile(tmp_path):
    path = str(write_shard(tmp_path / "s.tar", SAMPLES))
    ours = [(s["__key__"], s["jpg"], s["cls"]) for s in tarfiles.shard_samples(path)]
    reference = [(key, fields["jpg"], fields["cls"]) for key, fields in read_shard_samples(Path(path))]
    assert ours == reference == [(key, f["jpg"], f["cls"]) for key, f in SAMPLES.items()]


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
    assert list(tarfiles.shard_samples(str(path))) == [
        {"__key__": f"{folder}/x01", "jpg": b"J1", "cls": b"3"},
        {"__key__": "x02", "jpg": b"J2", "cls": b"4"},
    ]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_sample_byte_ranges_cut_out_each_sample_whole(tmp_path, tar_format):
    """Each range starts at the sample's first header as tarfile finds it (extended headers
    included) and, read and parsed alone, gives exactly that sample."""
    keys = ["k" * 120, "n01440764_10026", "clé"]
    path = tmp_path / "ranges.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i, key in enumerate(keys):
            for field, content in (("cls", str(i).encode()), ("jpg", key.encode() * (50 + 300 * i))):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    with tarfile.open(path) as tar:
        first_headers = [m.offset for m in tar.getmembers() if m.name.endswith(".cls")]
    ranges = tarfiles.sample_byte_ranges(str(path))
    assert [start for start, _ in ranges] == first_headers
    data = path.read_bytes()
    whole = list(tarfiles.shard_samples(str(path)))
    for (start, end), sample in zip(ranges, whole, strict=True):
        assert list(tarfiles.tar_samples(io.BytesIO(data[start:end]), str(path))) == [sample]


def test_shard_samples_refuse_a_sample_with_a_field_twice(tmp_path):
    path = tmp_path / "twice.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "a.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfiles.ShardError, match=r"twice.tar: sample a has two 'jpg' files"):
        list(tarfiles.shard_samples(str(path)))


def test_shard_samples_reject_damaged_shards(tmp_path):
    raw = write_shard(tmp_path / "s.tar", SAMPLES).read_bytes()
    damaged = bytearray(raw)
    damaged[2 * 512 + 10] ^= 0xFF  # in the name of the second header (after the cls header and its data)
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(tarfiles.ShardError, match="damaged.tar: bad tar header checksum"):
        list(tarfiles.shard_samples(str(tmp_path / "damaged.tar")))
    (tmp_path / "cut.tar").write_bytes(raw[:512 * 3 + 50])  # cut inside the first jpg
    with pytest.raises(tarfiles.ShardError, match="cut.tar: .* is cut short"):
        list(tarfiles.shard_samples(str(tmp_path / "cut.tar")))
