"""What the pipeline tests (test_pipeline_local.py, test_pipeline_slurm.py, test_pipeline_mlperf.py)
share: a tiny config, a workflow run in a temporary folder, real digit images in the extracted
layout, and checks of the outputs that hold whatever ran it."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from flashnet.data.checksums import sha256_file

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# Small enough for minutes on two shared CPU cores, large enough to learn: 4 classes (chance 25 %),
# 80 optimizer steps of batch 16. Every run key that matters is pinned here, so edits to the
# defaults in config/config.yaml do not change what these tests train.
TINY_CONFIG: dict[str, Any] = {
    "sample_data": {"generate": True, "classes": 4, "train_per_class": 40, "val_per_class": 10,
                    "min_side": 40, "max_side": 64, "odd_files": True, "seed": 0},
    "shards": {"samples_per_shard": 32, "jobs": 2, "seed": 0, "max_side": None},
    "launcher": {"cluster": "auto", "poll_s": 1, "cpus_per_task": 1, "timeout_min": 60, "signal_delay_s": 60,
                 "ddp_timeout_s": 120},
    "runs": {"default": {
        "model": "resnet18", "image_size": 32, "epochs": 8, "batch_size": 16, "optimizer": "lars", "lr": 2.0,
        "warmup_epochs": 1, "lr_decay_power": 2.0, "end_lr": 0.0001, "momentum": 0.9, "weight_decay": 0.0001,
        "label_smoothing": 0.1, "lars_eta": 0.001, "precision": "32-true", "accelerator": "cpu",
        "nodes": 1, "devices_per_node": 2, "loader_workers": 1, "crop_scale": [0.25, 1.0],
        "seed": 0, "checkpoint_every_minutes": 0, "log_every_steps": 2,
    }},
    "evaluate": {"batch_size": 20, "devices": 1, "workers": 1},
}
RUN = "default"
CHANCE = 1 / TINY_CONFIG["sample_data"]["classes"]
SPLITS = ("train", "val")


def tiny_config(**run_overrides: Any) -> dict[str, Any]:
    config = copy.deepcopy(TINY_CONFIG)
    config["runs"][RUN].update(run_overrides)
    return config


def write_digits_extracted(root: Path, train_per_class: int, val_per_class: int, side: int = 32) -> Path:
    """scikit-learn's handwritten digits (1,797 real 8×8 greyscale scans, 10 classes, shipped in its
    wheel) as RGB JPEGs of ``side`` pixels in the extracted layout that ``data/sources/folders.py``
    reads: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, digit d under the made-up WNID
    ``n0000000d``. Each class's first ``train_per_class`` images (in the data set's order) go to
    train, the next ``val_per_class`` to val; returns ``root``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    taken = {split: dict.fromkeys(range(10), 0) for split in SPLITS}
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        digit = int(digit)
        split = "train" if taken["train"][digit] < train_per_class else "val"
        if taken[split][digit] >= (train_per_class if split == "train" else val_per_class):
            continue
        taken[split][digit] += 1
        folder = root / split / f"n{digit:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.uint8(np.round(pixels * (255 / 16))))  # the scans' values are 0-16
        grey.resize((side, side), Image.Resampling.BICUBIC).convert("RGB").save(
            folder / f"digit_{index:04d}.JPEG", quality=95)
    short = {split: d for split, counts in taken.items() for d, n in counts.items()
             if n < (train_per_class if split == "train" else val_per_class)}
    assert not short, f"too few digits for {train_per_class}+{val_per_class} a class: {short}"
    return root


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what() if callable(what) else what}")
        time.sleep(interval)


