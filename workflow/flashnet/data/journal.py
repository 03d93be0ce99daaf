"""A conversion job's journal and lock: what lets a rerun of a part redo only what is missing.

``parts/<part>.journal.jsonl`` gets a "writing" line before a shard is (re)written and the shard's
record (name, size, sha256, the settings and shard format it was written with) after it is renamed
to its final name. The kill scenarios this survives:

* killed mid-shard: the shard has only a temporary name, and its newest line says "writing";
* killed between the rename and the record: the newest line still says "writing", so the shard is
  written again rather than trusted;
* killed mid-line: the torn line is cut off the file (:func:`read`), later records still count;
* a switch of settings and back (e.g. quality 90 → 20 → 90): only the newest line about a shard
  describes its file, so an older record with today's settings is not taken for it;
* a shard damaged since its record (same size, a flipped byte): its sha256 no longer matches;
* a record of another shard format (:data:`.shards.SHARD_FORMAT`), or of none (written before the
  format was named): not trusted, so the shard is rewritten, and the log says so once;
* a job of the part still running from a killed Snakemake: :func:`part_lock` makes the new one wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .checksums import sha256_file


@contextlib.contextmanager
def part_lock(path: Path):
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


def finished_shards(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The journal's records of shards finished with ``settings`` (its shard format included) and
    not begun again since: the newest line about a shard is the only one that describes its file.
    Prints, once, how many finished shards are of another shard format and so will be rewritten."""
    newest = {}
    for record in read(path):
        newest[record["name"]] = record
    finished = [record for record in newest.values() if "settings" in record]
    other_formats = Counter(record["settings"].get("format") for record in finished
                            if record["settings"].get("format") != settings["format"])
    if other_formats:
        found = ", ".join(f"{count} in {name or 'no named format (older flashnet)'}"
                          for name, count in sorted(other_formats.items(), key=lambda item: str(item[0])))
        print(f"{path}: rewriting shards the journal records in another shard format than {settings['format']} "
              f"({found})", flush=True)
    return {record["name"]: record for record in finished if record["settings"] == settings}


def is_complete(path: Path, record: dict[str, Any]) -> bool:
    """Whether the shard on disk is the one the journal recorded: its size, then its sha256, so a
    shard damaged since (a flipped byte keeps the size) is written again by any rerun. Hashing
    (~1 GB/s) costs a fraction of converting the shard again."""
    return path.exists() and path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"]


def read(path: Path) -> list[dict[str, Any]]:
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


def append(path: Path, record: dict[str, Any]) -> None:
    """One line, on disk before the caller goes on (a kill after this keeps it)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
