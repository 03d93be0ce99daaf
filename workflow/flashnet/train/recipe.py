"""The training recipe, top to bottom: data, model, optimizer and schedule, resume, loop, outputs.

Runs in every process of the job (one per device); ranks and the process group come from the
cluster environment the launcher passes in. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import torchvision

from ..config import LauncherConfig, MlperfConfig, RunConfig
from ..data.epochs import TrainSamples
from ..files import write_json
from ..mlperf.log import MLPerfLog, platform_name
from ..runfolder import SUMMARY_FILE, record_failure
from . import checkpoints
from .callbacks import EvalSchedule, NonFiniteLoss, PlainProgress, ResumeCheckpoints, RunRecords, StopRequest
from .clock import TrainClock
from .datamodule import ShardData
from .health import Diverged, RunHealth
from .modelfile import save_model
from .module import ImageNetClassifier
from .schedule import run_steps_per_epoch, schedule_for_run, total_steps
from .startup import checked_once, join_process_group
from .trackers import ForwardRecords, build_loggers
from .trainer import allreduce_dtype, build_trainer, device_name, resolve_accelerator
from .warmup import Warmup, val_batch_sizes

# Lightning cannot see that the train loader resumes by itself (from the restored global step) and
# that each worker's share of an epoch is exact by construction; its warnings say otherwise.
warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
# A local run on a machine that has SLURM's tools is still a local run.
warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What a training job needs; pickled by submitit into the job folder."""

    name: str
    run: dict[str, Any]
    train_manifest: str
    val_manifest: str
    out_dir: str
    launcher: LauncherConfig  # how the job was sized: its CPUs per task and DDP timeout
    mlperf: dict[str, Any] = dataclasses.field(default_factory=dict)  # the config's mlperf section

    @property
    def checkpoint(self) -> Path:
        return Path(self.out_dir) / "checkpoints" / "last.ckpt"


def prepare_for_device(model: torch.nn.Module, accelerator: str, compile_mode: str | None) -> None:
    """GPU: channels_last weights (the layout Tensor Core convolutions want) and cuDNN's autotuner;
    then ``torch.compile`` of the network (loss, bookkeeping and optimizer stay eager)."""
    if accelerator == "gpu":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    if compile_mode == "default":
        model.compile()
    elif compile_mode is not None:
        model.compile(mode=compile_mode)


def warmup_callbacks(run: RunConfig, val_manifest: dict) -> list[pl.Callback]:
    """The warm-up before MLPerf's run_start (train/warmup.py), when the run asks for it: the train
    batch and every val batch size of the val plan (the per-device batch, as ShardData's)."""
    if not run.warmup_before_run_start:
        return []
    sizes = val_batch_sizes(val_manifest["samples"], run.world_size, run.per_device_batch)
    return [Warmup(run.image_size, run.per_device_batch, sizes, decode_on_device=run.decode_device == "cuda")]


