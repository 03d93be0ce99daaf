"""Training as a job: the callable submitit runs in every task, what is checked and set aside before
it is submitted, and ``flashnet train``. Submitting, following and failing are the job layer's
(:mod:`flashnet.jobs`), as for every kind of job.

On the preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) the job notes the
request, the training loop checkpoints at the next agreed batch boundary (all ranks together), and
only then hands over to submitit (:class:`~flashnet.jobs.task.Preemption`), which calls
``checkpoint()`` and requeues the job; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import RESULT_NEUTRAL_KEYS, ConfigError, LauncherConfig, MlperfConfig, RunConfig, defaults
from ..data.manifest import verify_manifest
from ..jobs.submit import run_job, submit
from ..jobs.task import Preemption, lightning_environment, resubmission
from ..progress import format_duration
from ..runfolder import FAILURE_FILE
from ..watch import ProgressLines, open_progress_fd
from . import checkpoints
from .callbacks import Preempted, StopRequest, layout_change, layout_of
from .recipe import TrainSpec, train
from .schedule import run_steps_per_epoch
from .trackers import check_trackers
from .trainer import resolve_accelerator
from .watchdog import Watchdog, WatchdogLimits


class TrainJob:
    """Submitit's callable: trains ``spec`` in every task of the job (a :class:`~flashnet.jobs.submit.JobKind`)."""

    command = "train"
    activity = ""  # the progress lines' label already says train

    def __init__(self, spec: TrainSpec, fresh: bool = False, say=print):
        self.spec, self.fresh = spec, fresh
        self.say = say  # the submitting side's lines: the progress lines on the terminal, or stdout
        run = RunConfig.from_dict(spec.run, spec.name)
        self.run_name, self.job_name = spec.name, f"flashnet-train-{spec.name}"
        self.nodes, self.tasks_per_node = run.nodes, run.devices_per_node

    def __getstate__(self) -> dict[str, Any]:
        # submitit pickles the job into its folder; the terminal stays on the submitting side
        return {key: value for key, value in self.__dict__.items() if key != "say"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, say=print)

    def before_submit(self) -> str:
        resume_from = decide_resume(self.spec, self.fresh, self.say)
        (Path(self.spec.out_dir) / FAILURE_FILE).unlink(missing_ok=True)  # the last job's; this one starts clean
        return f" (resuming from {resume_from})" if resume_from else ""

    def __call__(self) -> dict[str, Any] | None:
        stop = StopRequest()
        preemption = Preemption(stop.request)
        try:
            watchdog = Watchdog(WatchdogLimits.from_launcher(self.spec.launcher), Path(self.spec.out_dir))
            return train(self.spec, lightning_environment(), stop, extra_callbacks=[watchdog])
        except Preempted as preempted:
            print(f"{preempted}; requeueing", flush=True)
            preemption.hand_over()

    def checkpoint(self, *args, **kwargs):
        # State lives in the resume checkpoint on disk, so resubmitting the same job resumes it.
        return resubmission(TrainJob(self.spec))


def check_before_submitting(run: RunConfig, launcher: LauncherConfig, train_manifest: Path, val_manifest: Path) -> None:
    """Everything that can be known wrong before a job is queued."""
    if launcher.cluster == "local" and run.nodes > 1:
        raise ConfigError(f"nodes: {run.nodes}, but launcher.cluster is local (one machine); use the slurm profile")
    if launcher.cluster == "local":  # the job runs here: what the node would refuse, refused now
        resolve_accelerator(run)
    train_m, val_m = verify_manifest(train_manifest, full=True), verify_manifest(val_manifest, full=True)
    if train_m["wnids"] != val_m["wnids"]:
        raise ConfigError(f"{train_manifest} and {val_manifest} list different classes")
    run_steps_per_epoch(run, train_m["samples"])


# Keys whose change cannot change the trained weights (the schema marks them x-result-neutral: how
# fast data is read, what is logged where, how often checkpoints are written), and
# checkpoint_every_steps, the key checkpoint_every_minutes replaced, still in older checkpoints' settings.
RESUME_NEUTRAL_KEYS = RESULT_NEUTRAL_KEYS | {"checkpoint_every_steps"}
# How the global batch is split over devices: the sample order and the LR follow the global batch
# (data/epochs.py, train/schedule.py), and the optimizer state is not sharded, so a run resumes on
# another split; only a changed BN span (bn_span null: the per-device batch) changes the weights.
LAYOUT_KEYS = ("nodes", "devices_per_node")
STALE_PREFIX = "checkpoints.stale-"
LEGACY_SETTINGS = "settings.json"  # the settings beside the checkpoint before they moved inside it


