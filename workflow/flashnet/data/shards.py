"""ImageNet index → WebDataset shards → manifest.

The index fixes everything about the shards before any is written: a seeded global shuffle of the
split (so every shard mixes classes) and ``samples_per_shard`` consecutive entries per shard. Each
conversion job writes a contiguous range of shards; a shard appears under its final name only when
complete (write to a temporary name, then rename), and each finished shard is appended to the
job's journal, so a rerun skips what is done. The manifest step re-reads every shard and accounts
for every input: written + rejected = found, and found = what the dataset's metadata promises.

Samples: ``__key__`` = the source file's stem, ``jpg`` = its bytes (or an RGB JPEG re-encoding,
listed under ``converted``), ``cls`` = the label as decimal text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from ..progress import progress
from .sources import DataError, SplitIndex

INDEX_FORMAT = "flashnet-index/1"
MANIFEST_FORMAT = "flashnet-manifest/1"
# Every shard member gets this timestamp, so the same inputs give byte-identical shards.
SHARD_MTIME = 0


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


# --------------------------------------------------------------------------- images


class Rejected(Exception):
    """An input file that cannot be used as an image; the message is the reason."""


def prepare_image(data: bytes, max_side: int | None, quality: int) -> tuple[bytes, str | None, bool]:
    """Check one input file and return (jpeg bytes, conversion reason or None, resized?).

    RGB JPEGs within ``max_side`` keep their bytes, after an entropy-decoding pass at 1/8 scale
    (libjpeg's DCT scaling) that catches truncated and corrupt files at a fraction of a full
    decode's cost. CMYK or greyscale JPEGs and other formats are decoded and re-encoded as RGB JPEG.
    Raises :class:`Rejected` for what cannot be decoded.
    """
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format, mode, size = image.format, image.mode, image.size
            conversion = _conversion_needed(image_format, mode)
            too_big = max_side is not None and max(size) > max_side
            if conversion is None and not too_big:
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
                return data, None, False
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as error:
        raise Rejected(f"unreadable image: {error}") from None
    rgb = image.convert("RGB")
    if too_big:
        rgb.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), conversion, too_big


def _conversion_needed(image_format: str | None, mode: str) -> str | None:
    if image_format != "JPEG":
        return f"{image_format or 'unknown'} file converted to an RGB JPEG"
    if mode == "CMYK":
        return "CMYK JPEG converted to RGB"
    if mode in ("L", "LA", "1", "I", "I;16"):
        return "greyscale JPEG converted to RGB"
    if mode != "RGB":
        return f"{mode} JPEG converted to RGB"
    return None


class SampleReader:
    """Reads sample bytes by (file, offset, size) from the files under ``data_dir``."""

    def __init__(self, plan: ShardPlan):
        self._plan = plan
        self._open: dict[int, Any] = {}

    def read(self, position: int) -> bytes:
        index = self._plan.index
        file_id = index.file_ids[position]
        if file_id not in self._open:
            path = self._plan.data_dir / index.files[file_id]
            try:
                self._open[file_id] = open(path, "rb")
            except OSError as error:
                raise DataError(f"{path}: cannot be read ({error.strerror})") from None
        f = self._open[file_id]
        f.seek(index.offsets[position])
        data = f.read(index.sizes[position])
        if len(data) != index.sizes[position]:
            raise DataError(f"{index.sources[position]}: truncated input ({len(data)} of {index.sizes[position]} bytes)")
        return data

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


# --------------------------------------------------------------------------- writing


def write_shard(plan: ShardPlan, shard: int, reader: SampleReader, out_dir: Path, max_side: int | None,
                quality: int) -> dict[str, Any]:
    """Write one shard atomically and return its journal record."""
    index = plan.index
    name = plan.shard_name(shard)
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    converted, rejected, resized, samples = [], [], 0, 0
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, user="", group="", mtime=SHARD_MTIME, encoder=False) as writer:
            for position in plan.shard_positions(shard):
                source = index.sources[position]
                try:
                    data, conversion, was_resized = prepare_image(reader.read(position), max_side, quality)
                except Rejected as reason:
                    rejected.append({"source": source, "key": index.keys[position], "reason": str(reason)})
                    continue
                if conversion:
                    converted.append({"source": source, "key": index.keys[position], "reason": conversion})
                resized += was_resized
                writer.write({"__key__": index.keys[position], "jpg": data,
                              "cls": str(index.labels[position]).encode()})
                samples += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return {"name": name, "samples": samples, "bytes": final.stat().st_size, "sha256": sha256_file(final),
            "converted": converted, "rejected": rejected, "resized": resized}


def write_part(index_path: str | Path, part: int, parts: int, out: str | Path, max_side: int | None,
               quality: int) -> dict[str, Any]:
    """Write conversion job ``part``'s shards next to the index; skip the ones its journal shows done.

    The journal (``parts/<part>.journal.jsonl``) outlives a killed job (Snakemake deletes only
    declared outputs), so a rerun redoes only what is missing.
    """
    plan = load_plan(index_path)
    out = Path(out)
    shard_dir = Path(index_path).parent
    journal_path = out.with_name(f"{out.stem}.journal.jsonl")
    settings = {"index": plan.fingerprint, "max_side": max_side, "quality": quality}
    done = {record["name"]: record for record in _read_journal(journal_path) if record.get("settings") == settings}
    records = []
    reader = SampleReader(plan)
    try:
        shards = plan.part_shards(part, parts)
        for shard in progress(shards, total=len(shards), desc=f"{plan.split} part {part}", unit="shard"):
            name = plan.shard_name(shard)
            record = done.get(name)
            if record is None or not _is_complete(shard_dir / name, record):
                record = write_shard(plan, shard, reader, shard_dir, max_side, quality)
                record["settings"] = settings
                _append_journal(journal_path, record)
            records.append(record)
    finally:
        reader.close()
    result = {"split": plan.split, "part": part, "parts": parts, "shards": records}
    _write_json(out, result)
    return result


def _is_complete(path: Path, record: dict[str, Any]) -> bool:
    return path.exists() and path.stat().st_size == record["bytes"]


def _read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything after it is redone
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

    for shard, name in enumerate(progress(names, total=len(names), desc=f"verify {plan.split}", unit="shard")):
        _verify_shard(plan, shard, shard_dir / name, records[name])

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


def load_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest missing (run the data stage first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a flashnet manifest (format {manifest.get('format')!r})")
    return manifest


def verify_manifest(path: str | Path, full: bool = False) -> dict[str, Any]:
    """Check that the shards a manifest lists are there, whole (sizes; sha256 with ``full``), and
    that its accounting adds up. Training runs this before submitting any job."""
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
        if full and sha256_file(shard_path) != shard["sha256"]:
            raise DataError(f"{shard_path}: sha256 differs from the manifest")
        total += shard["samples"]
    if total != manifest["samples"]:
        raise DataError(f"{path}: shards hold {total} samples, the manifest says {manifest['samples']}")
    if manifest["samples"] + len(manifest["rejected"]) != manifest["found"]:
        raise DataError(f"{path}: samples + rejected != found")
    if manifest["expected"] is not None and manifest["found"] != manifest["expected"]:
        raise DataError(f"{path}: found {manifest['found']} images, expected {manifest['expected']}")
    return manifest


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
