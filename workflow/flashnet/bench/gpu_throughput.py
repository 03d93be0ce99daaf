"""ResNet-50 training throughput on one GPU, measured end to end, from synthetic tensors to shards.

    flashnet bench gpu [--configs 1,2,3,4,5] [--batch-size 256] [--steps 50] [--warmup 10]
                       [--shards DIR/manifest.json [--make-shards N]] [--workers W] [--out results.json]
    flashnet bench gpu --smoke        (tiny, on CPU: exercises every code path, measures nothing)

Configurations (``--configs``, any subset, or ``all``; they always run in the order below):

    5   plain reference: torchvision resnet50, NCHW, torch.autocast bf16, torch.optim.SGD, a minimal
        hand-written loop on synthetic data (what torchvision's references/classification does)
    5c  the same with channels_last, to separate the memory format from everything else
    1   the project's step (ImageNetClassifier.training_step + LARS + warmup-poly schedule) on
        synthetic uint8 batches already on the GPU, precision 32-true (TF32 convolutions), eager
    2e  the same in bf16-mixed, eager
    2   the same in bf16-mixed with torch.compile (mode default: what ``compile: true`` does)
    2r  ... torch.compile(mode="reduce-overhead"): CUDA graphs
    2m  ... torch.compile(mode="max-autotune-no-cudagraphs"): long compile, Triton autotuning
    3d  data only: the real train_loader from WebDataset shards, CPU decoding in W workers, batches
        copied to the GPU; no model
    3   the full pipeline: that loader feeding the bf16 compiled step
    4d  data only: the loader handing undecoded JPEGs to nvJPEG (``decode_on_device``), GPU crop/flip
    4   the full pipeline with GPU decoding

Every project configuration is measured twice: through ``Trainer.fit`` (``loop: fit``, the path the
pipeline trains with) and in a hand-written loop calling the same module's ``training_step``,
backward, ``optimizer.step()`` and the scheduler (``loop: manual``); the difference is Lightning's
overhead. Configurations 3 and 4 use the compile mode that was fastest among 2/2r/2m in this run
(``--pipeline-compile-mode auto``), or ``default`` when none of those ran.

How the figures are taken:

* Warm-up steps run first and are not timed: they hold torch.compile, CUDA-graph capture, cuDNN's
  autotuning (``cudnn.benchmark``, as recipe.py sets it) and the data loader's start. The device is
  synchronised (``torch.cuda.synchronize``) before reading the host clock at both ends of the timed
  steps, so queued work is inside the figure.
* The optimizer's share is the GPU time between CUDA events recorded around each
  ``optimizer.step()`` of the manual loop, summed, over the loop's wall time.
* Data configurations time at least 10 batches per loader worker after at least 2 per worker of
  warm-up: the loader prefetches up to ``4 × W`` batches, and a short timed window would be served
  from that backlog and report the model's speed instead of the loader's.
* A bf16 8192³ matrix product (random normal operands, median of 20 CUDA-event-timed products
  after 3 warm-ups) is measured at the start and at the end of the run: the arithmetic ceiling, and
  a check that the clocks did not sag during the run.
* TFLOP/s counts 24.5 GFLOP per 224-px image: 3 × 2 × 4.089 GMAC, where 4.089 G multiply-adds is
  ResNet-50's forward pass (torchvision's ``ResNet50_Weights`` metadata, "GFLOPS", counted by fvcore,
  which counts one multiply-add as one operation), ×2 FLOP per multiply-add, ×3 for forward +
  backward (gradients with respect to inputs and to weights each cost about one forward). PyTorch's
  FlopCounterMode counts 24.3 GFLOP for the same step (convolutions and matmuls only; the image
  needs no gradient); BatchNorm, ReLU and the optimizer are memory-bound work not counted as FLOP.
* Every figure comes with the GPU, driver, CUDA, cuDNN, torch and host CPU it was taken on, and the
  date. ``--smoke`` runs ResNet-18 at 32 px, batch 8, 2 steps on the CPU: its numbers prove that the
  code runs and the arithmetic is wired, nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
import torchvision

from flashnet.bench import write_report
from flashnet.data.sources import IMAGENET_COUNTS
from flashnet.bench.measure import (FLOP_PER_MAC, TRAIN_PASSES, RegionTimer, Timing, achieved_tflops,
                                    count_host_syncs, describe_machine, forward_gmacs, images_per_second,
                                    measure_matmul, synchronize, time_steps, training_flops_per_image)

IMAGENET_TRAIN_IMAGES = IMAGENET_COUNTS["train"]  # steps per epoch for the schedule: as a real ImageNet run
IMAGENET_CLASSES = 1000
SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"

# Goals of issue 6 (docs/benchmarks/gpu.md explains them).
GOAL_PROJECT_OVER_REFERENCE = 1.3
GOAL_SHARDS_OVER_SYNTHETIC = 0.95
GOAL_MOONSHOT_IMAGES_PER_S = 7000


# --------------------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One measured configuration. ``kind``: reference (plain loop), project (the LightningModule,
    through Trainer.fit and a manual loop) or loader (data pipeline only, no model)."""

    id: str
    kind: str
    title: str
    precision: str = "bf16-mixed"
    compile_mode: str | None = None  # None: eager; "pipeline": whatever --pipeline-compile-mode picks
    channels_last: bool = True
    data: str = "synthetic"  # synthetic | shards-cpu | shards-gpu


