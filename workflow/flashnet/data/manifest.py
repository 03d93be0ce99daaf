"""The manifest: every shard re-read and checked against the index and its job's record, every input
accounted for, and the contract between sharding and training.

Written + rejected = found, and found = what the dataset's metadata promises. Beside the manifest,
``sample-ranges.npy`` holds every sample's byte range in its shard (int64 [start, end), in shard
order), so the train loader reads any sample by one positioned read; with ~1,000 samples per shard,
a rank's few hundred samples of an epoch come from hundreds of shards (see :mod:`.epochs`). The
manifest names it with its size and sha256. Checking shards against the manifest's sha256 before a
job uses them is :mod:`.checksums`.

The manifest names its own format and its shards' format (:data:`.shards.SHARD_FORMAT`); a reader
refuses a manifest of any other pair, naming both and the command that rewrites shards and manifest.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..files import atomic_path, write_json
from ..progress import progress
from . import checksums
from .checksums import sha256_file
from .shards import SHARD_FORMAT, ShardPlan, load_plan
from .sources import DataError
from .tarfiles import sample_byte_ranges

# 2: every train sample's byte range in SAMPLE_RANGES beside the manifest (real epochs read by range).
# 3: names its shards' format (shard_format); part records name it too.
MANIFEST_FORMAT = "flashnet-manifest/3"
SAMPLE_RANGES = "sample-ranges.npy"
# What rewrites the shards and the manifest of both splits, and nothing after them. --forcerun alone
# would also retrain every run; --until stops at the manifests.
REWRITE_COMMAND = "snakemake --forcerun write_shards --until manifest"


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
        for record in _read_part(Path(path))["shards"]:
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
        "shard_format": SHARD_FORMAT,
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
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, manifest, sort_keys=True)
    return manifest


def _read_part(path: Path) -> dict[str, Any]:
    """A conversion job's record, refused if its shards are of another format than this flashnet's."""
    part = json.loads(path.read_text())
    if part.get("shard_format") != SHARD_FORMAT:
        raise _other_format(path, f"shards of format {part.get('shard_format')!r}")
    return part


def _other_format(path: Path, found: str) -> DataError:
    """Shards or a manifest another flashnet wrote: not trusted, and the one command that fixes it."""
    return DataError(f"{path}: {found}, this flashnet reads manifest format {MANIFEST_FORMAT!r} of shard format "
                     f"{SHARD_FORMAT!r}; rewrite shards and manifests: {REWRITE_COMMAND}")


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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate(ranges) if ranges else np.zeros((0, 2), np.int64))
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
    formats = (manifest.get("format"), manifest.get("shard_format")) if isinstance(manifest, dict) else (None, None)
    if not str(formats[0]).startswith("flashnet-manifest/"):
        raise DataError(f"{path}: not a flashnet manifest (format {formats[0]!r})")
    if formats != (MANIFEST_FORMAT, SHARD_FORMAT):
        raise _other_format(path, f"manifest format {formats[0]!r} of shard format {formats[1]!r}")
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
