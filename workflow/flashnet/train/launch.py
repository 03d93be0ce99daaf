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

from ..config import ConfigError, LauncherConfig, MlperfConfig, RunConfig
from ..data.checksums import sha256_file
from ..data.manifest import verify_manifest
from ..files import write_json
from ..jobs.submit import run_job, submit
from ..jobs.task import Preemption, lightning_environment, resubmission
from ..progress import format_duration
from ..runfolder import FAILURE_FILE
from ..watch import ProgressLines, open_progress_fd
from . import checkpoints
from .callbacks import Preempted, StopRequest
from .recipe import TrainSpec, train
from .schedule import run_steps_per_epoch
from .trackers import TRACKER_KEYS, check_trackers
from .trainer import resolve_accelerator
from .watchdog import Watchdog, WatchdogLimits


class TrainJob:
    """Submitit's callable: trains ``spec`` in every task of the job (a :class:`~flashnet.jobs.submit.JobKind`)."""

    command = "train"
    activity = ""  # the progress lines' label already says train

    def __init__(self, spec: TrainSpec, fresh: bool = False):
        self.spec, self.fresh = spec, fresh
        run = RunConfig.from_dict(spec.run, spec.name)
        self.run_name, self.job_name = spec.name, f"flashnet-train-{spec.name}"
        self.nodes, self.tasks_per_node = run.nodes, run.devices_per_node

    def before_submit(self) -> str:
        set_aside_stale_checkpoint(self.spec, self.fresh)
        (Path(self.spec.out_dir) / FAILURE_FILE).unlink(missing_ok=True)  # the last job's; this one starts clean
        resume_from = checkpoints.choose_resume(self.spec.checkpoint, set_aside=True)
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


def set_aside_stale_checkpoint(spec: TrainSpec, fresh: bool = False) -> None:
    """A resume checkpoint made with other settings (or other shards) is moved aside, not reused;
    so is any, with ``fresh`` (``--forcerun train``)."""
    folder = spec.checkpoint.parent
    trained = {key: value for key, value in spec.run.items() if key not in TRACKER_KEYS}  # not what is logged
    fingerprint = {"run": trained, "train": sha256_file(spec.train_manifest), "val": sha256_file(spec.val_manifest)}
    record = folder / "settings.json"
    changed = record.exists() and json.loads(record.read_text()) != fingerprint
    if checkpoints.has_resume(spec.checkpoint) and (changed or fresh):
        aside = folder.with_name(f"checkpoints.{'stale' if changed else 'forced'}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(folder, aside)
        why = "the run's settings or shards changed since" if changed else "--forcerun train: not resuming from"
        print(f"{why} {spec.checkpoint}: moved it to {aside}; training starts afresh", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record, fingerprint, sort_keys=True)


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
    summary = run_job(TrainJob(spec, args.fresh), launcher, Path(spec.out_dir) / "jobs", progress, args.log_file)
    top1 = summary["final_top1"]
    reached = summary["time_to_target_s"]
    progress.say(f"finished: top-1 {100 * top1:.1f} % after {format_duration(summary['train_seconds'])} of training; "
                 f"target {100 * summary['target_top1']:.1f} % "
                 + (f"reached at {format_duration(reached)}" if reached is not None else "not reached"))
