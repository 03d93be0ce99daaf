"""Fake finished runs, in the formats training and evaluation write, for the report tests.

``make_run(name, ...)`` writes results/runs/<name>/{summary.json, metrics.csv, steps.csv, eval.json}
under the test's tmp_path: a learning curve that saturates towards ``final_top1``, a warmup +
polynomial-decay LR, a throughput that settles after a slow first epoch, and an evaluation that
differs slightly from the last per-epoch validation (so tests can tell which one the report used).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

TRAIN_IMAGES = 1000  # the default sample data: 10 classes × 100 train images
VAL_IMAGES = 300


def learning_curve(epochs: int, final_top1: float) -> list[float]:
    """Validation top-1 after each completed epoch: 1 − exp(−e/4), scaled to end at final_top1."""
    end = 1 - math.exp(-epochs / 4)
    return [round(final_top1 * (1 - math.exp(-e / 4)) / end, 4) for e in range(1, epochs + 1)]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, end_lr: float = 1e-4) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (peak - end_lr) * (1 - progress) ** 2 + end_lr


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    path = tmp_path / "results" / "runs"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def make_run(runs_dir):
    def make(name: str = "default", *, model: str = "resnet18", batch_size: int = 64, nodes: int = 1,
             devices_per_node: int = 2, epochs: int = 16, optimizer: str = "lars", lr: float = 2.0,
             precision: str = "32-true", accelerator: str = "cpu", device_name: str = "AMD EPYC 7B13 (2 cores)",
             images_per_s: float = 40.0, target_top1: float = 0.7, final_top1: float = 0.74,
             eval_top1: float | None = None, eval_top5: float = 0.9633, log_every_steps: int = 4,
             train_samples: int = TRAIN_IMAGES, mlperf: dict | None = None, timed_phases: bool = True) -> Path:
        """``mlperf``: keys that replace the summary's MLPerf figures (derived from the curve by default;
        ``{}`` for a run without them, as flashnet wrote before it had MLPerf logs). ``timed_phases``:
        False for a run trained before flashnet timed validation, checkpoints and start-up apart."""
        folder = runs_dir / name
        folder.mkdir()
        world_size = nodes * devices_per_node
        steps_per_epoch = math.ceil(TRAIN_IMAGES / batch_size)
        epoch_s = TRAIN_IMAGES / images_per_s
        first_epoch_s = 1.5 * epoch_s  # warm-up: the first epoch is slower
        top1 = learning_curve(epochs, final_top1)

        metrics, wall = [], 0.0
        for e in range(1, epochs + 1):
            seconds = first_epoch_s if e == 1 else epoch_s
            wall += seconds
            step = e * steps_per_epoch
            metrics.append([e, step, round(wall, 3), round(2.3 * math.exp(-e / 6), 4), top1[e - 1],
                            round(min(1.0, top1[e - 1] + 0.2), 4), round(TRAIN_IMAGES / seconds, 3),
                            lr_at(step - 1, epochs * steps_per_epoch, 2 * steps_per_epoch, lr), round(0.08 * epoch_s, 3)])
        header = ["epoch", "step", "wall_s", "train_loss", "val_top1", "val_top5", "images_per_s", "lr", "validation_s"]
        write_csv(folder / "metrics.csv", header if timed_phases else header[:-1],
                  metrics if timed_phases else [row[:-1] for row in metrics])

        steps = []
        total_steps = epochs * steps_per_epoch
        for step in range(0, total_steps, log_every_steps):
            epoch = step // steps_per_epoch
            rate = images_per_s / 1.5 if epoch == 0 else images_per_s * (1 + 0.03 * math.sin(step))
            wall_s = (first_epoch_s * min(step, steps_per_epoch)
                      + epoch_s * max(0, step - steps_per_epoch)) / steps_per_epoch
            steps.append([step, epoch, round(wall_s, 3), lr_at(step, total_steps, 2 * steps_per_epoch, lr),
                          round(2.3 * math.exp(-step / steps_per_epoch / 6), 4), round(rate, 3)])
        write_csv(folder / "steps.csv", ["step", "epoch", "wall_s", "lr", "train_loss", "images_per_s"], steps)

        reached = next((i for i, value in enumerate(top1) if value >= target_top1), None)
        train_seconds = metrics[-1][2]
        summary = {
            "run": name,
            "config": {"model": model, "image_size": 64, "epochs": epochs, "batch_size": batch_size,
                       "optimizer": optimizer, "lr": lr, "precision": precision, "nodes": nodes,
                       "devices_per_node": devices_per_node, "target_top1": target_top1, "warmup_epochs": 2,
                       "accelerator": accelerator, "seed": 0},
            "world_size": world_size, "accelerator": accelerator, "device_name": device_name,
            "precision": precision, "epochs": float(epochs), "steps": total_steps,
            "final_top1": top1[-1], "final_top5": metrics[-1][5], "target_top1": target_top1,
            "time_to_target_s": None if reached is None else metrics[reached][2],
            "epochs_to_target": None if reached is None else float(reached + 1),
            "train_seconds": train_seconds, "images_per_s": round(epochs * TRAIN_IMAGES / train_seconds, 3),
            "images_per_s_per_device": round(epochs * TRAIN_IMAGES / train_seconds / world_size, 3),
            "versions": {"torch": "2.14.1", "torchvision": "0.29.1", "pytorch_lightning": "2.6.6",
                         "python": "3.11.2"},
            "git_revision": "0123456789abcdef0123456789abcdef01234567", "finished": True,
            "train_samples": train_samples, "steps_per_epoch": steps_per_epoch,
            "mlperf": {
                "log": "mllog.txt", "division": "open", "division_setting": "auto", "closed_rules_broken": [],
                "status": "aborted" if reached is None else "success",
                "time_to_train_s": None if reached is None else round(metrics[reached][2] + 2.5, 3),
                "valid": reached is not None, "resumes": 0,
                "not_valid_because": "the run did not reach its target" if reached is None else None,
                "epoch_num_at_target": None if reached is None else reached + 1,
                "epochs_to_target": None if reached is None else float(reached + 1),
                **(mlperf or {}),
            },
        }
        if mlperf == {}:
            del summary["mlperf"]
        if timed_phases:
            summary.update(timing_split(train_seconds, epochs, epoch_s))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))

        evaluation = {
            "top1": round(top1[-1] + 0.004, 4) if eval_top1 is None else eval_top1, "top5": eval_top5,
            "samples": VAL_IMAGES, "expected_samples": VAL_IMAGES,
            "per_class_top1": {f"n{1440764 + i:08d}": round(0.6 + 0.03 * i, 3) for i in range(10)},
            "checkpoint_sha256": "ab" * 32, "wall_s": 4.2,
        }
        (folder / "eval.json").write_text(json.dumps(evaluation, indent=2))
        return folder

    return make


def timing_split(train_seconds: float, epochs: int, epoch_s: float) -> dict:
    """summary.json's split of the train time, for one job segment: a validation takes 8% of an
    epoch's time, a checkpoint 2% (one each per epoch), the start-up half an epoch."""
    validation, checkpoint, startup = 0.08 * epoch_s, 0.02 * epoch_s, 0.5 * epoch_s
    return {"validation_seconds": round(epochs * validation, 3), "validations": epochs,
            "checkpoint_seconds": round(epochs * checkpoint, 3), "checkpoints": epochs,
            "startup_seconds": round(startup, 3), "job_segments": 1,
            "step_seconds": round(train_seconds - epochs * (validation + checkpoint) - startup, 3)}


SETTINGS = {"projection_devices": 2048, "projection_epochs": 90, "link_gbps": 100, "link_latency_us": 5}


@pytest.fixture
def settings() -> dict:
    return dict(SETTINGS)
