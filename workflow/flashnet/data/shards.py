"""ImageNet index → WebDataset shards → manifest.

The index fixes everything about the shards before any is written: a seeded global shuffle of the
split (so every shard mixes classes) and ``samples_per_shard`` consecutive entries per shard. Each
conversion job writes a contiguous range of shards; a shard appears under its final name only when
complete (write to a temporary name, then rename), and the job's journal records when a shard is
begun and when it is finished, so a rerun skips exactly the shards whose newest journal line says
they were finished with the same settings (and conversion code) and whose sha256 still matches.
The manifest step re-reads every shard and accounts for every input: written + rejected = found,
and found = what the dataset's metadata promises. Image preparation is :mod:`.images`; checking
shards against the manifest's sha256 before a job uses them is :mod:`.checksums`.

Samples: ``__key__`` = the source file's stem, ``jpg`` = its bytes (or an RGB JPEG re-encoding,
listed under ``converted``), ``cls`` = the label as decimal text.

Beside the manifest, ``sample-ranges.npy`` holds every sample's byte range in its shard (int64
[start, end), in shard order), so the train loader reads any sample by one positioned read; with
~1,000 samples per shard, a rank's few hundred samples of an epoch come from hundreds of shards
(see :mod:`.loader`). The manifest names it with its size and sha256 (format 2; a format-1
manifest has no ranges and is refused with the command that rewrites it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..progress import progress
from . import checksums
from .images import CHECKS, Rejected, prepare_image
from .sources import DataError, SplitIndex
from .tarfiles import ShardFile, sample_byte_ranges

INDEX_FORMAT = "flashnet-index/1"
# Part of every journal record's settings: raise it when prepare_image converts differently, so a
# rerun after an upgrade rewrites shards instead of keeping ones the old code converted.
# 2: wide greyscale modes scaled, not clipped; JPEGs over PIL's pixel limit shrunk to max_side.
CONVERSION_VERSION = 2
# 2: every train sample's byte range in SAMPLE_RANGES beside the manifest (real epochs read by range).
MANIFEST_FORMAT = "flashnet-manifest/2"
SAMPLE_RANGES = "sample-ranges.npy"


# --------------------------------------------------------------------------- index


def shuffled(index: SplitIndex, seed: int) -> SplitIndex:
    """The split in a seeded global shuffle of its canonical (key-sorted) order."""
    order = np.random.default_rng([seed, len(index)]).permutation(len(index))
    return index.permuted(order)


def save_index(index: SplitIndex, data_dir: str | Path, samples_per_shard: int, seed: int, path: str | Path) -> None:
    record = {
        "format": INDEX_FORMAT,
        "split": index.split,
        "layout": index.layout,
        "data_dir": str(Path(data_dir).resolve()),
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "expected": index.expected,
        "wnids": index.wnids,
        "files": index.files,
        "samples": {name: getattr(index, name) for name in ("keys", "labels", "file_ids", "offsets", "sizes", "sources")},
    }
    _write_json(path, record)


@dataclasses.dataclass
class ShardPlan:
    """A saved index and the shards it defines."""

    index: SplitIndex
    data_dir: Path
    samples_per_shard: int
    seed: int
    fingerprint: str  # sha256 of the index file: shards made from another index are stale

    @property
    def split(self) -> str:
        return self.index.split

    @property
    def shard_count(self) -> int:
        return -(-len(self.index) // self.samples_per_shard)

    def shard_name(self, shard: int) -> str:
        return f"{self.split}-{shard:06d}.tar"

    def shard_positions(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, len(self.index)))

    def part_shards(self, part: int, parts: int) -> range:
        """The contiguous range of shards conversion job ``part`` of ``parts`` writes."""
        if not 0 <= part < parts:
            raise ValueError(f"part {part} is outside 0..{parts - 1}")
        n = self.shard_count
        return range(part * n // parts, (part + 1) * n // parts)


def load_plan(path: str | Path) -> ShardPlan:
    path = Path(path)
    raw = path.read_bytes()
    record = json.loads(raw)
    if record.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: not a flashnet index (format {record.get('format')!r})")
    samples = record["samples"]
    index = SplitIndex(
        split=record["split"],
        layout=record["layout"],
        wnids=record["wnids"],
        files=record["files"],
        expected=record["expected"],
        **samples,
    )
    return ShardPlan(index, Path(record["data_dir"]), record["samples_per_shard"], record["seed"],
                     hashlib.sha256(raw).hexdigest())


class SampleReader:
    """Reads sample bytes by (file, offset, size) from the files under ``data_dir``.

    One file is kept open at a time: the official layout's samples all lie in one tar, while the
    folder layouts have a file per sample, and keeping those open would run out of file
    descriptors long before ImageNet's 1.28 million.
    """

    def __init__(self, plan: ShardPlan):
        self._plan = plan
        self._data_dir = str(plan.data_dir)  # os.path.join: pathlib costs more than the read itself
        self._file_id: int | None = None
        self._file: Any = None

    def read(self, position: int) -> bytes:
        index = self._plan.index
        file_id = index.file_ids[position]
        if file_id != self._file_id:
            self.close()
            path = os.path.join(self._data_dir, index.files[file_id])
            try:
                self._file = open(path, "rb")
            except OSError as error:
                raise DataError(f"{path}: cannot be read ({error.strerror})") from None
            self._file_id = file_id
        self._file.seek(index.offsets[position])
        data = self._file.read(index.sizes[position])
        if len(data) != index.sizes[position]:
            raise DataError(f"{index.sources[position]}: truncated input ({len(data)} of {index.sizes[position]} bytes)")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file_id, self._file = None, None


# --------------------------------------------------------------------------- writing


def write_shard(plan: ShardPlan, shard: int, reader: SampleReader, out_dir: Path, max_side: int | None,
                quality: int, check: str = "decode") -> dict[str, Any]:
    """Write one shard atomically and return its journal record."""
    index = plan.index
    name = plan.shard_name(shard)
    final = out_dir / name
    for leftover in out_dir.glob(f".{name}.tmp-*"):  # from a job killed while writing this shard
        leftover.unlink(missing_ok=True)
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    converted, rejected, resized, samples = [], [], 0, 0
    shard_file = ShardFile(tmp)
    try:
        for position in plan.shard_positions(shard):
            source = index.sources[position]
            try:
                data, conversion, was_resized = prepare_image(reader.read(position), max_side, quality, check)
            except Rejected as reason:
                rejected.append({"source": source, "key": index.keys[position], "reason": str(reason)})
                continue
            if conversion:
                converted.append({"source": source, "key": index.keys[position], "reason": conversion})
            resized += was_resized
            shard_file.add(index.keys[position], {"jpg": data, "cls": str(index.labels[position]).encode()})
            samples += 1
        digest = shard_file.finish()
    except BaseException as error:
        shard_file.discard()
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise DataError(f"{final}: no space left on device in {out_dir} while writing this shard (its temporary "
                            "file was removed); free space there and rerun") from None
        raise
    os.replace(tmp, final)
    return {"name": name, "samples": samples, "bytes": shard_file.size, "sha256": digest,
            "converted": converted, "rejected": rejected, "resized": resized}


def write_part(index_path: str | Path, part: int, parts: int, out: str | Path, max_side: int | None,
               quality: int, check: str = "decode") -> dict[str, Any]:
    """Write conversion job ``part``'s shards next to the index; skip the ones its journal shows done.

    The journal (``parts/<part>.journal.jsonl``) outlives a killed job (Snakemake deletes only
    declared outputs), so a rerun redoes only what is missing. Before a shard is (re)written the
    journal says so; from then on only a newer "finished" line describes that file, so neither a
    kill between the rename and the journal line nor a switch of settings and back can make a
    rerun keep a shard written with other settings.
    """
    plan = load_plan(index_path)
    out = Path(out)
    shard_dir = Path(index_path).parent
    journal_path = out.with_name(f"{out.stem}.journal.jsonl")
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    settings = {"index": plan.fingerprint, "max_side": max_side, "quality": quality, "check": check,
                "conversion": CONVERSION_VERSION}
    with _part_lock(out.with_name(f"{out.stem}.lock")):
        done = _finished_shards(journal_path, settings)
        records = _write_part_shards(plan, part, parts, shard_dir, journal_path, done, settings)
    result = {"split": plan.split, "part": part, "parts": parts, "shards": records}
    _write_json(out, result)
    return result


@contextlib.contextmanager
def _part_lock(path: Path):
    """One conversion job per part at a time. Jobs outlive a killed Snakemake on SLURM, and its
    rerun submits their parts again: the new job waits for the old one, then its journal shows
    what the old one finished."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{path}: another job is converting this part; waiting for it to end", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file descriptor, also when the process is killed


