"""Time per epoch outside the training steps, in a record-shaped run; and the validation plan and
start-up file operations of a 2,048-rank run, simulated over the index alone.

    flashnet bench epoch [--epochs 8] [--also REV] [--workdir DIR] [--out FILE.json] [--simulate-only]

Why: the record (Fujitsu, 2,048 GPUs) trains 15 steps an epoch at ~55 ms a step: 0.8 s an epoch.
Whatever happens between the steps (checkpoints, loader start, callbacks, validation) is paid at
every epoch. Goal: at most 40 ms per epoch outside the steps and validation (5 % of the record's
epoch), and validation time per rank within 1.2x of the balanced share (N / world samples).

The run: the real ``flashnet train`` job (local launcher, 2 gloo ranks on CPU), 15 steps an epoch,
validation every 4 epochs, ``log_every_steps: 1`` (every step's wall clock in steps.csv). Its state
is ResNet-50's (torchvision resnet50: 25.6 M parameters, BatchNorm buffers, LARS momentum: a
~200 MB checkpoint, as the record's) at 16 px images, so the step itself is short while checkpoints,
start-up and DDP's buckets are full size. A tiny network carrying ResNet-50's parameters would need
a model the package does not have; resnet50 at the schema's smallest image size is the package's
own model.

What is read: only the run folder's files that every revision writes, ``steps.csv`` (each step's
``wall_s``), ``metrics.csv`` (each validation's ``validation_s``) and ``summary.json`` (the clock
fields), so the same benchmark times today's main and later revisions (``--also REV`` runs the job
with that revision's package, exported by bench/revision.py, in the same benchmark run).

Per epoch outside the steps: at each epoch boundary k (between the last step of epoch k and the
first of epoch k + 1), the wall time of that gap less one median step and less the validation run
there, if any. It holds the epoch-end checkpoint, the loader's start for the next epoch, the
callbacks and anything else the loop does between two epochs.

Validation per rank: the slowest rank's real samples and its batches (every rank runs as many
batches as the largest share, padding included) against the balanced share, from the revision's
own val plan, for this run (2 ranks) and simulated for the record: ImageNet's 50,000 val images in
shards of 256, 2,048 ranks, 8 loader workers each, 40 images a device. Start-up file operations
per rank: those of the revision's start-up checks (verify the manifests' shards, pick the resume
checkpoint by its CRCs), counted on this run's data and scaled to ImageNet's 5,005 + 196 shards of
256 and a ResNet-50 checkpoint (bench/at_revision/epoch_plan.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from flashnet.bench import write_report
from flashnet.bench.revision import REPOSITORY, SCHEMAS, RevisionWorker, exported
from flashnet.machine import cpu_model

GOAL_MS_PER_EPOCH = 40.0  # 5 % of the record's 0.8 s epoch
GOAL_VAL_RATIO = 1.2  # slowest rank's validation over the balanced share
STEPS_PER_EPOCH = 15
WORLD = 2
# The record's shape for the simulation (Fujitsu's 81,920 images over 2,048 GPUs: 40 a device).
RECORD = {"world_size": 2048, "workers": 8, "batch_size": 40, "val_images": 50_000, "train_images": 1_281_167,
          "samples_per_shard": 256}
RESNET50_CHECKPOINT_BYTES = 25_557_032 * 4 * 2  # fp32 weights and their momentum


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashnet bench epoch", description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the run (validation every 4)")
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the data and the runs go (data reused when present); default: a temporary folder")
    parser.add_argument("--also", action="append", default=[], metavar="REV",
                        help="a git revision whose `flashnet train` runs the same job, in the same benchmark run")
    parser.add_argument("--simulate-only", action="store_true", help="only the 2,048-rank simulation (no runs)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the figures are per epoch boundary)")
    return args


# --------------------------------------------------------------------------- data


def prepare_data(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Shards of generated images for exactly 15 steps an epoch, and their manifests."""
    from flashnet.data import sample, shards, sources
    from flashnet.data.manifest import build_manifest

    root = workdir / "data"
    manifests = root / "shards" / "train" / "manifest.json", root / "shards" / "val" / "manifest.json"
    if all(path.exists() for path in manifests):
        return manifests
    classes = 5  # divides 15 x the global batch: exactly 15 steps an epoch
    train_images = STEPS_PER_EPOCH * WORLD * args.per_device_batch
    spec = sample.SampleSpec(classes=classes, train_per_class=train_images // classes,
                             val_per_class=math.ceil(args.val_images / classes), min_side=24, max_side=40,
                             odd_files=False, seed=0)
    sample.write_sample_data(root / "images", spec)
    for split in sources.SPLITS:
        index = sources.index_split(root / "images", split)
        split_dir = root / "shards" / split
        shards.save_index(shards.shuffled(index, 0), root / "images", 32, 0, split_dir / "index.json")
        shards.write_part(split_dir / "index.json", 0, 1, split_dir / "parts" / "0.json", None, 90)
        build_manifest(split_dir / "index.json", [split_dir / "parts" / "0.json"], split_dir / "manifest.json", 0)
    return manifests