def train(spec: TrainSpec, cluster_environment, stop: StopRequest,
          extra_callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any] | None:
    """Train (or resume) ``spec`` in this process; returns the summary on rank 0."""
    run = RunConfig.from_dict(spec.run, spec.name)
    out_dir = Path(spec.out_dir)
    accelerator = resolve_accelerator(run)
    pl.seed_everything(run.seed, workers=False, verbose=False)
    # Start-up checks by rank 0 alone, broadcast: the shards are there and whole, and the newest
    # intact resume checkpoint (CRC-read once); rank 0 reports what it skipped (train/startup.py).
    join_process_group(cluster_environment, run.nodes, run.devices_per_node, accelerator,
                       spec.launcher.ddp_timeout_s)
    checks, train_manifest, val_manifest = checked_once(spec.checkpoint, spec.train_manifest, spec.val_manifest)
    resume, skipped = checks.resume, checks.skipped
    resuming = resume is not None
    mlperf_log = MLPerfLog(out_dir, run, MlperfConfig.from_dict(spec.mlperf).to_dict(),
                           platform_name(run.world_size, device_name(accelerator)), resumed=resuming)

    # data: the manifests are the contract with the data stage
    spe = run_steps_per_epoch(run, train_manifest["samples"])
    mlperf_log.describe_data(train_manifest["samples"], val_manifest["samples"], spe)
    total = total_steps(run.epochs, spe)
    data = ShardData(run, TrainSamples.from_manifest(spec.train_manifest, train_manifest),
                     TrainSamples.from_manifest(spec.val_manifest, val_manifest), spe, total, run.per_device_batch,
                     run.loader_processes(spec.launcher.cpus_per_task))

    # model, optimizer and schedule (configure_optimizers), on the device's preferred layout
    schedule = schedule_for_run(run, spe)
    module = ImageNetClassifier(run.to_dict(), train_manifest["classes"], dataclasses.asdict(schedule))
    prepare_for_device(module.model, accelerator, "default" if run.compile else None)

    # loop, with its bookkeeping; resumes from the last checkpoint when there is one
    clock = TrainClock()
    records = RunRecords(out_dir, clock, run.batch_size, spe, run.log_every_steps, run.target_top1)
    spec.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpointing = ResumeCheckpoints(
        spec.checkpoint, run.checkpoint_every_minutes, run.log_every_steps, spe, stop,
        checkpoints.run_settings(run.to_dict(), spec.train_manifest, spec.val_manifest),
        scaler_watch=run.precision == "16-mixed", validates=run.is_eval_epoch, clock=clock)
    eval_schedule = EvalSchedule(run.is_eval_epoch, run.target_top1, run.stop_at_target)
    callbacks = [
        *extra_callbacks,
        clock,
        # first at a batch end: the ranks' one agreement, the loss over all ranks, the divergence rules
        RunHealth(checkpointing.agreement_flags, run.log_every_steps, train_manifest["classes"],
                  run.divergence_loss_factor, records),
        records,
        ForwardRecords(records, {"run_name": spec.name, **run.to_dict()}, out_dir),  # to the trackers, if any
        eval_schedule,  # before the checkpoint, so a checkpoint after the target says the run stopped
        *warmup_callbacks(run, val_manifest),  # on_fit_start: before mlperf_log's init_stop and run_start
        mlperf_log,
        checkpointing,
    ]
    interactive = sys.stderr.isatty()
    if not interactive:
        callbacks.append(PlainProgress(clock, total, spe, run.epochs, run.batch_size, run.log_every_steps))
    trainer = build_trainer(
        accelerator, run.precision, run.nodes, run.devices_per_node, cluster_environment,
        spec.launcher.ddp_timeout_s, spec.launcher.cpus_per_task, static_graph=not run.compile,
        max_epochs=math.ceil(run.epochs),
        max_steps=total,
        callbacks=callbacks,
        logger=build_loggers(run, spec.name, out_dir) or False,
        enable_checkpointing=True,
        enable_progress_bar=interactive,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=run.log_every_steps,
        default_root_dir=out_dir,
    )
    if trainer.is_global_zero:
        for note in skipped:
            print(note, flush=True)
        if resume:
            print(f"resuming from {resume}", flush=True)
    # Resume checkpoints hold tensors and plain values only, so nothing in them is unpickled as code.
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    except (NonFiniteLoss, Diverged) as diverged:  # every rank raises it; status and report read the record
        if trainer.is_global_zero:
            record_failure(out_dir, "diverged", str(diverged), step=trainer.global_step)
        raise

    if not trainer.is_global_zero:
        return None
    summary = write_outputs(spec, run, trainer, module, records, clock, train_manifest, accelerator,
                            eval_schedule.stopped_at_epoch, mlperf_log.summary(), checkpointing.layout_changes)
    checkpoints.remove_resume(spec.checkpoint)  # finished: a rerun must train afresh, not resume
    return summary


def write_outputs(spec: TrainSpec, run: RunConfig, trainer: pl.Trainer, module: ImageNetClassifier,
                  records: RunRecords, clock: TrainClock, train_manifest: dict, accelerator: str,
                  stopped_at_epoch: int | None, mlperf: dict[str, Any],
                  layout_changes: list[dict[str, Any]] = ()) -> dict[str, Any]:
    out_dir = Path(spec.out_dir)
    save_model(out_dir / "model.pt", spec.name, run, train_manifest["wnids"], module.model)
    records.write(trainer)
    last = records.epochs[-1]
    seconds, epochs = records.time_to_target()
    summary = {
        "run": spec.name,
        "config": run.to_dict(),
        "world_size": trainer.world_size,
        "nodes": run.nodes,
        "devices_per_node": run.devices_per_node,
        # resumed on another split of the global batch: each change (old → new), BN span included
        "layout_changes": list(layout_changes),
        "accelerator": accelerator,
        "device_name": device_name(accelerator),
        "precision": run.precision,
        "epochs": run.epochs,
        "steps": trainer.global_step,
        "steps_per_epoch": records.steps_per_epoch,
        "final_top1": last["val_top1"],
        "final_top5": last["val_top5"],
        "target_top1": run.target_top1,
        "stopped_at_target": stopped_at_epoch is not None,
        "stopped_at_epoch": stopped_at_epoch,
        "max_steps": total_steps(run.epochs, records.steps_per_epoch),
        "time_to_target_s": seconds,
        "epochs_to_target": epochs,
        # train_seconds: the fit's wall clock, split into step, validation, checkpoint and start-up time
        **clock.summary(trainer, trainer.global_step, run.batch_size),
        "steady_images_per_s_per_device": steady_rate(records.epochs, trainer.world_size),
        "gradient_allreduce_dtype": allreduce_dtype(run, accelerator),
        "train_samples": train_manifest["samples"],
        "mlperf": mlperf,
        "versions": software_versions(),
        "git_revision": git_revision(),
        "finished": True,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def steady_rate(epochs: list[dict[str, Any]], world_size: int) -> float | None:
    """Mean train images/s per device over epochs after the first (start-up and warm-up excluded)."""
    later = [row["images_per_s"] for row in epochs[1:]]
    return round(sum(later) / len(later) / world_size, 2) if later else None


def software_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "cuda": torch.version.cuda or "",
    }


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