def _write_part_shards(plan: ShardPlan, part: int, parts: int, shard_dir: Path, journal_path: Path,
                       done: dict[str, dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    max_side, quality, check = settings["max_side"], settings["quality"], settings["check"]
    records = []
    reader = SampleReader(plan)
    try:
        shards = plan.part_shards(part, parts)
        for shard in progress(shards, total=len(shards), desc=f"{plan.split} part {part}", unit="shard"):
            name = plan.shard_name(shard)
            record = done.get(name)
            if record is None or not _is_complete(shard_dir / name, record):
                _append_journal(journal_path, {"name": name, "writing": True})
                record = write_shard(plan, shard, reader, shard_dir, max_side, quality, check)
                record["settings"] = settings
                _append_journal(journal_path, record)
            records.append(record)
    finally:
        reader.close()
    return records


def _is_complete(path: Path, record: dict[str, Any]) -> bool:
    """Whether the shard on disk is the one the journal recorded: its size, then its sha256, so a
    shard damaged since (a flipped byte keeps the size) is written again by any rerun, `--forcerun
    write_shards` included. Hashing (~1 GB/s) costs a fraction of converting the shard again."""
    return path.exists() and path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"]


def _finished_shards(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The journal's records of shards finished with ``settings`` and not begun again since: the
    newest line about a shard is the only one that describes its file."""
    newest = {}
    for record in _read_journal(path):
        newest[record["name"]] = record
    return {name: record for name, record in newest.items() if record.get("settings") == settings}


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's records. A kill can cut short only the last line; it is cut off the file as
    well, or the next record would be glued onto it and lost to every later rerun."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]
    if len(whole) < len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    records = []
    for line in whole.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # damaged on disk: the "writing" line before any record it held still counts
    return records


def _append_journal(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- manifest


def read_shard_samples(path: Path) -> Iterable[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each sample of a shard, in order."""
    current, fields = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            if key != current:
                if current is not None:
                    yield current, fields
                current, fields = key, {}
            fields[extension] = tar.extractfile(member).read()
    if current is not None:
        yield current, fields


def build_manifest(index_path: str | Path, part_paths: list[str | Path], out: str | Path,
                   max_rejected: int) -> dict[str, Any]:
    """Re-read every shard, check it against the index and the jobs' records, account for every
    input file, and write the manifest: the contract between sharding and training."""
    plan = load_plan(index_path)
    index, shard_dir = plan.index, Path(index_path).parent
    records = {}
    for path in part_paths:
        for record in json.loads(Path(path).read_text())["shards"]:
            records[record["name"]] = record
    names = [plan.shard_name(i) for i in range(plan.shard_count)]
    missing = [name for name in names if name not in records]
    if missing:
        raise DataError(f"{shard_dir}: no conversion job wrote {', '.join(missing[:5])}")

    ranges = []
    for shard, name in enumerate(progress(names, total=len(names), desc=f"verify {plan.split}", unit="shard")):
        _verify_shard(plan, shard, shard_dir / name, records[name])
        ranges.append(_shard_ranges(shard_dir / name, records[name]["samples"]))

    shards = [{k: records[n][k] for k in ("name", "samples", "bytes", "sha256")} for n in names]
    converted = [item for n in names for item in records[n]["converted"]]
    rejected = [item for n in names for item in records[n]["rejected"]]
    written = sum(s["samples"] for s in shards)
    if written + len(rejected) != len(index):
        raise DataError(f"{plan.split}: {written} written + {len(rejected)} rejected != {len(index)} found")
    if plan.split == "val" and rejected:
        listing = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:10])
        raise DataError(f"val: {len(rejected)} unreadable image(s), and val accuracy needs every one: {listing}")
    if len(rejected) > max_rejected:
        listing = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:10])
        raise DataError(f"{plan.split}: {len(rejected)} unreadable images exceed shards.max_rejected={max_rejected}: {listing}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "split": plan.split,
        "layout": index.layout,
        "samples": written,
        "found": len(index),
        "expected": index.expected,
        "classes": len(index.wnids),
        "wnids": index.wnids,
        "samples_per_shard": plan.samples_per_shard,
        "seed": plan.seed,
        "resized": sum(records[n]["resized"] for n in names),
        "sample_ranges": _write_ranges(Path(out).parent / SAMPLE_RANGES, ranges),
        "shards": shards,
        "converted": converted,
        "rejected": rejected,
    }
    _write_json(out, manifest)
    return manifest