@dataclass
class Workflow:
    """The repository's workflow run in its own working folder (its own .snakemake, data and results)
    with ``config/config.yaml`` overlaid by ``config``."""

    workdir: Path
    config: dict[str, Any]
    env: dict[str, str]
    output: str = ""  # what the main run printed, for tests that read it

    @classmethod
    def create(cls, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> "Workflow":
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "overlay.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = dict(env if env is not None else os.environ)
        env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])  # rules call `flashnet`
        return cls(workdir, config, env)

    @property
    def results(self) -> Path:
        return self.workdir / "results"

    @property
    def run_dir(self) -> Path:
        return self.results / "runs" / RUN

    def command(self, *args: str) -> list[str]:
        """``snakemake ARGS`` on this folder; the profile and targets come in ``args``."""
        return [str(VENV_BIN / "snakemake"), *args, "--directory", str(self.workdir),
                "--configfile", str(REPO / "config" / "config.yaml"), str(self.workdir / "overlay.yaml")]

    def snakemake(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, *args: str, log_name: str = "snakemake.log") -> subprocess.Popen:
        """Snakemake in the background, its output in ``workdir/log_name``."""
        log = open(self.workdir / log_name, "w")
        return subprocess.Popen(self.command(*args), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def copy_inputs_from(self, other: "Workflow", shards: bool) -> None:
        """Reuse another run's sample data (and shards): copies keep their times, so Snakemake sees
        them up to date."""
        shutil.copytree(other.workdir / "resources", self.workdir / "resources", symlinks=True)
        if shards:
            shutil.copytree(other.results / "shards", self.results / "shards", symlinks=True)

    def train_log(self) -> str:
        path = self.results / "logs" / "train" / f"{RUN}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def describe(proc: subprocess.CompletedProcess | None, log: Path | None = None) -> str:
    text = (proc.stdout or "") + (proc.stderr or "") if proc is not None else ""
    if log is not None and log.exists():
        text += log.read_text(errors="replace")
    return text[-6000:]


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(timeout=60)


# --------------------------------------------------------------------------- outputs


def dry_run_jobs(output: str) -> dict[str, int]:
    """The "Job stats" table of ``snakemake -n``: {rule: count}."""
    counts, table = {}, False
    for line in output.splitlines():
        words = line.split()
        if words[:2] == ["job", "count"]:
            table = True
        elif table and len(words) == 2 and words[1].isdigit():
            counts[words[0]] = int(words[1])
        elif table and counts and not words:
            break
    counts.pop("total", None)
    return counts


def expected_jobs(config: dict[str, Any]) -> dict[str, int]:
    runs = len(config["runs"])
    return {"sample_data": 1, "index_split": 2, "write_shards": 2 * config["shards"]["jobs"], "manifest": 2,
            "train": runs, "evaluate": runs, "report": 1, "all": 1}


def manifest(results: Path, split: str) -> dict[str, Any]:
    return json.loads((results / "shards" / split / "manifest.json").read_text())


def check_shards(results: Path) -> dict[str, dict[str, Any]]:
    """Every shard a manifest lists is there with the listed size and sha256, and no other shard is
    there; returns the manifests."""
    manifests = {}
    for split in SPLITS:
        listed = manifest(results, split)
        folder = results / "shards" / split
        assert sorted(s["name"] for s in listed["shards"]) == sorted(p.name for p in folder.glob("*.tar"))
        for shard in listed["shards"]:
            path = folder / shard["name"]
            assert path.stat().st_size == shard["bytes"], path
            assert sha256_file(path) == shard["sha256"], path
        assert sum(s["samples"] for s in listed["shards"]) == listed["samples"]
        manifests[split] = listed
    return manifests


def shard_identities(results: Path) -> dict[str, tuple[int, int]]:
    """{split/name: (inode, mtime_ns)} of every finished shard: a rewrite changes both (the writer
    renames a new file into place)."""
    found = {}
    for path in sorted((results / "shards").glob("*/*.tar")):
        stat = path.stat()
        found[f"{path.parent.name}/{path.name}"] = (stat.st_ino, stat.st_mtime_ns)
    return found


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def check_run(workflow: Workflow) -> None:
    """What a finished run must show, wherever it trained: one metrics row per epoch, every step
    taken, and the evaluation agreeing with the last validation."""
    run = workflow.config["runs"][RUN]
    rows = metrics(workflow.run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, run["epochs"] + 1))
    result = summary(workflow.run_dir)
    train_samples = manifest(workflow.results, "train")["samples"]
    assert result["steps"] == run["epochs"] * (train_samples // run["batch_size"])
    assert int(rows[-1]["step"]) == result["steps"]
    evaluation = json.loads((workflow.run_dir / "eval.json").read_text())
    val_samples = manifest(workflow.results, "val")["samples"]
    assert evaluation["samples"] == val_samples
    # Same weights, same images, same crops: at most one borderline sample may differ.
    assert abs(evaluation["top1"] - float(rows[-1]["val_top1"])) <= 1 / val_samples + 1e-6
    assert evaluation["top1"] >= 2 * CHANCE, f"top-1 {evaluation['top1']} is not far above chance {CHANCE}"


def check_report(results: Path) -> None:
    """The report's summary row carries the run's own figures: eval.json's accuracy and sample
    count, summary.json's steps and time, metrics.csv's epochs and time to target."""
    html = results / "report" / "report.html"
    assert html.stat().st_size > 10_000
    assert RUN in (results / "report" / "summary.md").read_text()
    with open(results / "report" / "summary.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["run"] == RUN]
    run_dir = results / "runs" / RUN
    evaluation, result, rows = json.loads((run_dir / "eval.json").read_text()), summary(run_dir), metrics(run_dir)
    assert float(row["final_top1"]) == evaluation["top1"] and float(row["final_top5"]) == evaluation["top5"]
    assert int(row["eval_samples"]) == evaluation["samples"]
    assert int(row["steps"]) == result["steps"] == int(rows[-1]["step"])
    assert float(row["epochs"]) == float(rows[-1]["epoch"])
    assert abs(float(row["train_seconds"]) - result["train_seconds"]) < 0.01
    if result["time_to_target_s"] is None:
        assert row["time_to_target_s"] == ""
    else:  # the wall time of the first epoch whose validation reached the target
        (first,) = [r for r in rows if abs(float(r["wall_s"]) - result["time_to_target_s"]) < 0.01]
        assert float(row["time_to_target_s"]) == result["time_to_target_s"]
        assert float(first["val_top1"]) >= float(row["target_top1"]) - 1e-4
        assert all(float(r["val_top1"]) < float(row["target_top1"]) + 1e-4 for r in rows[:rows.index(first)])


def model_weights(run_dir: Path) -> dict[str, Any]:
    import torch

    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def different_tensors(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    import torch

    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def progress_steps(log: str) -> list[int]:
    """Steps of the ``epoch E/N step S/T ...`` progress lines of a training log, in order."""
    return [int(s) for s in re.findall(r"^epoch \d+/\d+ step (\d+)/\d+ ", log, flags=re.M)]