# --------------------------------------------------------------------------- the run


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "image_size": args.image_size, "epochs": args.epochs,
        "batch_size": WORLD * args.per_device_batch, "optimizer": "lars", "lr": 1.0, "warmup_epochs": 1,
        "precision": "32-true", "accelerator": "cpu", "nodes": 1, "devices_per_node": WORLD, "loader_workers": 1,
        "crop_scale": [0.35, 1.0], "target_top1": 1.0, "stop_at_target": False, "eval_every_epochs": 4,
        "eval_offset": 3, "log_every_steps": 1, "loggers": ["csv"],
        # each revision takes the key its schema declares: main before issue 20 checkpointed every epoch
        # whatever this said; since then every checkpoint_every_minutes (the default), the signal and the end
        "checkpoint_every_steps": 100_000, "checkpoint_every_minutes": 10,
    }


def known_run_keys(workflow_root: Path) -> set[str]:
    """The run keys the revision's schema declares: settings it does not know are left out."""
    schema = yaml.safe_load((workflow_root / SCHEMAS / "config.schema.yaml").read_text())
    return set(schema["$defs"]["run"]["properties"])


def run_training(package_root: Path, workflow_root: Path, manifests: tuple[Path, Path], out: Path,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """``flashnet train`` of ``package_root`` (on PYTHONPATH) for ``settings``; its run folder's figures."""
    known = known_run_keys(workflow_root)
    run = {key: value for key, value in settings.items() if key in known}
    command = [sys.executable, "-m", "flashnet", "train", "--name", "epoch-bench", "--run", json.dumps(run),
               "--launcher", json.dumps({"cluster": "local", "cpus_per_task": 1, "poll_s": 0.2}),
               "--train-manifest", str(manifests[0]), "--val-manifest", str(manifests[1]), "--out-dir", str(out),
               "--fresh"]
    finished = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(package_root)}, capture_output=True,
                              text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"flashnet train at {package_root} failed ({finished.returncode}):\n"
                           f"{finished.stderr[-3000:]}")
    return epoch_figures(out, run["epochs"])


def read_csv_rows(path: Path) -> list[dict[str, float]]:
    import csv

    with path.open() as f:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(f)]


