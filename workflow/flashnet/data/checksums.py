"""Shards checked against the sha256 values their manifest holds, before a run uses them.

A shard damaged after its manifest was written (a flipped byte keeps its size) would otherwise be
trained on silently, or crash a job mid-run. Hashing runs at about 1 GB/s per core here (sha256
with SHA-NI; docs/benchmarks/shards.md), so ImageNet's ~140 GB of shards costs about two minutes
of one core the first time, read from disk at whatever the file system gives. Two things keep
that off every later run:

* a cache next to the manifest (``manifest.verified.json``): shard name → the (size, mtime_ns,
  ctime_ns, inode) it was hashed at and the sha256 found. A shard whose stat is unchanged is not
  read again; any write to it changes its ctime, which no user can set back. A shard modified in
  the last :data:`RACY_WINDOW_S` seconds is hashed but not cached, since a second write within the
  file system's timestamp granularity would leave its stat unchanged (git's "racily clean" case);
* hashing on several threads (hashlib releases the GIL), one shard per thread, on the host that
  submits the job, once, rather than on every rank of every requeued job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..files import write_text
from .sources import DataError

CACHE_SUFFIX = ".verified.json"
RACY_WINDOW_S = 2.0
MAX_THREADS = 8


def sha256_file(path: str | Path) -> str:
    """The one hash of a file for the shard writer, the journal, the manifest and this check."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.stem + CACHE_SUFFIX)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: everything is hashed again
    return cache if isinstance(cache, dict) else {}


def _save_cache(path: Path, cache: dict[str, Any]) -> None:
    try:
        write_text(path, json.dumps(cache, sort_keys=True))
    except OSError:
        pass  # a read-only shard folder: verification still holds, uncached


def verify_checksums(manifest_path: str | Path, manifest: dict[str, Any], threads: int | None = None) -> int:
    """Check every shard the manifest lists against its sha256; return how many were read.

    Raises :class:`DataError` naming the first damaged shard and the remedy."""
    manifest_path = Path(manifest_path)
    shard_dir = manifest_path.parent
    cache_file = cache_path(manifest_path)
    cache = _load_cache(cache_file)
    expected = {shard["name"]: shard["sha256"] for shard in manifest["shards"]}
    stats = {name: _stat_key(shard_dir / name) for name in expected}
    stale = [name for name in expected if cache.get(name, {}).get("stat") != stats[name]]

    def hash_one(name: str) -> tuple[str, str]:
        return name, sha256_file(shard_dir / name)

    workers = threads or min(MAX_THREADS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = dict(pool.map(hash_one, stale))
    now_ns = time.time_ns()
    fresh = {name: {"stat": stats[name], "sha256": sha} for name, sha in found.items()
             if now_ns - max(stats[name][1], stats[name][2]) > RACY_WINDOW_S * 1e9}
    kept = {name: entry for name, entry in cache.items() if name in expected and name not in found}
    if found or set(kept) != set(cache):
        _save_cache(cache_file, {**kept, **fresh})
    for name, want in expected.items():
        got = found.get(name) or cache.get(name, {}).get("sha256")
        if got != want:
            raise DataError(
                f"{shard_dir / name}: sha256 differs from {manifest_path} (damaged since it was written); "
                "rewrite the shards: snakemake --forcerun write_shards")
    return len(found)
