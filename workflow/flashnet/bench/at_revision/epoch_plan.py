"""Another revision's validation plan and start-up checks, for ``flashnet bench epoch``'s simulation.

Run by bench/revision.py with that revision's package on PYTHONPATH. Setup (argv[1], JSON):
``val_shard_samples`` (the simulated val index: samples per shard), ``world_size``, ``workers``,
``batch_size`` (per device), ``manifests`` (the benchmark's real manifests) and ``checkpoint`` (a
resume checkpoint file). Answers one line:

- ``val``: the real samples and the batches (padding included) of every rank, from the revision's
  own val plan: ``data.loader.val_batches`` (validation balanced by sample) or, before it,
  ``data.loader.val_assignment`` (shards dealt to ranks, then workers);
- ``startup``: the file operations of the revision's start-up checks, counted by wrapping
  ``os.stat``, ``os.open`` and ``open`` while its ``verify_manifest`` reads each manifest and its
  ``checkpoints.choose_resume`` picks the checkpoint (and while ``load_manifest`` only reads the
  manifests), and which ranks run the checks: every rank when its ``train/recipe.py`` calls them
  itself, else rank 0 (checked once and broadcast; the other ranks only read the manifests).
"""

import builtins
import collections
import io
import json
import math
import os
import sys
from pathlib import Path

from flashnet.data import loader  # the revision's: PYTHONPATH points at its export
from flashnet.data.manifest import load_manifest, verify_manifest
from flashnet.train import checkpoints, recipe


def val_per_rank(shard_samples: list[int], world_size: int, workers: int, batch_size: int) -> dict:
    if hasattr(loader, "val_batches"):  # balanced by sample
        total = sum(shard_samples)
        plans = [loader.val_batches(total, world_size, rank, batch_size) for rank in range(world_size)]
        samples = [sum(len(batch) for batch in plan) for plan in plans]
        batches = [len(plan) for plan in plans]
        return {"plan": "val_batches (by sample)", "samples": samples, "batches": batches}
    shards, padding = loader.val_assignment(tuple(shard_samples), world_size, workers, batch_size)
    samples = [sum(shard_samples[s] for worker in rank for s in worker) for rank in shards]
    batches = [sum(math.ceil(sum(shard_samples[s] for s in worker) / batch_size) for worker in rank) + pad
               for rank, pad in zip(shards, padding)]
    return {"plan": "val_assignment (by shard)", "samples": samples, "batches": batches}


class FileOperations:
    """Counts stat and open calls (and the bytes of files opened for reading) while active."""

    def __init__(self):
        self.counts = collections.Counter()
        self._stat, self._os_open, self._open = os.stat, os.open, builtins.open

    def __enter__(self):
        counts = self.counts

        def stat(path, *args, **kwargs):
            counts["stat"] += 1
            return self._stat(path, *args, **kwargs)

        def os_open(path, *args, **kwargs):
            counts["open"] += 1
            return self._os_open(path, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            counts["open"] += 1
            if "r" in mode and isinstance(file, (str, Path)):
                counts["bytes_opened"] += self._stat(file).st_size
            return self._open(file, mode, *args, **kwargs)

        os.stat, os.open, builtins.open, io.open = stat, os_open, open_, open_
        return self.counts

    def __exit__(self, *exc):
        os.stat, os.open, builtins.open, io.open = self._stat, self._os_open, self._open, self._open


def startup_operations(manifests: list[str], checkpoint: str) -> dict:
    with FileOperations() as verify:
        shards = sum(len(verify_manifest(path)["shards"]) for path in manifests)
    with FileOperations() as read:
        for path in manifests:
            load_manifest(path)
    with FileOperations() as resume:
        chosen = checkpoints.choose_resume(Path(checkpoint), say=None)
    source = Path(recipe.__file__).read_text()
    every_rank = "verify_manifest(" in source or "choose_resume(" in source
    return {"verify_manifest": dict(verify), "shards": shards, "choose_resume": dict(resume),
            "read_manifests": dict(read),
            "resume_found": chosen is not None, "done_by": "every rank" if every_rank else "rank 0"}


def main() -> None:
    setup = json.loads(sys.argv[1])
    answers, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the answers
    try:
        answer = {"val": val_per_rank(setup["val_shard_samples"], setup["world_size"], setup["workers"],
                                      setup["batch_size"]),
                  "startup": startup_operations(setup["manifests"], setup["checkpoint"])}
    except Exception as error:  # noqa: BLE001 - the benchmark reports it
        answer = {"error": f"{type(error).__name__}: {error}"}
    answers.write(json.dumps(answer) + "\n")
    answers.flush()


if __name__ == "__main__":
    main()
