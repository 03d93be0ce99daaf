"""ImageNet index → WebDataset shards: the plan the index fixes, and the conversion jobs that write it.

The index fixes everything about the shards before any is written: a seeded global shuffle of the
split (so every shard mixes classes) and ``samples_per_shard`` consecutive entries per shard. Each
conversion job writes a contiguous range of shards; a shard appears under its final name only when
complete (write to a temporary name, then rename), and the job's journal (:mod:`.journal`) records
when a shard is begun and when it is finished, so a rerun skips exactly the shards whose newest
journal line says they were finished with the same settings and shard format and whose sha256
still matches; a forced rerun (``--rewrite``, which ``snakemake --forcerun write_shards`` passes)
rewrites them all. Image preparation is :mod:`.images`; the manifest that re-reads and accounts for
every shard is :mod:`.manifest`.

Samples: ``__key__`` = the source file's stem, ``jpg`` = its bytes (or an RGB JPEG re-encoding,
listed under ``converted``), ``cls`` = the label as decimal text.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path, write_json
from ..progress import progress
from . import journal
from .images import CHECKS, Rejected, prepare_image
from .sources import DataError, SplitIndex
from .tarfiles import ShardFile

INDEX_FORMAT = "flashnet-index/1"
# What a shard holds and how its images were converted. Every journal record, part record and
# manifest names it; a journal record of another version is rewritten, a manifest of another is
# refused (see :mod:`.manifest`). Raise it when the shards' bytes would change for the same input.
#   1: __key__ + jpg + cls members, odd files converted to RGB JPEG ("conversion": 1 in journals).
#   2: wide greyscale modes scaled, not clipped; JPEGs over PIL's pixel limit shrunk to max_side
#      (journals said "conversion": 2 before the format had a name; those records are rewritten).
SHARD_FORMAT = "flashnet-shards/2"


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record, sort_keys=True)


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
    converted, rejected, resized, samples = [], [], 0, 0
    with atomic_path(final) as tmp:
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
                raise DataError(f"{final}: no space left on device in {out_dir} while writing this shard (its "
                                "temporary file was removed); free space there and rerun") from None
            raise
    return {"name": name, "samples": samples, "bytes": shard_file.size, "sha256": digest,
            "converted": converted, "rejected": rejected, "resized": resized}


def write_part(index_path: str | Path, part: int, parts: int, out: str | Path, max_side: int | None,
               quality: int, check: str = "decode", rewrite: bool = False) -> dict[str, Any]:
    """Write conversion job ``part``'s shards next to the index; skip the ones its journal shows done,
    unless ``rewrite`` (a forced rerun), which writes every one again.

    The journal (``parts/<part>.journal.jsonl``) outlives a killed job (Snakemake deletes only
    declared outputs), so a rerun redoes only what is missing; :mod:`.journal` says which records
    it trusts. Either way the part's lock is held and every shard is written under a temporary
    name, then renamed.
    """
    plan = load_plan(index_path)
    out = Path(out)
    shard_dir = Path(index_path).parent
    journal_path = out.with_name(f"{out.stem}.journal.jsonl")
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    settings = {"index": plan.fingerprint, "max_side": max_side, "quality": quality, "check": check,
                "format": SHARD_FORMAT}
    with journal.part_lock(out.with_name(f"{out.stem}.lock")):
        done = {} if rewrite else journal.finished_shards(journal_path, settings)
        if rewrite:
            print(f"{journal_path}: forced rerun (--rewrite): writing every shard of part {part} again", flush=True)
        records = _write_part_shards(plan, part, parts, shard_dir, journal_path, done, settings)
    result = {"split": plan.split, "part": part, "parts": parts, "shard_format": SHARD_FORMAT, "shards": records}
    write_json(out, result, sort_keys=True)
    return result


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
            if record is None or not journal.is_complete(shard_dir / name, record):
                journal.append(journal_path, {"name": name, "writing": True, "format": SHARD_FORMAT})
                record = write_shard(plan, shard, reader, shard_dir, max_side, quality, check)
                record["settings"] = settings
                journal.append(journal_path, record)
            records.append(record)
    finally:
        reader.close()
    return records