CONFIGS = {c.id: c for c in (
    BenchConfig("5", "reference", "plain reference: torchvision NCHW, autocast bf16, SGD, eager",
                channels_last=False),
    BenchConfig("5c", "reference", "plain reference, channels_last"),
    BenchConfig("1", "project", "project step, synthetic, 32-true (TF32 convs), eager", precision="32-true"),
    BenchConfig("2e", "project", "project step, synthetic, bf16-mixed, eager"),
    BenchConfig("2", "project", "project step, synthetic, bf16-mixed, compile", compile_mode="default"),
    BenchConfig("2r", "project", "project step, synthetic, bf16-mixed, compile reduce-overhead",
                compile_mode="reduce-overhead"),
    BenchConfig("2m", "project", "project step, synthetic, bf16-mixed, compile max-autotune-no-cudagraphs",
                compile_mode="max-autotune-no-cudagraphs"),
    BenchConfig("3d", "loader", "data only: shards, CPU decode in workers, copy to GPU", data="shards-cpu"),
    BenchConfig("3", "project", "pipeline: shards, CPU decode, bf16-mixed, compile", compile_mode="pipeline",
                data="shards-cpu"),
    BenchConfig("4d", "loader", "data only: shards, nvJPEG decode + GPU crop/flip", data="shards-gpu"),
    BenchConfig("4", "project", "pipeline: shards, nvJPEG decode, bf16-mixed, compile", compile_mode="pipeline",
                data="shards-gpu"),
)}
RUN_ORDER = tuple(CONFIGS)  # reference first: a baseline survives even if a later config fails
SYNTHETIC_COMPILED = ("2", "2r", "2m")


