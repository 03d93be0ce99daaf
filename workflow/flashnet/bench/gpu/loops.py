"""The timed loops that drive the project's module: a hand-written one and Trainer.fit."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from flashnet.bench.gpu.project import autocast_for
from flashnet.bench.measure import RegionTimer, Timing, count_host_syncs, synchronize, time_steps


def manual_project_step(module, optimizer, scheduler, precision: str, device: torch.device,
                        optimizer_timer: RegionTimer):
    """One training step in a hand-written loop, in the order Lightning's automatic optimization
    runs it: training_step under autocast, zero_grad, backward, optimizer.step, then the per-step
    scheduler, if any (LARS steps its schedule itself, on the device: ``scheduler`` None). fp16
    (``16-mixed``) scales the loss with a GradScaler, as Lightning's precision plugin does."""
    autocast = autocast_for(precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def step(batch, index: int) -> None:
        with autocast:
            loss = module.training_step(batch, index)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            with optimizer_timer.region():
                optimizer.step()
        else:
            scaler.scale(loss).backward()
            with optimizer_timer.region():
                scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()

    return step


def run_manual_loop(module, batches: Iterator, precision: str, warmup: int, steps: int, device: torch.device,
                    compile_mode: str | None) -> Timing:
    """The module's own step without Lightning: the same optimizer and schedule it configures."""
    module.train()
    configured = module.configure_optimizers()  # LARS alone, or SGD with its LambdaLR
    if isinstance(configured, dict):
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    else:
        optimizer, scheduler = configured, None
    optimizer_timer = RegionTimer(device)
    project_step = manual_project_step(module, optimizer, scheduler, precision, device, optimizer_timer)
    data_wait = [0.0]

    def step(index: int) -> None:
        if compile_mode == "reduce-overhead":
            # CUDA-graph trees: each iteration is a new generation; outputs of the last one may go.
            torch.compiler.cudagraph_mark_step_begin()
        t0 = time.perf_counter()
        batch = next(batches).to(device)  # JPEGs stay on the host, for nvJPEG
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


def ddp_strategy(device: torch.device, compiled: bool):
    """DDP as a run of several processes gets it from train/trainer.py's build_trainer: NCCL on GPUs
    (gloo on the CPU), the run's DDP options (no buffer broadcast, gradients as bucket views, static
    graph unless compiled; fp32 gradient all-reduce). Here with one process (world size 1): the DDP
    wrapper and its bucketed all-reduce still run every step, which is what each of a record run's
    processes pays besides the network."""
    from pytorch_lightning.strategies import DDPStrategy

    from flashnet.train.trainer import ddp_options

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    return DDPStrategy(process_group_backend="nccl" if accelerator == "gpu" else "gloo",
                       **ddp_options(static_graph=not compiled))


def run_fit_loop(module, loader: Iterable, precision: str, warmup: int, steps: int, device: torch.device,
                 compile_mode: str | None, root: Path, callbacks: list | None = None) -> Timing:
    """The module through ``Trainer.fit`` as recipe.py trains it: DDP (one process, this device), the
    run's per-step ``callbacks`` (project.run_callbacks), the run's precision."""
    import pytorch_lightning as pl

    window = fit_window_callback(warmup, steps, device, compile_mode)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, strategy=ddp_strategy(device, compiled=compile_mode is not None),
        precision=precision, max_epochs=1, max_steps=warmup + steps, callbacks=[*(callbacks or []), window],
        logger=False, enable_checkpointing=callbacks is not None, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        default_root_dir=root,
    )
    module.first_nonfinite_step.fill_(-1)
    trainer.fit(module, train_dataloaders=loader)
    if window.start is None or window.stop is None:
        raise RuntimeError(f"Trainer.fit ran {trainer.global_step} of {warmup + steps} steps")
    finite = int(module.first_nonfinite_step) < 0
    module.to(device)  # Lightning's teardown moved it to the CPU
    return Timing(steps, window.stop - window.start, loss_finite=finite)
