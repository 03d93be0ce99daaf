"""Submitting training to submitit (local processes or SLURM) and surviving time limits.

The only module that knows about submitit and SLURM. The job is a callable object whose
``checkpoint()`` returns a resubmission of itself (submitit's protocol). Submitit owns requeueing;
Lightning's own SLURM requeue is off (``SLURMEnvironment(auto_requeue=False)``).

On the USR2 signal submitit's handler would checkpoint and requeue immediately, mid-step. Instead
the job notes the request, the training loop checkpoints at the next agreed batch boundary (all
ranks together), and only then rank 0 hands over to submitit's handler, which calls
``checkpoint()`` and requeues the job; the requeued job resumes from that checkpoint.

The waiting side follows a SLURM job by SLURM's own state, through requeues (submitit's, an
``scontrol requeue``, a preemption), until it has ended for good. A node failure is the exception:
the job is cancelled and the rule fails, and a rerun resumes from the last checkpoint
(:func:`slurm_job_finished` says why).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment

from ..config import ConfigError, LauncherConfig, MlperfConfig, RunConfig
from ..data.manifest import verify_manifest
from ..progress import format_duration
from ..runfolder import short_reason
from ..watch import ProgressLines, Snapshot, open_progress_fd
from . import checkpoints
from .callbacks import Preempted, StopRequest
from .recipe import TrainSpec, resolve_accelerator, steps_per_epoch, train
from .trackers import TRACKER_KEYS, require_packages


class JobFailed(RuntimeError):
    """The submitted job failed; the message says why and where its logs are."""


def lightning_environment(job_env: submitit.JobEnvironment | None = None):
    """The cluster environment Lightning should take ranks from in this submitit job."""
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    job_env = job_env or submitit.JobEnvironment()
    if job_env.cluster == "slurm":
        return SLURMEnvironment(auto_requeue=False)
    # Local processes: export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK as torchrun would.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return LightningEnvironment()


class TrainJob:
    """Submitit's callable: trains ``spec`` in every task of the job."""

    def __init__(self, spec: TrainSpec):
        self.spec = spec

    def __call__(self) -> dict[str, Any] | None:
        job_env = submitit.JobEnvironment()
        stop = StopRequest()
        usr_signal = job_env._usr_sig()
        submitit_handler = signal.getsignal(usr_signal)
        signal.signal(usr_signal, lambda signum, frame: stop.request(f"signal {signal.Signals(signum).name}"))
        try:
            return train(self.spec, lightning_environment(job_env), stop)
        except Preempted as preempted:
            print(f"{preempted}; requeueing", flush=True)
            if job_env.global_rank == 0 and callable(submitit_handler):
                submitit_handler(usr_signal, None)  # calls checkpoint(), requeues, exits
            sys.exit(-1)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        # State lives in the resume checkpoint on disk, so resubmitting the same job resumes it.
        return DelayedSubmission(TrainJob(self.spec))


# --------------------------------------------------------------------------- submitting side