def _verify_shard(plan: ShardPlan, shard: int, path: Path, record: dict[str, Any]) -> None:
    index = plan.index
    if not path.exists():
        raise DataError(f"{path}: listed by its conversion job but missing")
    if sha256_file(path) != record["sha256"]:
        raise DataError(f"{path}: sha256 differs from what its conversion job recorded")
    rejected = {r["key"] for r in record["rejected"]}
    expected = [(index.keys[p], index.labels[p]) for p in plan.shard_positions(shard) if index.keys[p] not in rejected]
    try:
        found = [(key, fields) for key, fields in read_shard_samples(path)]
    except tarfile.TarError as error:
        raise DataError(f"{path}: unreadable shard ({error})") from None
    if [key for key, _ in found] != [key for key, _ in expected]:
        raise DataError(f"{path}: its samples differ from the index's entries for shard {shard}")
    for (key, fields), (_, label) in zip(found, expected):
        if set(fields) != {"jpg", "cls"} or fields["cls"] != str(label).encode():
            raise DataError(f"{path}: sample {key} has fields {sorted(fields)} or a label other than {label}")


def _shard_ranges(path: Path, samples: int) -> np.ndarray:
    ranges = np.array(sample_byte_ranges(str(path)), dtype=np.int64).reshape(-1, 2)
    if len(ranges) != samples:
        raise DataError(f"{path}: {len(ranges)} sample byte ranges for {samples} samples")
    return ranges