def epoch_figures(out: Path, epochs: int) -> dict[str, Any]:
    """Per epoch boundary: its gap less a median step and less its validation; and the clock fields."""
    steps = {int(row["step"]): row["wall_s"] for row in read_csv_rows(out / "steps.csv")}
    validations = {int(row["epoch"]): row["validation_s"] for row in read_csv_rows(out / "metrics.csv")}
    summary = json.loads((out / "summary.json").read_text())
    durations = [steps[s] - steps[s - 1] for s in sorted(steps) if s - 1 in steps]
    boundaries = {k * STEPS_PER_EPOCH for k in range(1, epochs)}
    median_step = statistics.median(d for s, d in zip(sorted(steps)[1:], durations) if s - 1 not in boundaries)
    if len(steps) < epochs * STEPS_PER_EPOCH:
        raise RuntimeError(f"{out}: steps.csv has {len(steps)} steps, {epochs} epochs of {STEPS_PER_EPOCH} expected")
    outside = [steps[b + 1] - steps[b] - median_step - validations.get(b // STEPS_PER_EPOCH, 0.0)
               for b in sorted(boundaries)]
    plain = [d for s, d in zip(sorted(steps)[1:], durations) if s - 1 not in boundaries]
    clock = {key: summary.get(key) for key in ("train_seconds", "step_seconds", "validation_seconds", "validations",
                                                "checkpoint_seconds", "checkpoints", "startup_seconds")}
    return {
        "median_step_ms": round(1000 * median_step, 1),
        "outside_ms_per_epoch": [round(1000 * value, 1) for value in outside],
        "outside_ms_per_epoch_mean": round(1000 * statistics.mean(outside), 1),
        # the noise floor: how far ordinary steps stray from the median (one such step is in each gap)
        "step_spread_ms": round(1000 * statistics.pstdev(plain), 1),
        "validation_s": [round(validations[e], 3) for e in sorted(validations)],
        "clock": clock,
        "mlperf_time_to_train_s": (summary.get("mlperf") or {}).get("time_to_train_s"),
    }


# --------------------------------------------------------------------------- the simulation


def record_val_shards() -> list[int]:
    full, rest = divmod(RECORD["val_images"], RECORD["samples_per_shard"])
    return [RECORD["samples_per_shard"]] * full + ([rest] if rest else [])


def simulate(package_root: Path, manifests: tuple[Path, Path], checkpoint: Path) -> dict[str, Any]:
    """The revision's val plan at the record's scale and its start-up checks' file operations."""
    worker = RevisionWorker("epoch_plan.py", package_root, {
        "val_shard_samples": record_val_shards(), "world_size": RECORD["world_size"], "workers": RECORD["workers"],
        "batch_size": RECORD["batch_size"], "manifests": [str(path) for path in manifests],
        "checkpoint": str(checkpoint)})
    try:
        answer = worker.answer()
    finally:
        worker.close()
    return {"val": val_balance(answer["val"], RECORD["val_images"], RECORD["world_size"], RECORD["batch_size"]),
            "startup": startup_per_rank(answer["startup"])}


def val_balance(plan: dict[str, Any], images: int, world: int, batch: int) -> dict[str, Any]:
    share = images / world
    samples, batches = plan["samples"], plan["batches"]
    assert sum(samples) == images, f"the val plan reads {sum(samples)} of {images} samples"
    balanced_batches = math.ceil(math.ceil(share) / batch)
    return {"plan": plan["plan"], "balanced_share": round(share, 2), "max_samples": max(samples),
            "min_samples": min(samples), "samples_ratio": round(max(samples) / share, 2),
            "ranks_with_no_samples": sum(1 for s in samples if s == 0), "batches_per_rank": max(batches),
            "balanced_batches": balanced_batches, "batches_ratio": round(max(batches) / balanced_batches, 2)}


def startup_per_rank(counted: dict[str, Any]) -> dict[str, Any]:
    """Counted on the benchmark's data, scaled to ImageNet at 256 a shard and a ResNet-50 checkpoint:
    the ranks that run the checks verify every shard and CRC-read the checkpoint; the others (when
    rank 0 checks for all) only read the two manifests."""
    shards = math.ceil(RECORD["train_images"] / RECORD["samples_per_shard"]) + len(record_val_shards())
    verify, resume, read = counted["verify_manifest"], counted["choose_resume"], counted["read_manifests"]
    stats_per_shard = (verify.get("stat", 0) - read.get("stat", 0)) / counted["shards"]
    checks = {"stat": read.get("stat", 0) + round(stats_per_shard * shards) + resume.get("stat", 0),
              "open": verify.get("open", 0) + resume.get("open", 0), "checkpoint_bytes_read": RESNET50_CHECKPOINT_BYTES}
    reads_only = {"stat": read.get("stat", 0), "open": read.get("open", 0), "checkpoint_bytes_read": 0}
    other = checks if counted["done_by"] == "every rank" else reads_only
    return {"done_by": counted["done_by"], "stats_per_shard": round(stats_per_shard, 2), "imagenet_shards": shards,
            "rank_0": checks, "each_other_rank": other,
            "all_ranks": {key: checks[key] + other[key] * (RECORD["world_size"] - 1) for key in checks},
            "counted_on_bench_data": counted}


def resume_checkpoint_sample(workdir: Path) -> Path:
    """A small resume-checkpoint-shaped file (a torch zip archive) for the start-up count."""
    import torch

    path = workdir / "sample-checkpoint" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"w{i}": torch.zeros(16) for i in range(4)}}, path)
    return path