def result_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old → new`` for each difference between two :func:`.checkpoints.run_settings` that
    changes the result (a key absent on one side counts as its schema default)."""
    run_defaults = defaults("$defs/run")
    changes = []
    for key in sorted(set(saved["run"]) | set(now["run"])):
        if key in RESUME_NEUTRAL_KEYS or key in LAYOUT_KEYS:
            continue
        old, new = (side["run"].get(key, run_defaults.get(key)) for side in (saved, now))
        if old != new:
            changes.append(f"{key}: {json.dumps(old)} → {json.dumps(new)}")
    for split in ("train", "val"):
        if saved[split] != now[split]:
            changes.append(f"{split} shards: manifest sha256 {saved[split][:12]}… → {now[split][:12]}…")
    return changes


def describe_layout_change(saved_run: dict[str, Any], run: dict[str, Any]) -> str | None:
    """The terminal's line for a resume on another device layout, or None for the same layout."""
    change = layout_change(layout_of(saved_run), layout_of(run))
    if not change:
        return None
    line = ", ".join(f"{key} {value}" for key, value in change.items())
    if "bn_span" in change:
        return (f"resuming on another layout ({line}): sample order and learning rate continue exactly; BatchNorm now "
                f"normalises over {change['bn_span'].split(' → ')[1]} samples, so the weights differ from an "
                "uninterrupted run's (summary.json's layout_changes records it)")
    return f"resuming on another layout ({line}): sample order, learning rate and BN span unchanged"


def read_saved_settings(checkpoint: Path) -> dict[str, Any] | None:
    """The settings a resume checkpoint was made with: inside it, or (older format) settings.json
    beside it; None if neither says."""
    saved = checkpoints.saved_settings(checkpoint)
    legacy = checkpoint.parent / LEGACY_SETTINGS
    if saved is None and legacy.exists():
        saved = json.loads(legacy.read_text())
    return saved


def set_aside(folder: Path, label: str) -> tuple[Path, list[Path]]:
    """Move the checkpoint folder to ``checkpoints.<label>-<time>``; the earlier set-aside copies go
    (each is as large as the checkpoints, ~200 MB for ResNet-50): at most one is kept."""
    earlier = sorted(folder.parent.glob("checkpoints.stale-*")) + sorted(folder.parent.glob("checkpoints.forced-*"))
    for old in earlier:
        shutil.rmtree(old)
    aside = folder.with_name(f"checkpoints.{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(folder, aside)
    return aside, earlier


def decide_resume(spec: TrainSpec, fresh: bool = False, say=print) -> Path | None:
    """Before submission (costs no job time): the resume checkpoint the job will start from, or None.

    Decided per key against the settings inside the checkpoint: a result-neutral key or another
    device layout at the same global batch resumes (a layout change is said); a key that changes
    the result, other shards, a checkpoint that carries no settings (nothing tells what it was made
    with: resuming it under today's config could silently train on another schedule, issue 22 case
    2), or ``fresh`` (``--forcerun train``) set the checkpoint folder aside, with a line naming the
    key(s) old → new. ``say`` reaches the person's terminal (the progress lines)."""
    folder = spec.checkpoint.parent
    resume = checkpoints.choose_resume(spec.checkpoint, set_aside=True, say=say)
    now = checkpoints.run_settings(spec.run, spec.train_manifest, spec.val_manifest)
    why = None
    if resume is not None and fresh:
        why, label = f"--forcerun train: not resuming from {resume}", "forced"
    elif resume is not None:
        saved = read_saved_settings(resume)
        changes = None if saved is None else result_changes(saved, now)
        if saved is None:
            why = (f"{resume} carries no run settings (written by an older flashnet or copied in), so nothing "
                   "tells whether it fits this run; not resuming from it")
        elif changes:
            why = f"the run's settings changed since {resume} ({'; '.join(changes)})"
        else:
            layout = describe_layout_change(saved["run"], now["run"])
            if layout:
                say(layout)
        label = "stale"
    if why:
        aside, removed = set_aside(folder, label)
        say(f"{why}: moved it to {aside}; training starts afresh"
            + (f" (removed the earlier set-aside {', '.join(map(str, removed))})" if removed else ""))
        resume = None
    folder.mkdir(parents=True, exist_ok=True)
    if resume is None:  # the settings now travel inside the checkpoint; kept while an older one is resumed
        (folder / LEGACY_SETTINGS).unlink(missing_ok=True)
    return resume


def submit_training(spec: TrainSpec, fresh: bool = False):
    """Submit the training job (no waiting); the job layer refuses while another job of the run runs."""
    return submit(TrainJob(spec, fresh), spec.launcher, Path(spec.out_dir) / "jobs")


def train_from_cli(args: argparse.Namespace) -> None:
    run = RunConfig.from_dict(args.run, args.name)
    launcher = LauncherConfig.from_dict(args.launcher)
    check_before_submitting(run, launcher, args.train_manifest, args.val_manifest)
    check_trackers(run, args.name)  # packages installed, servers answering: fail in seconds, not in the job
    spec = TrainSpec(args.name, run.to_dict(), str(args.train_manifest.resolve()), str(args.val_manifest.resolve()),
                     str(args.out_dir.resolve()), launcher, mlperf=MlperfConfig.from_dict(args.mlperf).to_dict())
    progress = ProgressLines(f"train {args.name}", open_progress_fd(args.progress_fd), args.out_dir, run.epochs,
                             run.batch_size, verify_manifest(args.train_manifest)["samples"],
                             epoch_steps=run.epoch_steps, ranks=run.world_size)
    summary = run_job(TrainJob(spec, args.fresh, say=progress.say), launcher, Path(spec.out_dir) / "jobs", progress,
                      args.log_file)
    top1 = summary["final_top1"]
    reached = summary["time_to_target_s"]
    progress.say(f"finished: top-1 {100 * top1:.1f} % after {format_duration(summary['train_seconds'])} of training; "
                 f"target {100 * summary['target_top1']:.1f} % "
                 + (f"reached at {format_duration(reached)}" if reached is not None else "not reached"))
