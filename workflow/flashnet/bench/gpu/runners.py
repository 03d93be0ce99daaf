"""One configuration measured: the plain reference, the project's module, or the loader alone; one
result row per loop."""

from __future__ import annotations

import dataclasses
import gc
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torchvision

from flashnet.bench.gpu.configs import CONFIGS, SYNTHETIC_COMPILED, BenchConfig, Scale, data_steps
from flashnet.bench.gpu.loops import RepeatedBatch, run_fit_loop, run_manual_loop
from flashnet.bench.gpu.project import (autocast_for, bench_run, build_module, precision_for, prepare_like_recipe,
                                        run_callbacks, schema_run_defaults, synthetic_project_batch)
from flashnet.bench.measure import (RegionTimer, Timing, achieved_tflops, count_host_syncs, images_per_second,
                                    time_steps)


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
    cold_read: str = "off"  # auto | fadvise | off: how data configurations evict the shards first
    last_page_cache: str | None = None  # what the last eviction did (into the rows' settings)
    modules: dict[str | None, Any] = dataclasses.field(default_factory=dict)


def result_row(config: BenchConfig, loop: str, timing: Timing, ctx: Context, settings: dict[str, Any]) -> dict[str, Any]:
    """One table row: the timing and everything derived from it."""
    batch = ctx.scale.batch_size
    rate = images_per_second(timing.steps, batch, timing.seconds)
    window_ms = timing.seconds * 1e3
    model_row = config.kind != "loader"
    tflops = achieved_tflops(rate, ctx.flops_per_image) if model_row else None
    return {
        "config": config.id, "loop": loop, "batch_size": batch, "title": config.title, "status": "ok",
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


def failed_row(config: BenchConfig, loop: str, status: str, error: str, batch_size: int | None = None) -> dict[str, Any]:
    return {"config": config.id, "loop": loop, "batch_size": batch_size, "title": config.title, "status": status,
            "error": error}


def loops_of(config: BenchConfig) -> list[str]:
    """The loops a configuration is measured in (one row each)."""
    return {"reference": ["manual"], "loader": ["loader"], "project": ["manual", "fit"]}[config.kind]


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
    that takes (a few thousand images hold fewer batches than a configuration times). The shards
    are evicted from the page cache first where ``ctx.cold_read`` asks (inputs.drop_page_cache)."""
    from flashnet.data.epochs import TrainSamples
    from flashnet.config import RunConfig
    from flashnet.data.loader import TrainStreamSpec, train_loader_over_epochs
    from flashnet.data.transforms import Augmentation

    run = schema_run_defaults()
    samples = TrainSamples.scan(ctx.shards)
    ctx.last_page_cache = cold_read(ctx)  # after the scan, which reads the shards' headers
    per_epoch = len(samples) // ctx.scale.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(samples)} shard samples hold no batch of {ctx.scale.batch_size}")
    specs = [TrainStreamSpec(
        samples=samples, seed=0, epoch=epoch, rank=0, world_size=1, steps=min(per_epoch, batches - epoch * per_epoch),
        batch_size=ctx.scale.batch_size, image_size=ctx.scale.image_size,
        augmentation=Augmentation.from_run(RunConfig.from_dict(run, "bench")),
        decode_on_device=decode_on_device,
    ) for epoch in range(-(-batches // per_epoch))]
    return train_loader_over_epochs(specs, ctx.workers, pin_memory=ctx.device.type == "cuda")


def cold_read(ctx: Context) -> str:
    """Evict the shards before a data configuration reads them (``--cold-read``); what was done."""
    from flashnet.bench.gpu.inputs import drop_page_cache

    if ctx.cold_read == "off":
        return "warm (--cold-read off)"
    if ctx.cold_read == "fadvise":
        return drop_page_cache(ctx.shards, use_drop_caches=False)
    return drop_page_cache(ctx.shards)


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
                "data": config.data, "warmup": warmup, "workers": ctx.workers if config.data != "synthetic" else None,
                "strategy": "ddp (1 process, " + ("nccl" if device.type == "cuda" else "gloo") + ")",
                "callbacks": "run's per-step callbacks (clock, records, progress, resume checkpoints)"}

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
                fit_root = ctx.root / f"fit-{config.id}-{scale.batch_size}"
                callbacks = run_callbacks(module.run_config.to_dict(), fit_root, steps_per_epoch=warmup + steps,
                                          classes=ctx.scale.num_classes)
                timing = run_fit_loop(module, batches(warmup + steps), precision, warmup, steps, device, compile_mode,
                                      fit_root, callbacks)
            page_cache = {"page_cache": ctx.last_page_cache} if config.data != "synthetic" else {}
            out.append(result_row(config, loop, timing, ctx, {**settings, **page_cache}))
        except Exception as error:  # noqa: BLE001 - one failed loop must not lose the rest of the run
            traceback.print_exc()
            out.append(failed_row(config, loop, "failed", f"{type(error).__name__}: {error}", scale.batch_size))
    return out


def run_loader(config: BenchConfig, ctx: Context) -> list[dict[str, Any]]:
    """The data pipeline alone, consumed as fast as it delivers: the ceiling it puts on the step.
    CPU decoding: batches copied to the device; GPU decoding: nvJPEG + crop/flip on the device."""
    scale, device = ctx.scale, ctx.device
    warmup, steps = (scale.warmup, scale.steps) if scale.smoke else data_steps(scale.warmup, scale.steps, ctx.workers)
    batches = iter(train_stream(ctx, warmup + steps, decode_on_device=config.data == "shards-gpu"))

    def step(_: int) -> None:
        next(batches).to(device).device_images(scale.image_size, device)

    reset_peak_memory(device)
    seconds, timed = time_steps(step, warmup, steps, device)
    settings = {"data": config.data, "workers": ctx.workers, "warmup": warmup, "page_cache": ctx.last_page_cache}
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
        return [failed_row(config, loop, "skipped", "needs --shards PATH/manifest.json (or --make-shards N)",
                           ctx.scale.batch_size) for loop in loops_of(config)]
    try:
        if config.kind == "reference":
            return run_reference(config, ctx)
        if config.kind == "loader":
            return run_loader(config, ctx)
        return run_project(config, ctx, rows)
    except Exception as error:  # noqa: BLE001 - record it and go on with the next configuration
        traceback.print_exc()
        return [failed_row(config, "loader" if config.kind == "loader" else "manual", "failed",
                           f"{type(error).__name__}: {error}", ctx.scale.batch_size)]