def select_configs(text: str) -> list[BenchConfig]:
    """The configurations named in ``--configs`` (comma-separated ids, or ``all``), in RUN_ORDER."""
    wanted = set(RUN_ORDER) if text.strip() == "all" else {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(wanted - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(RUN_ORDER)}, all")
    return [CONFIGS[c] for c in RUN_ORDER if c in wanted]


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model and problem size: ResNet-50 at 224 px on a GPU, ResNet-18 at 32 px for --smoke."""

    model: str
    image_size: int
    batch_size: int
    steps: int
    warmup: int
    matmul_size: int
    num_classes: int
    smoke: bool

    @property
    def matmul_dtype(self) -> torch.dtype:
        """bf16, the training precision; float32 in the smoke run, which trains in 32-true."""
        return torch.float32 if self.smoke else torch.bfloat16


def data_steps(warmup: int, steps: int, workers: int) -> tuple[int, int]:
    """(warm-up, timed) steps for configurations fed by the loader. Its workers prefetch up to
    4 batches each (train_loader's ``prefetch_factor``), and roughly one batch per worker is in flight at any time
    once the loop runs at the loader's pace: 2 per worker of warm-up gets past the start-up wave,
    10 per worker of timed steps keeps the leftover backlog under ~10% of the window."""
    workers = max(workers, 1)
    return max(warmup, 2 * workers), max(steps, 10 * workers)


# --------------------------------------------------------------------------- sample shards


def make_sample_shards(manifest: Path, images: int, smoke: bool) -> Path:
    """ImageNet-sized stand-in shards at ``manifest``'s folder, made by the project's own sample
    generator and shard writer; reused when a manifest with at least ``images`` samples is there.

    Sides are drawn from 375..500 px and encoded at JPEG quality 95: about 190k pixels and 100 kB a
    file, close to ImageNet's train set (about 110 kB a file; mean near 470×390 px), so decoding costs
    what it would on the real data. A few thousand images are enough to measure the decode rate
    (the stream runs as many epochs over them as it needs)."""
    from ..data import shards, sources
    from ..data.manifest import build_manifest, load_manifest
    from ..data.sample import SampleSpec, write_sample_data

    if manifest.exists() and load_manifest(manifest)["samples"] >= images:
        return manifest
    folder = manifest.parent
    source = folder / "source"
    classes = 2 if smoke else 10
    spec = SampleSpec(classes=classes, train_per_class=math.ceil(images / classes), val_per_class=1,
                      min_side=40 if smoke else 375, max_side=64 if smoke else 500, quality=95, seed=0)
    write_sample_data(source, spec)
    index = folder / "index.json"
    shards.save_index(shards.shuffled(sources.index_split(source, "train"), 0), source,
                      samples_per_shard=16 if smoke else 256, seed=0, path=index)
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    part = folder / "parts" / "0.json"
    shards.write_part(index, 0, 1, part, max_side=None, quality=95)
    build_manifest(index, [part], manifest, max_rejected=0)
    return manifest


def manifest_shards(manifest: Path) -> tuple[str, ...]:
    from ..data.epochs import shard_paths
    from ..data.manifest import verify_manifest

    return shard_paths(manifest, verify_manifest(manifest))


# --------------------------------------------------------------------------- the project's module


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
    from ..config import RunConfig
    from ..train.module import ImageNetClassifier
    from ..train.schedule import schedule_for_run

    config = RunConfig.from_dict(run, "bench")
    schedule = schedule_for_run(config, max(IMAGENET_TRAIN_IMAGES // config.batch_size, 1))
    return ImageNetClassifier(config.to_dict(), num_classes, dataclasses.asdict(schedule))


def prepare_like_recipe(module, device: torch.device, compile_mode: str | None, smoke: bool) -> None:
    """What recipe.train does to the module before Trainer.fit: channels_last weights and cuDNN's
    autotuner on a GPU, then ``module.model.compile()`` (the whole step is not compiled: the loss,
    bookkeeping and optimizer stay eager). The smoke run compiles with dynamo's eager backend, which
    traces the model without minutes of Inductor code generation on a CI CPU."""
    from ..train.recipe import prepare_for_device

    module.to(device)
    if smoke and compile_mode is not None:
        module.model.compile(backend="eager")
        return
    prepare_for_device(module.model, "gpu" if device.type == "cuda" else "cpu", compile_mode)


def precision_for(config: BenchConfig, scale: Scale) -> str:
    """The configuration's precision; the smoke run trains bf16 configurations in 32-true, since
    bf16 autocast runs about 40× slower than float32 on CPUs without bf16 units (measured on the
    2-core AMD EPYC CI machine: 10 s against 0.25 s for one ResNet-18 step at 32 px, batch 8)."""
    if scale.smoke and config.precision == "bf16-mixed":
        return "32-true"
    return config.precision


def autocast_for(precision: str, device: torch.device):
    """The autocast Lightning's precision plugin wraps training_step in."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def synthetic_project_batch(scale: Scale, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 NHWC batch and labels on the device, as the CPU-decoding loader delivers them.
    Random, not zeros: these GPUs run measurably faster on zeros than on real data."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(0, 256, (scale.batch_size, scale.image_size, scale.image_size, 3), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, scale.num_classes, (scale.batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def to_device(batch, device: torch.device):
    """A loader batch on its way to the step. Decoded batches (uint8 NHWC, pinned) are copied
    asynchronously; undecoded ones stay in host memory, where nvJPEG reads them
    (``decode_on_device`` moves the labels itself)."""
    if isinstance(batch, dict):
        return batch
    images, labels = batch
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def manual_project_step(module, optimizer, scheduler, precision: str, device: torch.device,
                        optimizer_timer: RegionTimer):
    """One training step in a hand-written loop, in the order Lightning's automatic optimization
    runs it: training_step under autocast, zero_grad, backward, optimizer.step, then the per-step
    scheduler."""
    autocast = autocast_for(precision, device)

    def step(batch, index: int) -> None:
        with autocast:
            loss = module.training_step(batch, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with optimizer_timer.region():
            optimizer.step()
        scheduler.step()

    return step


def run_manual_loop(module, batches: Iterator, precision: str, warmup: int, steps: int, device: torch.device,
                    compile_mode: str | None) -> Timing:
    """The module's own step without Lightning: the same optimizer and schedule it configures."""
    module.train()
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    optimizer_timer = RegionTimer(device)
    project_step = manual_project_step(module, optimizer, scheduler, precision, device, optimizer_timer)
    data_wait = [0.0]

    def step(index: int) -> None:
        if compile_mode == "reduce-overhead":
            # CUDA-graph trees: each iteration is a new generation; outputs of the last one may go.
            torch.compiler.cudagraph_mark_step_begin()
        t0 = time.perf_counter()
        batch = to_device(next(batches), device)
        data_wait[0] += time.perf_counter() - t0
        project_step(batch, index)

    def start_window() -> None:
        optimizer_timer.reset()
        data_wait[0] = 0.0

    module.first_nonfinite_step.fill_(-1)
    seconds, timed = time_steps(step, warmup, steps, device, before_timing=start_window)
    optimizer_ms = optimizer_timer.total_ms()
    optimizer_timer.enabled = False
    syncs, sites = count_host_syncs(lambda: step(warmup + steps), device)
    return Timing(timed, seconds, optimizer_ms=optimizer_ms, data_wait_ms=data_wait[0] * 1e3,
                  host_syncs_per_step=syncs, sync_sites=sites,
                  loss_finite=int(module.first_nonfinite_step) < 0)


class RepeatedBatch:
    """The same device batch ``length`` times: a train loader for Trainer.fit with no data cost.
    (A plain list would be read by Lightning as a list of loaders.)"""

    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return itertools.repeat(self.batch, self.length)


def fit_window_callback(warmup: int, steps: int, device: torch.device, compile_mode: str | None):
    """A Lightning callback timing batches warmup+1 .. warmup+steps: the clock starts at the end of
    the last warm-up batch and stops at the end of the last timed one, each after a device
    synchronisation, so the window holds whole iterations: fetch, transfer, hooks, step, schedule."""
    import pytorch_lightning as pl

    class TimedWindow(pl.Callback):
        def __init__(self):
            self.start = self.stop = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            done = batch_idx + 1
            if done == warmup:
                synchronize(device)
                self.start = time.perf_counter()
            elif done == warmup + steps:
                synchronize(device)
                self.stop = time.perf_counter()

    return TimedWindow()


def run_fit_loop(module, loader: Iterable, precision: str, warmup: int, steps: int, device: torch.device,
                 compile_mode: str | None, root: Path) -> Timing:
    """The module through ``Trainer.fit``, configured as recipe.py configures it for one device,
    without its file-writing callbacks (records, checkpoints, progress lines)."""
    import pytorch_lightning as pl

    window = fit_window_callback(warmup, steps, device, compile_mode)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        max_epochs=1, max_steps=warmup + steps, callbacks=[window], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, default_root_dir=root,
    )
    module.first_nonfinite_step.fill_(-1)
    trainer.fit(module, train_dataloaders=loader)
    if window.start is None or window.stop is None:
        raise RuntimeError(f"Trainer.fit ran {trainer.global_step} of {warmup + steps} steps")
    finite = int(module.first_nonfinite_step) < 0
    module.to(device)  # Lightning's teardown moved it to the CPU
    return Timing(steps, window.stop - window.start, loss_finite=finite)


# --------------------------------------------------------------------------- runners


@dataclasses.dataclass
class Context:
    """What every configuration of one run shares."""

    scale: Scale
    device: torch.device
    workers: int
    shards: tuple[str, ...] | None
    pipeline_compile_mode: str
    flops_per_image: float
    matmul_tflops: float
    root: Path
    modules: dict[str | None, Any] = dataclasses.field(default_factory=dict)


def result_row(config: BenchConfig, loop: str, timing: Timing, ctx: Context, settings: dict[str, Any]) -> dict[str, Any]:
    """One table row: the timing and everything derived from it."""
    batch = ctx.scale.batch_size
    rate = images_per_second(timing.steps, batch, timing.seconds)
    window_ms = timing.seconds * 1e3
    model_row = config.kind != "loader"
    tflops = achieved_tflops(rate, ctx.flops_per_image) if model_row else None
    return {
        "config": config.id, "loop": loop, "title": config.title, "status": "ok",
        "images_per_s": rate,
        "ms_per_step": window_ms / timing.steps,
        "tflops": tflops,
        "fraction_of_matmul": tflops / ctx.matmul_tflops if tflops is not None and ctx.matmul_tflops else None,
        "optimizer_share": timing.optimizer_ms / window_ms if timing.optimizer_ms is not None else None,
        "data_wait_share": timing.data_wait_ms / window_ms if timing.data_wait_ms is not None else None,
        "host_syncs_per_step": timing.host_syncs_per_step,
        "sync_sites": timing.sync_sites,
        "loss_finite": timing.loss_finite,
        "peak_memory_gib": peak_memory_gib(ctx.device),
        "steps": timing.steps, "seconds": timing.seconds,
        "settings": settings,
    }


def failed_row(config: BenchConfig, loop: str, status: str, error: str) -> dict[str, Any]:
    return {"config": config.id, "loop": loop, "title": config.title, "status": status, "error": error}


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)


def run_reference(config: BenchConfig, ctx: Context) -> list[dict[str, Any]]:
    """torchvision's model in the shortest correct loop: what the project must beat."""
    scale, device = ctx.scale, ctx.device
    if device.type == "cuda":
        # torchvision's references/classification/train.py turns the autotuner on unless asked to
        # be deterministic; the reference gets the same.
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = torchvision.models.get_model(scale.model, weights=None, num_classes=scale.num_classes)
    model = model.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(scale.batch_size, 3, scale.image_size, scale.image_size, generator=generator)
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, scale.num_classes, (scale.batch_size,), generator=generator).to(device)
    optimizer_timer = RegionTimer(device)

    autocast = autocast_for(precision_for(config, scale), device)

    def step(_: int) -> None:
        with autocast:
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with optimizer_timer.region():
            optimizer.step()

    seconds, timed = time_steps(step, scale.warmup, scale.steps, device, before_timing=optimizer_timer.reset)
    timing = Timing(timed, seconds, optimizer_ms=optimizer_timer.total_ms())
    optimizer_timer.enabled = False
    timing.host_syncs_per_step, timing.sync_sites = count_host_syncs(lambda: step(0), device)
    timing.loss_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    settings = {"model": scale.model, "precision": precision_for(config, scale), "optimizer": "torch.optim.SGD",
                "channels_last": config.channels_last, "compile": None, "warmup": scale.warmup}
    return [result_row(config, "manual", timing, ctx, settings)]


