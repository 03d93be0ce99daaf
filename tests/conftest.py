"""Shared test fixtures. Loading this conftest also puts tests/ on sys.path (pytest's default import
mode), so tests can import the helpers kept here, e.g. `from browser import load_page`.

``tiny_dataset``: shards of a tiny sample dataset (4 classes, 40 train and 10 val images per class,
small JPEGs), a run that trains on them in seconds and a launcher for local jobs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flashnet.config import LauncherConfig, RunConfig
from flashnet.data import sample, shards, sources
from flashnet.data.manifest import build_manifest


@dataclasses.dataclass(frozen=True)
class TinyDataset:
    train_manifest: Path
    val_manifest: Path

    @staticmethod
    def run(**overrides) -> dict:
        return make_tiny_run(**overrides)

    @staticmethod
    def launcher(**overrides) -> LauncherConfig:
        return local_launcher(**overrides)


def build_shards(data_dir: Path, out: Path, samples_per_shard: int = 32) -> None:
    for split in sources.SPLITS:
        index = sources.index_split(data_dir, split)
        split_dir = out / split
        shards.save_index(shards.shuffled(index, 0), data_dir, samples_per_shard, 0, split_dir / "index.json")
        shards.write_part(split_dir / "index.json", 0, 1, split_dir / "parts" / "0.json", None, 90)
        build_manifest(split_dir / "index.json", [split_dir / "parts" / "0.json"], split_dir / "manifest.json", 0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    root = tmp_path_factory.mktemp("tiny")
    spec = sample.SampleSpec(classes=4, train_per_class=40, val_per_class=10, min_side=40, max_side=80, seed=3)
    sample.write_sample_data(root / "data", spec)
    build_shards(root / "data", root / "shards")
    return TinyDataset(root / "shards/train/manifest.json", root / "shards/val/manifest.json")


def make_tiny_run(**overrides) -> dict:
    """A run that trains in seconds on the tiny shards: resnet18 at 32 px, 10 steps an epoch. Keys
    not named here take the schema's defaults."""
    run = dict(model="resnet18", image_size=32, epochs=2, batch_size=16, lr=1.0, warmup_epochs=1,
               weight_decay=0.0001, precision="32-true", accelerator="cpu", loader_workers=0,
               crop_scale=[0.35, 1.0], target_top1=0.5, checkpoint_every_minutes=10,
               log_every_steps=2)
    run.update(overrides)
    return RunConfig.from_dict(run).to_dict()


def local_launcher(**overrides) -> LauncherConfig:
    """Local jobs on this machine, one CPU per task; keys not named here take the schema's defaults."""
    return LauncherConfig.from_dict({"cluster": "local", "cpus_per_task": 1, "poll_s": 0.2, **overrides})


@pytest.fixture(scope="session")
def tiny_run():
    return make_tiny_run


@pytest.fixture
def running_invocation():
    """``running_invocation(jobs_folder)``: stand-ins for another invocation's waiting `flashnet
    train` and its submitit controller, recorded in the folder's active.json as the job layer records
    them; returns the record. Both processes are killed afterwards."""
    import json
    import socket
    import sys

    from flashnet.jobs import lock

    processes = []

    def start(folder: Path) -> dict:
        waiter = started([sys.executable, "-c", "import time; time.sleep(120)", "flashnet", "train"])
        controller = started([sys.executable, "-c", "import time; time.sleep(120)", "submitit.local"])
        processes.extend([waiter, controller])
        record = {"cluster": "local", "job_id": str(controller.pid), "host": socket.gethostname(), "pid": waiter.pid}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / lock.ACTIVE_JOB).write_text(json.dumps(record))
        return record

    yield start
    for process in processes:
        process.kill()
        process.wait()


def started(command: list[str]):
    """A process whose /proc command line already is ``command``: right after fork it is still the
    parent's, and a check that reads it then takes the process for something else."""
    import subprocess
    import time

    process = subprocess.Popen(command)
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    while command[-1].encode() not in cmdline.read_bytes():
        assert process.poll() is None, f"{command} exited with {process.returncode}"
        time.sleep(0.01)
    return process


@pytest.fixture
def start_process():
    """:func:`started`, for test modules (conftest is not imported by name)."""
    return started
