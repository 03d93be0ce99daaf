"""Evaluate a run's final checkpoint on the val shards: top-1, top-5 and per-class top-1 over every
val sample exactly once (resize to 256/224 of the train crop, centre crop), through submitit like
training. The sample count must equal the val manifest's, or the evaluation fails."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from .config import ConfigError, LauncherConfig, RunConfig
from .data.epochs import shard_paths
from .data.loader import ValSpec, val_loader
from .data.checksums import sha256_file
from .data.manifest import verify_manifest
from .data.sources import DataError
from .runfolder import short_reason
from .train import launch
from .train.module import Evaluator, build_model
from .train.recipe import MODEL_FORMAT, resolve_accelerator
from .watch import ProgressLines, open_progress_fd


def load_final_model(path: Path) -> dict[str, Any]:
    """Read model.pt (tensors and plain values only: ``weights_only=True``) and check it."""
    if not path.exists():
        raise DataError(f"{path}: missing: training did not finish")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise DataError(f"{path}: not a loadable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise DataError(f"{path}: not a flashnet model file")
    run = RunConfig.from_dict(record["run"], record["name"])
    try:
        build_model(run, record["num_classes"]).load_state_dict(record["state_dict"])
    except RuntimeError as error:
        raise DataError(f"{path}: weights do not fit a {run.model} with {record['num_classes']} classes: "
                        f"{str(error).splitlines()[0]}") from None
    return record


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    model_path: str
    val_manifest: str
    batch_size: int
    devices: int
    workers: int
    cpus_per_task: int = 1


def evaluate(spec: EvalSpec, cluster_environment) -> dict[str, Any] | None:
    record = load_final_model(Path(spec.model_path))
    run = RunConfig.from_dict(record["run"], record["name"])
    accelerator = resolve_accelerator(dataclasses.replace(run, decode_device="cpu"))
    if accelerator == "cpu":
        torch.set_num_threads(spec.cpus_per_task)
    manifest = verify_manifest(spec.val_manifest)
    module = Evaluator(run, record["num_classes"], record["state_dict"])
    if accelerator == "gpu":
        module.model.to(memory_format=torch.channels_last)
    strategy = "auto"
    if spec.devices > 1:
        strategy = DDPStrategy(cluster_environment=cluster_environment,
                               process_group_backend="nccl" if accelerator == "gpu" else "gloo")
    trainer = pl.Trainer(accelerator=accelerator, devices=spec.devices, strategy=strategy, logger=False,
                         precision=run.precision, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False,
                         plugins=[cluster_environment] if spec.devices == 1 and cluster_environment else None)
    loader_spec = ValSpec(shard_paths(spec.val_manifest, manifest), tuple(s["samples"] for s in manifest["shards"]),
                          trainer.global_rank, trainer.world_size, spec.batch_size, run.image_size, run.eval_resize,
                          spec.workers)
    start = time.perf_counter()
    trainer.validate(module, dataloaders=val_loader(loader_spec, pin_memory=accelerator == "gpu"), verbose=False)
    if not trainer.is_global_zero:
        return None
    results = dict(module.results)
    results["wall_s"] = round(time.perf_counter() - start, 3)
    results["per_class_top1"] = dict(zip(record["wnids"], results.pop("per_class")))
    return results


class EvalJob:
    """Submitit's callable for one evaluation."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec

    def __call__(self) -> dict[str, Any] | None:
        return evaluate(self.spec, launch.lightning_environment())


def evaluate_from_cli(args: argparse.Namespace) -> None:
    run_dir = args.run_dir
    summary_path = run_dir / "summary.json"
    if not summary_path.exists() or not json.loads(summary_path.read_text()).get("finished"):
        raise DataError(f"{summary_path}: missing or unfinished: training did not finish")
    model_path = run_dir / "model.pt"
    record = load_final_model(model_path)
    manifest = verify_manifest(args.val_manifest, full=True)
    if manifest["wnids"] != record["wnids"]:
        raise DataError(f"{model_path} was trained on other classes than {args.val_manifest} lists")
    launcher = LauncherConfig.from_dict(args.launcher)
    if launcher.cluster == "local" and args.devices > 1 and launcher.gpus_per_node == 0 and torch.cuda.is_available():
        raise ConfigError("evaluate.devices > 1 needs as many local devices")
    spec = EvalSpec(str(model_path.resolve()), str(args.val_manifest.resolve()), args.batch_size, args.devices,
                    args.workers, launcher.cpus_per_task)
    folder = launch.private_dir(run_dir / "jobs")
    progress = ProgressLines(f"evaluate {record['name']}", open_progress_fd(args.progress_fd))
    executor = launch.make_executor(launcher, 1, args.devices, folder, f"flashnet-eval-{record['name']}")
    try:
        launch.refuse_if_running(folder)
        job = executor.submit(EvalJob(spec))
        progress.submitted(launcher.cluster, str(job.job_id), args.log_file, job.paths.folder, "evaluation")
        results = launch.follow(job, folder, launcher.cluster, launcher.poll_s, progress)
    except launch.JobFailed as error:
        progress.say(f"failed: {short_reason(str(error))}" + (f" (see {args.log_file})" if args.log_file else ""))
        print(f"flashnet evaluate: {error}")
        raise SystemExit(1)
    if results["samples"] != manifest["samples"]:
        raise DataError(f"evaluated {results['samples']} samples but {args.val_manifest} lists {manifest['samples']}")
    results.update(expected_samples=manifest["samples"], checkpoint=str(model_path),
                   checkpoint_sha256=sha256_file(model_path), run=record["name"])
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, args.out)
    progress.say(f"finished: top-1 {100 * results['top1']:.2f} %, top-5 {100 * results['top5']:.2f} % over "
                 f"{results['samples']} val images → {args.out}")
