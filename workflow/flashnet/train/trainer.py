"""The one place a Lightning Trainer is built, for training and for evaluation alike: which device
(and whether this node can do what the run asks of it), how many processes, the DDP strategy with
its timeout and process-group backend, the gradient all-reduce's precision, and the cluster
environment the job layer hands in."""

from __future__ import annotations

import datetime
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from ..config import ConfigError, RunConfig, device_problem
from ..machine import cpu_model


def resolve_accelerator(run: RunConfig) -> str:
    """cpu or gpu, checking that this node can do what the run asks of it (``config.device_problem``)."""
    accelerator = run.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("accelerator: gpu, but this node has no CUDA device")
    gpu = accelerator == "gpu"
    problem = device_problem(run.precision, run.decode_device, run.bn_group_size, accelerator,
                             bf16_native=not gpu or native_bf16(),
                             gpu_name=torch.cuda.get_device_name() if gpu else "this GPU")
    if problem:
        raise ConfigError(problem)
    return accelerator


def native_bf16() -> bool:
    """bf16 in hardware (Ampere and later). ``is_bf16_supported()`` alone also says yes where bf16
    is only emulated (a V100), at a fraction of the speed the recipe counts on."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def device_name(accelerator: str) -> str:
    return torch.cuda.get_device_name() if accelerator == "gpu" else cpu_model()


def gradient_compression_hook(precision: str, accelerator: str):
    """Mixed-precision runs all-reduce their gradients in 16 bits on GPUs, halving the traffic, as
    the records did; gloo on CPU keeps fp32."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if accelerator != "gpu":
        return None
    return {"bf16-mixed": default_hooks.bf16_compress_hook, "16-mixed": default_hooks.fp16_compress_hook}.get(precision)


def allreduce_dtype(run: RunConfig, accelerator: str) -> str:
    """The gradients' dtype on the wire (the summary says it)."""
    if gradient_compression_hook(run.precision, accelerator) is None:
        return "float32"
    return "bfloat16" if run.precision == "bf16-mixed" else "float16"


def build_trainer(accelerator: str, precision: str, nodes: int, devices_per_node: int, cluster_environment,
                  ddp_timeout_s: int, cpus_per_task: int, compress_gradients: bool = False,
                  **options: Any) -> pl.Trainer:
    """A Trainer for ``nodes`` × ``devices_per_node`` processes (one per device) of this job.

    Several processes: DDP over NCCL (GPUs) or gloo (CPUs), ranks from ``cluster_environment``, and a
    collective that waits more than ``ddp_timeout_s`` fails the job instead of hanging it. One
    process: the environment still comes in as a plugin, so Lightning does not guess from SLURM's
    variables. On CPUs the process uses its ``cpus_per_task`` for its intra-op threads.
    ``compress_gradients``: the 16-bit all-reduce of :func:`gradient_compression_hook` (training).
    ``options`` go to ``pl.Trainer`` as they are."""
    if accelerator == "cpu":
        torch.set_num_threads(cpus_per_task)
    strategy: str | DDPStrategy = "auto"
    if nodes * devices_per_node > 1:
        strategy = DDPStrategy(
            cluster_environment=cluster_environment,
            process_group_backend="nccl" if accelerator == "gpu" else "gloo",
            timeout=datetime.timedelta(seconds=ddp_timeout_s),
            ddp_comm_hook=gradient_compression_hook(precision, accelerator) if compress_gradients else None,
        )
    single = nodes * devices_per_node == 1 and cluster_environment is not None
    return pl.Trainer(accelerator=accelerator, devices=devices_per_node, num_nodes=nodes, strategy=strategy,
                      plugins=[cluster_environment] if single else None, precision=precision,
                      enable_model_summary=False, **options)