def pipeline_compile_mode(requested: str, rows: list[dict[str, Any]]) -> str | None:
    """The compile mode configurations 3 and 4 use: the requested one, or with ``auto`` the mode of
    the fastest synthetic compiled configuration measured through Trainer.fit in this run
    (``default``, what ``compile: true`` does, if none ran)."""
    if requested != "auto":
        return None if requested == "none" else requested
    measured = [r for r in rows if r["config"] in SYNTHETIC_COMPILED and r["loop"] == "fit" and r["status"] == "ok"]
    if not measured:
        return "default"
    return CONFIGS[max(measured, key=lambda r: r["images_per_s"])["config"]].compile_mode


def project_module(config: BenchConfig, ctx: Context, compile_mode: str | None):
    """The configuration's module, built and prepared once per compile mode and reused: compiling
    ResNet-50 takes minutes of the device's budget, and the weights' values do not change its speed.
    (The smoke run's eager backend ignores the mode: one compiled module serves every mode.)"""
    key = "default" if ctx.scale.smoke and compile_mode is not None else compile_mode
    if key not in ctx.modules:
        run = bench_run(config, ctx.scale, ctx.device, ctx.workers)
        module = build_module(run, ctx.scale.num_classes)
        prepare_like_recipe(module, ctx.device, compile_mode, ctx.scale.smoke)
        ctx.modules[key] = module
    module = ctx.modules[key]
    module.to(ctx.device)
    return module


