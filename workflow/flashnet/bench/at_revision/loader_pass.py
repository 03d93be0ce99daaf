"""Passes of another revision's train loader, for ``flashnet bench loader --also REV``.

Run by bench/revision.py with that revision's package on PYTHONPATH. Setup (argv[1], JSON):
``shards``, ``images``, ``batch_size``, ``size``, ``crop_scale``. Each request ``{"epoch": n}``
builds that epoch's loader (untimed, as the benchmark's own passes), times one pass over it in
this process and answers ``{"images", "wall_seconds", "cpu_seconds", "batches": [[dtype, shape]...]}``
(the distinct dtypes and per-image shapes seen, for the benchmark to check).
"""

import dataclasses
import json
import sys
import time

import torch

from flashnet.data import loader  # the revision's: PYTHONPATH points at its export


def stream_spec(setup: dict, epoch: int, samples):
    """The revision's TrainStreamSpec: loaders from before real epochs (commit 4406922 and older)
    take shard paths and a shuffle buffer instead of the sample table."""
    common = dict(seed=0, epoch=epoch, rank=0, steps=setup["images"] // setup["batch_size"],
                  batch_size=setup["batch_size"], image_size=setup["size"], **crop_settings(setup))
    if samples is not None:
        return loader.TrainStreamSpec(samples=samples, world_size=1, **common)
    return loader.TrainStreamSpec(shards=tuple(setup["shards"]), shuffle_buffer=min(500, setup["images"]),
                                  workers=1, **common)


def crop_settings(setup: dict) -> dict:
    """The revision's crop settings: an Augmentation (from the Augmentation type on) or crop_scale."""
    if "augmentation" in {field.name for field in dataclasses.fields(loader.TrainStreamSpec)}:
        from flashnet.data.transforms import Augmentation

        return {"augmentation": Augmentation(tuple(setup["crop_scale"]), (3 / 4, 4 / 3))}
    return {"crop_scale": tuple(setup["crop_scale"])}


def sample_table(setup: dict):
    """The revision's sample table (read once, untimed), or None for a loader without one."""
    if "samples" not in {field.name for field in dataclasses.fields(loader.TrainStreamSpec)}:
        return None
    from flashnet.data.epochs import TrainSamples

    return TrainSamples.scan(setup["shards"])


def timed_pass(batches) -> dict:
    count, seen = 0, set()
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        images = batch.images if hasattr(batch, "images") else batch[0]  # a Batch, or a tuple before it
        seen.add((str(images.dtype), tuple(images.shape[1:])))
        count += len(images)
    return {"images": count, "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
            "batches": sorted(seen)}


def main() -> None:
    setup = json.loads(sys.argv[1])
    torch.set_num_threads(1)  # as the benchmark's own process: what one loader worker gets
    answers, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the answers
    samples = sample_table(setup)
    for line in sys.stdin:
        try:
            batches = loader.train_loader(stream_spec(setup, json.loads(line)["epoch"], samples), workers=0)
            answer = timed_pass(batches)
        except Exception as error:  # noqa: BLE001 - the benchmark reports it
            answer = {"error": f"{type(error).__name__}: {error}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
