"""Evaluate a run's final checkpoint on the val shards: top-1, top-5 and per-class top-1 over every
val sample exactly once (resize to 256/224 of the train crop, centre crop), through submitit like
training. The sample count must equal the val manifest's, or the evaluation fails."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch

from .config import ConfigError, LauncherConfig
from .data.checksums import sha256_file
from .data.epochs import TrainSamples
from .data.loader import ValSpec, val_loader
from .data.manifest import verify_manifest
from .data.sources import DataError
from .files import write_json
from .jobs.submit import run_job
from .jobs.task import lightning_environment
from .train.modelfile import load_model
from .train.module import Evaluator
from .train.trainer import build_trainer, resolve_accelerator
from .watch import ProgressLines, open_progress_fd


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What an evaluation job needs; pickled by submitit into the job folder."""

    model_path: str
    val_manifest: str
    batch_size: int
    devices: int
    workers: int
    launcher: LauncherConfig  # how the job was sized: its CPUs per task and DDP timeout


def evaluate(spec: EvalSpec, cluster_environment) -> dict[str, Any] | None:
    model_file = load_model(spec.model_path)
    run = model_file.run
    accelerator = resolve_accelerator(dataclasses.replace(run, decode_device="cpu"))
    manifest = verify_manifest(spec.val_manifest)
    module = Evaluator(run, model_file.network, model_file.num_classes)
    if accelerator == "gpu":
        module.model.to(memory_format=torch.channels_last)
    trainer = build_trainer(accelerator, run.precision, 1, spec.devices, cluster_environment,
                            spec.launcher.ddp_timeout_s, spec.launcher.cpus_per_task,
                            logger=False, enable_progress_bar=False, enable_checkpointing=False)
    loader_spec = ValSpec(TrainSamples.from_manifest(spec.val_manifest, manifest), trainer.global_rank,
                          trainer.world_size, spec.batch_size, run.image_size, run.eval_resize, spec.workers)
    start = time.perf_counter()
    trainer.validate(module, dataloaders=val_loader(loader_spec, pin_memory=accelerator == "gpu"), verbose=False)
    if not trainer.is_global_zero:
        return None
    results = dict(module.results)
    results["wall_s"] = round(time.perf_counter() - start, 3)
    results["per_class_top1"] = dict(zip(model_file.wnids, results.pop("per_class")))
    return results


class EvalJob:
    """Submitit's callable for one evaluation (a :class:`~flashnet.jobs.submit.JobKind`)."""

    command = "evaluate"
    activity = "evaluation"
    nodes = 1

    def __init__(self, spec: EvalSpec, run_name: str):
        self.spec, self.run_name = spec, run_name
        self.job_name, self.tasks_per_node = f"flashnet-eval-{run_name}", spec.devices

    def before_submit(self) -> str:
        return ""

    def __call__(self) -> dict[str, Any] | None:
        return evaluate(self.spec, lightning_environment())


def evaluate_from_cli(args: argparse.Namespace) -> None:
    run_dir = args.run_dir
    summary_path = run_dir / "summary.json"
    if not summary_path.exists() or not json.loads(summary_path.read_text()).get("finished"):
        raise DataError(f"{summary_path}: missing or unfinished: training did not finish")
    model_path = run_dir / "model.pt"
    model_file = load_model(model_path)  # checked here, before any job is queued; the job reads it again
    manifest = verify_manifest(args.val_manifest, full=True)
    if manifest["wnids"] != model_file.wnids:
        raise DataError(f"{model_path} was trained on other classes than {args.val_manifest} lists")
    launcher = LauncherConfig.from_dict(args.launcher)
    if launcher.cluster == "local" and args.devices > 1 and launcher.gpus_per_node == 0 and torch.cuda.is_available():
        raise ConfigError("evaluate.devices > 1 needs as many local devices")
    spec = EvalSpec(str(model_path.resolve()), str(args.val_manifest.resolve()), args.batch_size, args.devices,
                    args.workers, launcher)
    progress = ProgressLines(f"evaluate {model_file.name}", open_progress_fd(args.progress_fd))
    results = run_job(EvalJob(spec, model_file.name), launcher, run_dir / "jobs", progress, args.log_file)
    if results["samples"] != manifest["samples"]:
        raise DataError(f"evaluated {results['samples']} samples but {args.val_manifest} lists {manifest['samples']}")
    results.update(expected_samples=manifest["samples"], checkpoint=str(model_path),
                   checkpoint_sha256=sha256_file(model_path), run=model_file.name)
    write_json(args.out, results)
    progress.say(f"finished: top-1 {100 * results['top1']:.2f} %, top-5 {100 * results['top5']:.2f} % over "
                 f"{results['samples']} val images → {args.out}")