def _write_ranges(path: Path, ranges: list[np.ndarray]) -> dict[str, Any]:
    """Write the samples' byte ranges (before the manifest that names them) and describe them."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.concatenate(ranges) if ranges else np.zeros((0, 2), np.int64))
    os.replace(tmp, path)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def load_sample_ranges(manifest_path: str | Path, manifest: dict[str, Any]) -> np.ndarray:
    """The (samples, 2) byte ranges of a verified manifest, memory-mapped: a rank touches only the
    pages of the samples it reads."""
    return np.load(Path(manifest_path).parent / manifest["sample_ranges"]["name"], mmap_mode="r")


def load_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest missing (run the data stage first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") == "flashnet-manifest/1":
        raise DataError(f"{path}: written by an older flashnet, without the samples' byte ranges the train "
                        "loader reads by; rewrite it: snakemake --forcerun manifest")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a flashnet manifest (format {manifest.get('format')!r})")
    return manifest


def verify_manifest(path: str | Path, full: bool = False) -> dict[str, Any]:
    """Check that the shards a manifest lists are there, whole (sizes; sha256 with ``full``, cached
    per shard: see :mod:`.checksums`), and that its accounting adds up. Training and evaluation run
    it with ``full`` before submitting any job, and without in every job."""
    path = Path(path)
    manifest = load_manifest(path)
    shard_dir = path.parent
    total = 0
    for shard in manifest["shards"]:
        name = shard["name"]
        if Path(name).name != name or not name.endswith(".tar"):
            raise DataError(f"{path}: shard name {name!r} is not a plain .tar file name")
        shard_path = shard_dir / name
        if not shard_path.exists():
            raise DataError(f"{path}: lists {name}, which is missing")
        if shard_path.stat().st_size != shard["bytes"]:
            raise DataError(f"{shard_path}: {shard_path.stat().st_size} bytes, the manifest says {shard['bytes']}")
        total += shard["samples"]
    if total != manifest["samples"]:
        raise DataError(f"{path}: shards hold {total} samples, the manifest says {manifest['samples']}")
    _verify_ranges_file(path, manifest["sample_ranges"], full)
    if manifest["samples"] + len(manifest["rejected"]) != manifest["found"]:
        raise DataError(f"{path}: samples + rejected != found")
    if manifest["expected"] is not None and manifest["found"] != manifest["expected"]:
        raise DataError(f"{path}: found {manifest['found']} images, expected {manifest['expected']}")
    if full:
        checksums.verify_checksums(path, manifest)
    return manifest


def _verify_ranges_file(manifest_path: Path, record: dict[str, Any], full: bool) -> None:
    ranges = manifest_path.parent / record["name"]
    if Path(record["name"]).name != record["name"] or not ranges.exists():
        raise DataError(f"{manifest_path}: lists sample ranges {record['name']!r}, which are missing")
    if ranges.stat().st_size != record["bytes"] or (full and sha256_file(ranges) != record["sha256"]):
        raise DataError(f"{ranges}: differs from what the manifest recorded (rerun the manifest step)")


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: str | Path, record: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
