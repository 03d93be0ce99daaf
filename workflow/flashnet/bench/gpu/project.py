"""The project's LightningModule as the pipeline builds it, and the batches it is fed, for the benchmark."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from flashnet.bench.gpu.configs import BenchConfig, Scale
from flashnet.data.sources import IMAGENET_COUNTS

IMAGENET_TRAIN_IMAGES = IMAGENET_COUNTS["train"]  # steps per epoch for the schedule: as a real ImageNet run
SCHEMA = Path(__file__).resolve().parents[3] / "schemas" / "config.schema.yaml"


def schema_run_defaults() -> dict[str, Any]:
    """Every run key's default from the config schema (ResNet-50, 224 px, LARS, MLPerf's values)."""
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    properties = schema["$defs"]["run"]["properties"]
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def bench_run(config: BenchConfig, scale: Scale, device: torch.device, workers: int) -> dict[str, Any]:
    """The run settings of one configuration: the schema's defaults with this benchmark's size."""
    run = schema_run_defaults()
    run.update(
        model=scale.model, image_size=scale.image_size, batch_size=scale.batch_size, nodes=1, devices_per_node=1,
        accelerator="gpu" if device.type == "cuda" else "cpu", precision=config.precision,
        compile=config.compile_mode is not None, loader_workers=workers,
        decode_device="cuda" if config.data == "shards-gpu" and device.type == "cuda" else "cpu",
    )
    return run


def build_module(run: dict[str, Any], num_classes: int):
    """An ImageNetClassifier with the schedule of a full ImageNet epoch count at this batch size, so
    the timed steps sit early in the warm-up like the first steps of a real run."""
    from flashnet.config import RunConfig
    from flashnet.train.module import ImageNetClassifier
    from flashnet.train.schedule import schedule_for_run

    config = RunConfig.from_dict(run, "bench")
    schedule = schedule_for_run(config, max(IMAGENET_TRAIN_IMAGES // config.batch_size, 1))
    return ImageNetClassifier(config.to_dict(), num_classes, dataclasses.asdict(schedule))


def prepare_like_recipe(module, device: torch.device, compile_mode: str | None, smoke: bool) -> None:
    """What recipe.train does to the module before Trainer.fit: channels_last weights and cuDNN's
    autotuner on a GPU, then ``module.model.compile()`` (the whole step is not compiled: the loss,
    bookkeeping and optimizer stay eager). The smoke run compiles with dynamo's eager backend, which
    traces the model without minutes of Inductor code generation on a CI CPU."""
    from flashnet.train.recipe import prepare_for_device

    module.to(device)
    if smoke and compile_mode is not None:
        module.model.compile(backend="eager")
        return
    prepare_for_device(module.model, "gpu" if device.type == "cuda" else "cpu", compile_mode)


def precision_for(config: BenchConfig, scale: Scale) -> str:
    """The configuration's precision; the smoke run trains bf16 configurations in 32-true, since
    bf16 autocast runs about 40× slower than float32 on CPUs without bf16 units (measured on the
    2-core AMD EPYC CI machine: 10 s against 0.25 s for one ResNet-18 step at 32 px, batch 8);
    fp16 autocast on a CPU is no better, and Lightning runs ``16-mixed`` there as bf16."""
    if scale.smoke and config.precision in ("bf16-mixed", "16-mixed"):
        return "32-true"
    return config.precision


def autocast_for(precision: str, device: torch.device):
    """The autocast Lightning's precision plugin wraps training_step in."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def synthetic_project_batch(scale: Scale, device: torch.device, seed: int = 0):
    """A uint8 NHWC batch on the device, as the CPU-decoding loader delivers it.
    Random, not zeros: these GPUs run measurably faster on zeros than on real data."""
    from flashnet.data.batch import Batch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(0, 256, (scale.batch_size, scale.image_size, scale.image_size, 3), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, scale.num_classes, (scale.batch_size,), generator=generator)
    return Batch(labels, torch.ones(scale.batch_size, dtype=torch.bool), images=images).to(device)


def run_callbacks(run: dict[str, Any], root: Path, steps_per_epoch: int, classes: int = 1000) -> list:
    """The callbacks recipe.train gives every training run that act on each step, built as it
    builds them: the clock (device-synchronised phase timing), the ranks' agreement at log steps (loss
    over all ranks, non-finite and divergence checks), the per-step records, the plain
    progress lines (to the log file a job writes), and the resume checkpoints with their periodic
    stop/non-finite agreement (an all-reduce every ``log_every_steps``). Left out: the MLPerf log,
    the tracker forwarder and the evaluation schedule, which act per epoch or not at all by default.
    Files go under ``root``."""
    from flashnet.config import RunConfig
    from flashnet.train.callbacks import PlainProgress, ResumeCheckpoints, RunRecords, StopRequest
    from flashnet.train.clock import TrainClock
    from flashnet.train.health import RunHealth

    config = RunConfig.from_dict(run, "bench")
    root.mkdir(parents=True, exist_ok=True)
    clock = TrainClock()
    records = RunRecords(root, clock, config.batch_size, steps_per_epoch, config.log_every_steps, config.target_top1)
    progress = PlainProgress(clock, max(steps_per_epoch, 1), steps_per_epoch, config.epochs, config.batch_size,
                             config.log_every_steps, stream=open(root / "progress.log", "a"))
    # The settings a run embeds in its checkpoints (no manifests here: the benchmark's shards are its own).
    settings = {"run": config.to_dict()}
    checkpoints = ResumeCheckpoints(root / "checkpoints" / "last.ckpt", config.checkpoint_every_minutes,
                                    config.log_every_steps, steps_per_epoch, StopRequest(), settings,
                                    scaler_watch=config.precision == "16-mixed", clock=clock)
    health = RunHealth(checkpoints.agreement_flags, config.log_every_steps, classes, config.divergence_loss_factor,
                       records)
    return [clock, health, records, progress, checkpoints]