def train_stream(ctx: Context, batches: int, decode_on_device: bool):
    """The real train loader over the shards for ``batches`` batches, in as many real epochs as
    that takes (a few thousand images hold fewer batches than a configuration times)."""
    from ..data.epochs import TrainSamples
    from ..data.loader import TrainStreamSpec, train_loader_over_epochs

    run = schema_run_defaults()
    samples = TrainSamples.scan(ctx.shards)
    per_epoch = len(samples) // ctx.scale.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(samples)} shard samples hold no batch of {ctx.scale.batch_size}")
    specs = [TrainStreamSpec(
        samples=samples, seed=0, epoch=epoch, rank=0, world_size=1, steps=min(per_epoch, batches - epoch * per_epoch),
        batch_size=ctx.scale.batch_size, image_size=ctx.scale.image_size, crop_scale=tuple(run["crop_scale"]),
        decode_on_device=decode_on_device,
    ) for epoch in range(-(-batches // per_epoch))]
    return train_loader_over_epochs(specs, ctx.workers, pin_memory=ctx.device.type == "cuda")


def run_project(config: BenchConfig, ctx: Context, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's module on this configuration's data: hand-written loop, then Trainer.fit."""
    scale, device = ctx.scale, ctx.device
    compile_mode = config.compile_mode
    if compile_mode == "pipeline":
        compile_mode = pipeline_compile_mode(ctx.pipeline_compile_mode, rows)
    module = project_module(config, ctx, compile_mode)
    precision = precision_for(config, scale)
    warmup, steps = scale.warmup, scale.steps
    if config.data != "synthetic" and not scale.smoke:
        warmup, steps = data_steps(warmup, steps, ctx.workers)
    settings = {"model": scale.model, "precision": precision, "optimizer": module.run_config.optimizer,
                "channels_last": device.type == "cuda", "compile": compile_mode,
                "compile_backend": None if compile_mode is None else "eager (smoke)" if scale.smoke else "inductor",
                "data": config.data, "warmup": warmup, "workers": ctx.workers if config.data != "synthetic" else None}

    def batches(total: int):
        if config.data == "synthetic":
            return RepeatedBatch(synthetic_project_batch(scale, device), total)
        return train_stream(ctx, total, decode_on_device=config.data == "shards-gpu")

    out = []
    for loop in ("manual", "fit"):
        reset_peak_memory(device)
        try:
            if loop == "manual":
                # one extra batch: the host-sync count runs one untimed step after the window
                timing = run_manual_loop(module, iter(batches(warmup + steps + 1)), precision, warmup, steps, device,
                                         compile_mode)
            else:
                timing = run_fit_loop(module, batches(warmup + steps), precision, warmup, steps, device, compile_mode,
                                      ctx.root)
            out.append(result_row(config, loop, timing, ctx, settings))
        except Exception as error:  # noqa: BLE001 - one failed loop must not lose the rest of the run
            traceback.print_exc()
            out.append(failed_row(config, loop, "failed", f"{type(error).__name__}: {error}"))
    return out


def run_loader(config: BenchConfig, ctx: Context) -> list[dict[str, Any]]:
    """The data pipeline alone, consumed as fast as it delivers: the ceiling it puts on the step.
    CPU decoding: batches copied to the device; GPU decoding: nvJPEG + crop/flip on the device."""
    from ..data.loader import decode_on_device

    scale, device = ctx.scale, ctx.device
    warmup, steps = (scale.warmup, scale.steps) if scale.smoke else data_steps(scale.warmup, scale.steps, ctx.workers)
    on_device = config.data == "shards-gpu"
    batches = iter(train_stream(ctx, warmup + steps, decode_on_device=on_device))

    def step(_: int) -> None:
        batch = next(batches)
        if on_device:
            decode_on_device(batch, scale.image_size, device)
        else:
            to_device(batch, device)

    reset_peak_memory(device)
    seconds, timed = time_steps(step, warmup, steps, device)
    settings = {"data": config.data, "workers": ctx.workers, "warmup": warmup}
    return [result_row(config, "loader", Timing(timed, seconds), ctx, settings)]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(ctx: Context, keep: set[str | None]) -> None:
    """Drop the cached modules no remaining configuration uses, and return their device memory.
    (A reduce-overhead module's CUDA-graph pool stays reserved by torch until the process ends;
    the budget of an 80 GB card holds it beside the next configuration's activations.)"""
    ctx.modules = {mode: module for mode, module in ctx.modules.items() if mode in keep}
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def compile_modes_needed(remaining: list[BenchConfig], requested: str, rows: list[dict[str, Any]],
                         smoke: bool) -> set[str | None]:
    """Module cache keys (compile modes; "pipeline" resolved as it will be) of the project
    configurations still to run."""
    modes = set()
    for config in remaining:
        if config.kind == "project":
            mode = config.compile_mode
            mode = pipeline_compile_mode(requested, rows) if mode == "pipeline" else mode
            modes.add("default" if smoke and mode is not None else mode)
    return modes


def run_config(config: BenchConfig, ctx: Context, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if config.data != "synthetic" and not ctx.shards:
        loops = ["loader"] if config.kind == "loader" else ["manual", "fit"]
        return [failed_row(config, loop, "skipped", "needs --shards PATH/manifest.json (or --make-shards N)")
                for loop in loops]
    try:
        if config.kind == "reference":
            return run_reference(config, ctx)
        if config.kind == "loader":
            return run_loader(config, ctx)
        return run_project(config, ctx, rows)
    except Exception as error:  # noqa: BLE001 - record it and go on with the next configuration
        traceback.print_exc()
        return [failed_row(config, "loader" if config.kind == "loader" else "manual", "failed",
                           f"{type(error).__name__}: {error}")]


# --------------------------------------------------------------------------- the run


def goal_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6's goals against the measured rows (a goal whose rows are missing is left out):

    * the project's best synthetic step through Trainer.fit over the plain reference 5 (≥ 1.3×);
    * each shard pipeline over the synthetic step with the same compile mode in the same loop
      (≥ 95%): through Trainer.fit, or by hand where fit failed (the hand-written loop shows what
      the pipeline does once fit works);
    * the best end-to-end rate, either loop, against MLPerf's level (≥ 7,000 images/s)."""
    ok = {(r["config"], r["loop"]): r for r in rows if r["status"] == "ok"}
    goals = []

    def synthetic(loop: str) -> list[dict[str, Any]]:
        return [ok[(c, loop)] for c in SYNTHETIC_COMPILED + ("2e", "1") if (c, loop) in ok]

    reference, fitted = ok.get(("5", "manual")), synthetic("fit")
    if reference and fitted:
        best = max(fitted, key=lambda r: r["images_per_s"])
        goals.append(goal(f"project step ({best['config']}, fit) / plain reference (5)",
                          best["images_per_s"] / reference["images_per_s"], GOAL_PROJECT_OVER_REFERENCE))
    for pipeline in ("3", "4"):
        loop = next((loop for loop in ("fit", "manual") if (pipeline, loop) in ok), None)
        if loop is None:
            continue
        row = ok[(pipeline, loop)]
        same_mode = [r for r in synthetic(loop) if r["settings"].get("compile") == row["settings"].get("compile")]
        if same_mode:
            goals.append(goal(f"shards ({pipeline}, {loop}) / synthetic ({same_mode[0]['config']}, {loop})",
                              row["images_per_s"] / same_mode[0]["images_per_s"], GOAL_SHARDS_OVER_SYNTHETIC))
    end_to_end = [r for (config, _), r in ok.items() if config in ("3", "4")]
    if end_to_end:
        best = max(end_to_end, key=lambda r: r["images_per_s"])
        goals.append(goal(f"best end-to-end images/s ({best['config']}, {best['loop']})", best["images_per_s"],
                          GOAL_MOONSHOT_IMAGES_PER_S))
    return goals


def goal(name: str, value: float, target: float) -> dict[str, Any]:
    return {"goal": name, "value": value, "target": target, "met": value >= target}


def lightning_overhead(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per project configuration: 1 − (Trainer.fit images/s) / (manual loop images/s)."""
    ok = {(r["config"], r["loop"]): r for r in rows if r["status"] == "ok"}
    return {config: 1 - ok[(config, "fit")]["images_per_s"] / ok[(config, "manual")]["images_per_s"]
            for config in RUN_ORDER if (config, "fit") in ok and (config, "manual") in ok}


def run_benchmark(args: argparse.Namespace, scale: Scale, device: torch.device) -> dict[str, Any]:
    configs = select_configs(args.configs)
    flops = training_flops_per_image(scale.model, scale.image_size)
    report: dict[str, Any] = {
        "benchmark": "gpu_throughput",
        "smoke": scale.smoke,
        "machine": describe_machine(device),
        "scale": dataclasses.asdict(scale),
        "flop_per_image": flops,
        "flop_per_image_source": (f"{TRAIN_PASSES} passes x {FLOP_PER_MAC} FLOP/MAC x {forward_gmacs(scale.model)} GMAC "
                                  f"(torchvision {scale.model} weights meta '_ops') x ({scale.image_size}/224)^2"),
        "configs": [c.id for c in configs],
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="flashnet-bench-gpu-") as tmp:
        shards = resolve_shards(args, scale, configs, Path(tmp))
        report["shards"] = str(Path(shards[0]).parent) if shards else None
        report["matmul_dtype"] = str(scale.matmul_dtype).removeprefix("torch.")
        report["matmul_tflops_start"] = measure_matmul(scale.matmul_size, device, scale.matmul_dtype)
        ctx = Context(scale, device, args.workers, shards, args.pipeline_compile_mode, flops,
                      report["matmul_tflops_start"], Path(tmp))
        for position, config in enumerate(configs):
            print(f"[{time.strftime('%H:%M:%S')}] configuration {config.id}: {config.title}", file=sys.stderr, flush=True)
            report["results"].extend(run_config(config, ctx, report["results"]))
            write_report(report, args.out)
            release_memory(ctx, compile_modes_needed(configs[position + 1:], args.pipeline_compile_mode,
                                                     report["results"], scale.smoke))
        report["matmul_tflops_end"] = measure_matmul(scale.matmul_size, device, scale.matmul_dtype)
    report["matmul_tflops"] = report["matmul_tflops_start"]
    report["lightning_overhead"] = lightning_overhead(report["results"])
    report["goals"] = goal_summary(report["results"])
    write_report(report, args.out)
    return report


def resolve_shards(args: argparse.Namespace, scale: Scale, configs: list[BenchConfig], tmp: Path) -> tuple[str, ...] | None:
    """Shard paths for the data configurations: from --shards, made there first with --make-shards;
    a smoke run without --shards makes tiny ones in a temporary folder."""
    if not any(c.data != "synthetic" for c in configs):
        return None
    manifest = args.shards
    if manifest is None and scale.smoke:
        manifest = tmp / "shards" / "manifest.json"
        args.make_shards = args.make_shards or 32
    if manifest is None:
        return None
    if args.make_shards:
        print(f"[{time.strftime('%H:%M:%S')}] making {args.make_shards} sample images into shards at {manifest.parent}",
              file=sys.stderr, flush=True)
        make_sample_shards(manifest, args.make_shards, scale.smoke)
    return manifest_shards(manifest)


# --------------------------------------------------------------------------- the table


def _number(value: float | None, spec: str, scale: float = 1.0) -> str:
    """``value × scale`` formatted by ``spec`` (e.g. "8.1f"), or a dash of the same width."""
    if value is None:
        return "-".rjust(int(spec.split(".")[0].rstrip("df")))
    return format(value * scale if scale != 1.0 else value, spec)


def format_table(report: dict[str, Any]) -> str:
    machine, scale = report["machine"], report["scale"]
    lines = []
    if report["smoke"]:
        lines.append("SMOKE RUN (CPU, tiny model, bf16 configurations in 32-true): checks the code paths; "
                     "these numbers are NOT performance figures.")
    if machine["device"] == "cuda":
        lines.append(f"GPU: {machine['gpu']} ({machine['gpu_multiprocessors']} SMs, {machine['gpu_memory_gib']} GiB), "
                     f"driver {machine['driver']}, power limit {machine['gpu_power_limit_w']} W, CUDA {machine['cuda']}, "
                     f"cuDNN {machine['cudnn']}")
    lines.append(f"host: {machine['host_cpu']}, {machine['host_cores']} cores; torch {machine['torch']}, "
                 f"torchvision {machine['torchvision']}, pytorch-lightning {machine['pytorch_lightning']}; "
                 f"{machine['date']}")
    lines.append(f"{scale['model']} at {scale['image_size']} px, batch {scale['batch_size']}, {scale['steps']} timed steps "
                 f"after {scale['warmup']} warm-up (data configs: see 'warm-up' in the JSON)")
    lines.append(f"{report['matmul_dtype']} matmul {scale['matmul_size']}^3: {report['matmul_tflops_start']:.4g} TFLOP/s "
                 f"at the start, {report['matmul_tflops_end']:.4g} at the end")
    lines.append(f"FLOP per image: {report['flop_per_image'] / 1e9:.2f} G = {report['flop_per_image_source']}")
    lines.append("")
    header = (f"{'cfg':<4}{'loop':<8}{'images/s':>10}{'ms/step':>9}{'TFLOP/s':>9}{'%matmul':>8}{'optim%':>8}"
              f"{'wait%':>7}{'syncs':>6}{'GiB':>6}  what")
    lines.append(header)
    for row in report["results"]:
        if row["status"] != "ok":
            lines.append(f"{row['config']:<4}{row['loop']:<8}{row['status'].upper():>10}  {row['title']}: {row['error']}")
            continue
        lines.append(
            f"{row['config']:<4}{row['loop']:<8}{row['images_per_s']:>10.1f}{row['ms_per_step']:>9.2f}"
            f"{_number(row['tflops'], '9.2f')}{_number(row['fraction_of_matmul'], '8.1f', 100)}"
            f"{_number(row['optimizer_share'], '8.1f', 100)}{_number(row['data_wait_share'], '7.1f', 100)}"
            f"{_number(row['host_syncs_per_step'], '6d')}{_number(row['peak_memory_gib'], '6.1f')}  {row['title']}"
            + ("" if row["loss_finite"] in (None, True) else "  [loss went non-finite]")
        )
    if report["lightning_overhead"]:
        lines.append("")
        lines.append("Lightning overhead (1 - fit/manual): " + ", ".join(
            f"{config}: {share * 100:+.1f}%" for config, share in report["lightning_overhead"].items()))
    sites = sorted({site for row in report["results"] if row.get("sync_sites") for site in row["sync_sites"]})
    if sites:
        lines.append("host-device syncs per step come from: " + ", ".join(sites))
    if report["goals"]:
        lines.append("")
        if report["smoke"]:
            lines.append("(smoke run: the goals are evaluated to exercise the code; these lines say nothing about them)")
        for goal in report["goals"]:
            value = f"{goal['value']:.0f}" if goal["target"] > 100 else f"{goal['value']:.2f}"
            lines.append(f"goal: {goal['goal']} = {value} (target {goal['target']}): {'MET' if goal['met'] else 'not met'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashnet bench gpu", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="1,2,3,4,5", help="comma-separated ids (1,2e,2,2r,2m,3d,3,4d,4,5,5c) or all")
    parser.add_argument("--batch-size", type=int, default=256, help="per GPU")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them (compile, autotuning)")
    parser.add_argument("--shards", type=Path, default=None, help="PATH/manifest.json of train shards")
    parser.add_argument("--make-shards", type=int, default=0, metavar="N",
                        help="first write N ImageNet-sized sample images as shards at --shards (reused if there)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="loader worker processes (default: all cores but two)")
    parser.add_argument("--pipeline-compile-mode", default="auto",
                        choices=["auto", "none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="compile mode of configurations 3 and 4 (auto: the fastest of 2/2r/2m measured)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None, help="write the full results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="ResNet-18, 32 px, batch 8, 2 steps, on the CPU: exercises every code path (CI)")
    args = parser.parse_args(argv)
    try:
        select_configs(args.configs)
    except ValueError as error:
        parser.error(str(error))
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the timed window starts after a warm-up step)")
    if args.make_shards and args.shards is None:
        parser.error("--make-shards needs --shards PATH/manifest.json (where to write them)")
    return args


def scale_for(args: argparse.Namespace) -> Scale:
    if args.smoke:
        return Scale(model="resnet18", image_size=32, batch_size=8, steps=2, warmup=1, matmul_size=256,
                     num_classes=10, smoke=True)
    return Scale(model="resnet50", image_size=224, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                 matmul_size=args.matmul_size, num_classes=IMAGENET_CLASSES, smoke=False)


@contextlib.contextmanager
def quiet_lightning():
    """Keep Lightning's banners and tips out of the table's log, and restore its loggers and the
    warning filters afterwards (``main`` also runs inside pytest). Lightning is imported first:
    its ``__init__`` sets its loggers to INFO."""
    import pytorch_lightning  # noqa: F401

    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pytorch_lightning.*")
        warnings.filterwarnings("ignore", module="lightning_fabric.*")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@contextlib.contextmanager
def torch_threads(count: int | None):
    """``torch.set_num_threads(count)`` for the block (no change for None)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = None
    if args.smoke:
        device = torch.device("cpu")
        args.workers = 1
        threads = 1  # on a shared 2-core CI machine, OpenMP's spinning threads slowed a step tenfold
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("flashnet bench gpu: no CUDA device here. This benchmark measures GPU training throughput; run it on a "
              "GPU machine (docs/benchmarks/gpu.md), or pass --smoke to exercise its code on the CPU.", file=sys.stderr)
        return 2
    with quiet_lightning(), torch_threads(threads):
        report = run_benchmark(args, scale_for(args), device)
    print(format_table(report))
    # A skipped configuration (no shards given) is the caller's choice; a failed one is an error.
    return 1 if any(row["status"] == "failed" for row in report["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
