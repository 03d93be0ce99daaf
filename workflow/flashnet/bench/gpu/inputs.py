"""The shards the data configurations read: given with --shards, or made from generated sample images."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from flashnet.bench.gpu.configs import BenchConfig, Scale


def make_sample_shards(manifest: Path, images: int, smoke: bool) -> Path:
    """ImageNet-sized stand-in shards at ``manifest``'s folder, made by the project's own sample
    generator and shard writer; reused when a manifest with at least ``images`` samples is there.

    Sides are drawn from 375..500 px and encoded at JPEG quality 95: about 190k pixels and 100 kB a
    file, close to ImageNet's train set (about 110 kB a file; mean near 470×390 px), so decoding costs
    what it would on the real data. A few thousand images are enough to measure the decode rate
    (the stream runs as many epochs over them as it needs)."""
    from flashnet.data import shards, sources
    from flashnet.data.manifest import build_manifest, load_manifest
    from flashnet.data.sample import SampleSpec, write_sample_data

    if manifest.exists() and load_manifest(manifest)["samples"] >= images:
        return manifest
    folder = manifest.parent
    source = folder / "source"
    classes = 2 if smoke else 10
    spec = SampleSpec(classes=classes, train_per_class=math.ceil(images / classes), val_per_class=1,
                      min_side=40 if smoke else 375, max_side=64 if smoke else 500, quality=95, seed=0)
    write_sample_data(source, spec)
    index = folder / "index.json"
    shards.save_index(shards.shuffled(sources.index_split(source, "train"), 0), source,
                      samples_per_shard=16 if smoke else 256, seed=0, path=index)
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    part = folder / "parts" / "0.json"
    shards.write_part(index, 0, 1, part, max_side=None, quality=95)
    build_manifest(index, [part], manifest, max_rejected=0)
    return manifest


def manifest_shards(manifest: Path) -> tuple[str, ...]:
    from flashnet.data.epochs import shard_paths
    from flashnet.data.manifest import verify_manifest

    return shard_paths(manifest, verify_manifest(manifest))


def resolve_shards(args: argparse.Namespace, scale: Scale, configs: list[BenchConfig], tmp: Path) -> tuple[str, ...] | None:
    """Shard paths for the data configurations: from --shards, made there first with --make-shards;
    a smoke run without --shards makes tiny ones in a temporary folder."""
    if not any(c.data != "synthetic" for c in configs):
        return None
    manifest = args.shards
    if manifest is None and scale.smoke:
        manifest = tmp / "shards" / "manifest.json"
        args.make_shards = args.make_shards or 32
    if manifest is None:
        return None
    if args.make_shards:
        print(f"[{time.strftime('%H:%M:%S')}] making {args.make_shards} sample images into shards at {manifest.parent}",
              file=sys.stderr, flush=True)
        make_sample_shards(manifest, args.make_shards, scale.smoke)
    return manifest_shards(manifest)


def drop_page_cache(paths: tuple[str, ...], use_drop_caches: bool = True) -> str:
    """Evict ``paths`` from the page cache so the next read comes from the disk, and say how.

    As root, ``echo 3 > /proc/sys/vm/drop_caches`` after a ``sync`` drops the whole cache (the
    kernel's documented interface, Documentation/admin-guide/sysctl/vm.rst). Otherwise (or where
    /proc/sys is read-only, as in many containers) ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each
    file asks the kernel to drop its clean pages; the kernel may keep some, and a sandboxed kernel
    (gVisor) may ignore it, so that result reads "asked". Only the first pass over the shards is
    cold: a data configuration that times more batches than the shards hold reads them again warm.
    ``use_drop_caches=False`` (the smoke run on a shared machine) only asks per file."""
    reason = "drop_caches not used"
    if use_drop_caches:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "dropped (drop_caches)"
        except OSError as error:
            reason = f"drop_caches: {error.strerror or error}"
    if not hasattr(os, "posix_fadvise"):
        return f"warm: cannot drop the page cache ({reason}; no posix_fadvise)"
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return f"asked (posix_fadvise DONTNEED per shard; {reason})"