def private_dir(path: Path) -> Path:
    """A folder only the user can enter: submitit runs the pickles it finds there."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def make_executor(launcher: LauncherConfig, nodes: int, tasks_per_node: int, folder: Path, job_name: str):
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher.cluster,
                                     slurm_max_num_timeout=launcher.max_num_timeout,
                                     local_max_num_timeout=launcher.max_num_timeout)
    parameters: dict[str, Any] = {
        "name": job_name,
        "timeout_min": launcher.timeout_min,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": launcher.cpus_per_task,
    }
    if launcher.gpus_per_node:
        parameters["gpus_per_node"] = launcher.gpus_per_node
    if launcher.mem_gb_per_node:
        parameters["mem_gb"] = launcher.mem_gb_per_node
    if launcher.cluster == "slurm":
        parameters.update(
            slurm_signal_delay_s=launcher.signal_delay_s,
            slurm_additional_parameters=dict(launcher.slurm_extra),
            slurm_setup=list(launcher.setup),
        )
        if launcher.slurm_partition:
            parameters["slurm_partition"] = launcher.slurm_partition
        if launcher.slurm_account:
            parameters["slurm_account"] = launcher.slurm_account
    else:
        # submitit's AutoExecutor takes no signal delay for local jobs: they get USR2 30 s before the limit.
        parameters.update(local_setup=list(launcher.setup))
    executor.update_parameters(**parameters)
    return executor


def check_before_submitting(run: RunConfig, launcher: LauncherConfig, train_manifest: Path, val_manifest: Path) -> None:
    """Everything that can be known wrong before a job is queued."""
    if launcher.cluster == "local" and run.nodes > 1:
        raise ConfigError(f"nodes: {run.nodes}, but launcher.cluster is local (one machine); use the slurm profile")
    if launcher.cluster == "local":  # the job runs here: what the node would refuse, refused now
        resolve_accelerator(run)
    train_m, val_m = verify_manifest(train_manifest, full=True), verify_manifest(val_manifest, full=True)
    if train_m["wnids"] != val_m["wnids"]:
        raise ConfigError(f"{train_manifest} and {val_manifest} list different classes")
    steps_per_epoch(train_m["samples"], run.batch_size)


def set_aside_stale_checkpoint(spec: TrainSpec, fresh: bool = False) -> None:
    """A resume checkpoint made with other settings (or other shards) is moved aside, not reused;
    so is any, with ``fresh`` (``--forcerun train``)."""
    folder = spec.checkpoint.parent
    trained = {key: value for key, value in spec.run.items() if key not in TRACKER_KEYS}  # not what is logged
    fingerprint = {"run": trained, "train": _sha(spec.train_manifest), "val": _sha(spec.val_manifest)}
    record = folder / "settings.json"
    changed = record.exists() and json.loads(record.read_text()) != fingerprint
    if checkpoints.has_resume(spec.checkpoint) and (changed or fresh):
        aside = folder.with_name(f"checkpoints.{'stale' if changed else 'forced'}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(folder, aside)
        why = "the run's settings or shards changed since" if changed else "--forcerun train: not resuming from"
        print(f"{why} {spec.checkpoint}: moved it to {aside}; training starts afresh", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(fingerprint, sort_keys=True))


def _sha(path: str) -> str:
    from ..data.checksums import sha256_file

    return sha256_file(path)


class LogFollower:
    """Copies what the job's rank-0 task appends to its stdout into this process's log."""

    def __init__(self, job):
        self.job, self.offset = job, 0

    def poll(self) -> str:
        """Copy what is new; return it (for the progress lines)."""
        path = self.job.paths.stdout
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        text = data.decode(errors="replace")
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
        return text


# The controller's job states after which a SLURM job runs no more. A requeued job (submitit's own
# requeue, `scontrol requeue`, a preemption or a node failure) goes back to PENDING instead.
SLURM_FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "REVOKED", "TIMEOUT",
})


def _slurm(*command: str) -> subprocess.CompletedProcess:
    """Run a SLURM client command; a failure or time-out (a busy controller) reads as no answer."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return subprocess.CompletedProcess(command, 1, "", str(error))


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as slurmctld sees it now (sacct lags it by seconds); None once the controller
    has forgotten the job (MinJobAge after its end)."""
    proc = _slurm("scontrol", "show", "job", "-o", job_id)
    if proc.returncode != 0:
        return None
    for word in proc.stdout.split():
        key, _, value = word.partition("=")
        if key == "JobState":
            return value
    return None


def slurm_attempts(job_id: str) -> list[dict[str, str]]:
    """Every run of the job so far, oldest first (sacct -D: a requeued job keeps one record per
    run): [{"State": ..., "NodeList": ...}, ...]."""
    proc = _slurm("sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "JobID,State,NodeList")
    rows = []
    for line in proc.stdout.splitlines():
        job, _, rest = line.partition("|")
        state, _, nodes = rest.partition("|")
        if job == job_id:
            rows.append({"State": state.split()[0] if state else "UNKNOWN", "NodeList": nodes})
    return rows


def slurm_node_states(node_list: str) -> str:
    """``flashnet-n1 idle, flashnet-n2 down*`` for the nodes of a node list (best effort)."""
    proc = _slurm("sinfo", "-h", "-N", "-n", node_list, "-o", "%N %t")
    return ", ".join(line.strip() for line in proc.stdout.splitlines() if line.strip()) or "unknown"


def _job_logs(job) -> str:
    return f"logs: {job.paths.stdout} and {job.paths.stderr}"


def slurm_job_finished(job) -> bool:
    """Whether the SLURM job has ended for good. Raises :class:`JobFailed` after cancelling it if it
    lost a node.

    Only SLURM's state counts: submitit's result files can be left by an earlier run of a requeued
    job (a rank that failed as the requeue killed it), so they do not mean the job is over.

    After a node failure SLURM requeues the job (JobRequeue), and a multi-node job then waits until
    enough nodes are up again, perhaps for ever, with nothing in the workflow waiting for it. The job
    is cancelled instead and the rule fails; rerunning the workflow (or Snakemake's --retries)
    submits it afresh, and it resumes from its last checkpoint.
    """
    attempts = slurm_attempts(job.job_id)
    lost = [attempt for attempt in attempts if attempt["State"] == "NODE_FAIL"]
    if lost:
        nodes = lost[-1]["NodeList"]
        state = cancel_slurm_job(job)
        cancelled = ("so it was cancelled" if state in (None, "CANCELLED") else
                     f"and it could not be cancelled (still {state}): scancel {job.job_id} before rerunning")
        raise JobFailed(
            f"job {job.job_id} lost a node (NODE_FAIL; its nodes {nodes} are now: {slurm_node_states(nodes)}). "
            f"SLURM requeues such a job and it would wait until enough nodes are back, {cancelled}.\n"
            f"{_job_logs(job)}; rerunning the workflow resumes from the last checkpoint if one was written"
        )
    state = slurm_job_state(job.job_id)
    if state is None:  # the controller has forgotten it: accounting has the last word
        state = attempts[-1]["State"] if attempts else "UNKNOWN"
    return state in SLURM_FINAL_STATES


def cancel_slurm_job(job, timeout_s: float = 60.0, poll_s: float = 1.0) -> str | None:
    """scancel until slurmctld holds the job CANCELLED (or has forgotten it); return its last state.
    One scancel can be lost: under load, one that reached a job in the middle of its requeue after
    a NODE_FAIL left it pending for its nodes, with nothing waiting for it (seen on the test cluster)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job.cancel(check=False)
        state = slurm_job_state(job.job_id)
        if state in (None, "CANCELLED") or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def job_finished(job) -> bool:
    if isinstance(job, submitit.SlurmJob):
        return slurm_job_finished(job)
    return job.done(force_check=True)


def job_snapshot(job) -> Snapshot:
    """The scheduler's view of the job, for the progress lines."""
    if isinstance(job, submitit.SlurmJob):
        attempts = slurm_attempts(job.job_id)
        state = slurm_job_state(job.job_id) or (attempts[-1]["State"] if attempts else "UNKNOWN")
        return Snapshot(state, attempts[-1]["NodeList"] if attempts else "", max(len(attempts), 1))
    return Snapshot(job.state, "this machine")


def wait(job, poll_s: float, progress: ProgressLines | None = None) -> Any:
    """Wait for the job, following its log (and saying how it goes, given ``progress``); raise
    :class:`JobFailed` with the reason and log paths."""
    follower = LogFollower(job)
    while not job_finished(job):
        text = follower.poll()
        if progress:
            progress.update(job_snapshot(job), text)
        time.sleep(poll_s)
    text = follower.poll()
    if progress:
        progress.update(job_snapshot(job), text)
    try:
        results = job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
        state = (slurm_job_state(job.job_id) if isinstance(job, submitit.SlurmJob) else None) or job.state
        raise JobFailed(
            f"job {job.job_id} ({state}) failed:\n{error}\n"
            f"{_job_logs(job)}; rerunning the workflow resumes from the last "
            f"checkpoint if one was written"
        ) from None
    return results[0]


ACTIVE_JOB = "active.json"


def job_still_running(record: dict[str, str]) -> bool:
    """Whether a job recorded in ``jobs/active.json`` by an earlier, killed waiter still runs."""
    if record.get("cluster") == "slurm":
        state = slurm_job_state(record["job_id"])
        return state is not None and state not in SLURM_FINAL_STATES
    try:  # local: the job id is the pid of submitit's controller process
        cmdline = Path(f"/proc/{int(record['job_id'])}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit.local" in cmdline


def waiter_alive(record: dict[str, Any]) -> bool:
    """Whether the process that follows the job (``flashnet train``/``evaluate``) still runs. On
    another host this cannot be told, so it counts as alive."""
    if record.get("host") != socket.gethostname():
        return "host" in record
    try:
        return b"flashnet" in Path(f"/proc/{int(record['pid'])}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return False


def refuse_if_running(folder: Path) -> None:
    """One job per run: a second one would write into the same checkpoint folder. Only reads and
    raises while the job runs: the running run's files are not this invocation's to touch."""
    path = folder / ACTIVE_JOB
    if not path.exists():
        return
    record = json.loads(path.read_text())
    if job_still_running(record):
        job = f"{record['cluster']} job {record['job_id']}"
        stop = f"scancel {record['job_id']}" if record["cluster"] == "slurm" else f"kill {record['job_id']}"
        if waiter_alive(record):
            raise JobFailed(f"{job} of this run is being followed by another invocation (host {record['host']}, "
                            f"pid {record['pid']}, results in {folder.parent}); wait for it to end, or stop it and "
                            f"its job ({stop}), then rerun")
        raise JobFailed(f"{job} of this run is still running (its waiting process was killed); wait for it to end "
                        f"or stop it ({stop}), then rerun")
    path.unlink()


def follow(job, folder: Path, cluster: str, poll_s: float, progress: ProgressLines | None = None) -> Any:
    """:func:`wait` for ``job``, recorded in ``folder`` while it runs; if this process is told to stop
    (Ctrl-C, a SIGTERM), the job is cancelled rather than left running with nobody waiting for it."""
    record = folder / ACTIVE_JOB
    record.write_text(json.dumps({"cluster": cluster, "job_id": str(job.job_id), "host": socket.gethostname(),
                                  "pid": os.getpid()}))

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        return wait(job, poll_s, progress)
    except KeyboardInterrupt as why:
        if isinstance(job, submitit.SlurmJob):
            cancel_slurm_job(job, timeout_s=10.0)
        else:
            job.cancel(check=False)
        raise JobFailed(f"interrupted ({why or 'SIGINT'}): cancelled job {job.job_id}; rerunning resumes from the "
                        f"last checkpoint if one was written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        record.unlink(missing_ok=True)


def submit_training(spec: TrainSpec, run: RunConfig, launcher: LauncherConfig, fresh: bool = False):
    folder = private_dir(Path(spec.out_dir) / "jobs")
    refuse_if_running(folder)
    set_aside_stale_checkpoint(spec, fresh)
    resume_from = checkpoints.choose_resume(spec.checkpoint, set_aside=True)
    executor = make_executor(launcher, run.nodes, run.devices_per_node, folder, f"flashnet-train-{spec.name}")
    job = executor.submit(TrainJob(spec))
    resume = f" (resuming from {resume_from})" if resume_from else ""
    print(f"submitted {launcher.cluster} job {job.job_id} for run {spec.name}{resume}; "
          f"{run.nodes} node(s) × {run.devices_per_node} device(s); logs in {job.paths.folder}", flush=True)
    return job


def train_from_cli(args: argparse.Namespace) -> None:
    run = RunConfig.from_dict(args.run, args.name)
    launcher = LauncherConfig.from_dict(args.launcher)
    check_before_submitting(run, launcher, args.train_manifest, args.val_manifest)
    require_packages(run, args.name)
    spec = TrainSpec(args.name, run.to_dict(), str(args.train_manifest.resolve()), str(args.val_manifest.resolve()),
                     str(args.out_dir.resolve()), launcher.ddp_timeout_s, launcher.cpus_per_task,
                     mlperf=MlperfConfig.from_dict(args.mlperf).to_dict())
    progress = ProgressLines(f"train {args.name}", open_progress_fd(args.progress_fd), args.out_dir, run.epochs,
                             run.batch_size, verify_manifest(args.train_manifest)["samples"])
    try:
        job = submit_training(spec, run, launcher, args.fresh)
        progress.submitted(launcher.cluster, str(job.job_id), args.log_file, job.paths.folder)
        summary = follow(job, job.paths.folder, launcher.cluster, launcher.poll_s, progress)
    except JobFailed as error:
        progress.say(f"failed: {short_reason(str(error))}" + (f" (see {args.log_file})" if args.log_file else ""))
        print(f"flashnet train: {error}", file=sys.stderr)
        raise SystemExit(1)
    top1 = summary["final_top1"]
    reached = summary["time_to_target_s"]
    progress.say(f"finished: top-1 {100 * top1:.1f} % after {format_duration(summary['train_seconds'])} of training; "
                 f"target {100 * summary['target_top1']:.1f} % "
                 + (f"reached at {format_duration(reached)}" if reached is not None else "not reached"))