# --------------------------------------------------------------------------- the report


def revisions(args: argparse.Namespace) -> list[str | None]:
    return [None, *args.also]  # None: the current code


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import flashnet

    manifests = prepare_data(workdir, args)
    checkpoint = resume_checkpoint_sample(workdir)
    current_root = Path(flashnet.__file__).resolve().parents[1]
    results: dict[str, Any] = {}
    for revision in revisions(args):
        label = revision or "current"
        if revision is None:
            results[label] = measure_one(args, workdir / "run-current", current_root, REPOSITORY, manifests, checkpoint)
            continue
        with exported(revision, with_schemas=True) as package_root:
            results[label] = measure_one(args, workdir / f"run-{revision}", package_root, package_root.parent,
                                         manifests, checkpoint)
    return results


def measure_one(args, out: Path, package_root: Path, workflow_root: Path, manifests, checkpoint) -> dict[str, Any]:
    result = {"simulation": simulate(package_root, manifests, checkpoint)}
    if not args.simulate_only:
        result["run"] = run_training(package_root, workflow_root, manifests, out, run_settings(args))
    return result


def goals(result: dict[str, Any]) -> dict[str, bool | None]:
    run = result.get("run")
    val = result["simulation"]["val"]
    return {
        f"outside_steps_at_most_{GOAL_MS_PER_EPOCH:g}_ms": None if run is None
        else run["outside_ms_per_epoch_mean"] <= GOAL_MS_PER_EPOCH,
        f"validation_within_{GOAL_VAL_RATIO:g}x_at_2048_ranks": max(val["samples_ratio"], val["batches_ratio"])
        <= GOAL_VAL_RATIO,
    }


def print_table(results: dict[str, Any]) -> None:
    for label, result in results.items():
        print(f"== {label}")
        run = result.get("run")
        if run:
            clock = run["clock"]
            print(f"  median step {run['median_step_ms']} ms (spread {run['step_spread_ms']} ms); outside the steps "
                  f"and validation per epoch: mean {run['outside_ms_per_epoch_mean']} ms, "
                  f"each boundary {run['outside_ms_per_epoch']} ms")
            print(f"  validations {run['validation_s']} s; checkpoints {clock['checkpoints']} "
                  f"({clock['checkpoint_seconds']} s); start-up {clock['startup_seconds']} s; "
                  f"MLPerf time to train {run['mlperf_time_to_train_s']}")
        val = result["simulation"]["val"]
        print(f"  2,048 ranks x 8 workers, {RECORD['batch_size']} a device ({val['plan']}): slowest rank "
              f"{val['max_samples']} val samples ({val['samples_ratio']}x the share of {val['balanced_share']}), "
              f"{val['batches_per_rank']} batches ({val['batches_ratio']}x), {val['ranks_with_no_samples']} ranks "
              "without samples")
        start = result["simulation"]["startup"]
        print(f"  start-up checks ({start['done_by']}): rank 0 {start['rank_0']}, each other rank "
              f"{start['each_other_rank']}, all ranks {start['all_ranks']}")
        print(f"  goals: {goals(result)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flashnet-bench-epoch-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        results = measure(args, workdir)
    print_table(results)
    import torch
    import pytorch_lightning

    write_report({
        "benchmark": "epoch", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "pytorch_lightning": pytorch_lightning.__version__},
        "settings": {**vars(args), "workdir": str(args.workdir), "out": str(args.out), "record": RECORD},
        "results": results, "goals": {label: goals(result) for label, result in results.items()},
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
