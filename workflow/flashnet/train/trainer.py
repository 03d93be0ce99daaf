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


def allreduce_dtype(run: RunConfig, accelerator: str) -> str:
    """The gradients' dtype on the wire (the summary says it): always float32. Mixed precision keeps
    fp32 parameters, so their gradients and DDP's buckets are fp32, and no comm hook narrows them.

    Why not bf16 (what the records sent, halving the traffic): a ring all-reduce rounds the running
    partial sum to bf16 at each of its N − 1 hops, and at N = 2,048 ranks that biases small gradient
    components by tens of percent (``flashnet.bench.allreduce_precision``, docs/benchmarks/allreduce.md).
    bf16 on the wire with fp32 accumulation is exact enough, but neither NCCL nor
    ``torch.distributed.algorithms.ddp_comm_hooks`` (torch 2.11-2.14) has such a reduce-scatter; an
    all-to-all hook would send 2,047 small messages per rank and bucket at that scale."""
    return "float32"


def ddp_options(static_graph: bool) -> dict[str, Any]:
    """DistributedDataParallel's settings for every flashnet job.

    - ``broadcast_buffers=False``: no broadcast of rank 0's buffers before each forward (a
      collective per step, and it overwrote every rank's loss/non-finite bookkeeping with rank 0's).
      BatchNorm running statistics then drift apart between ranks; they are all-reduced before each
      evaluation and before model.pt is written (``train/module.py``), as NVIDIA's ``fit.py`` does.
    - ``gradient_as_bucket_view=True``: gradients are views into the all-reduce buckets, so DDP
      does not copy every gradient into a bucket and back each step (and keeps one copy in memory).
    - ``static_graph``: the same parameters get gradients in the same order every step (ResNet,
      SyncBatchNorm included: its collectives run inside the graph, not between DDP's buckets), so
      DDP can skip re-checking the graph each iteration. Off for a ``torch.compile``d network:
      dynamo's DDPOptimizer splits the graph at bucket boundaries and is not known to agree with
      static_graph (pytorch#109261, open) — the compiled run keeps DDP's default."""
    return {"broadcast_buffers": False, "gradient_as_bucket_view": True, "static_graph": static_graph}


def build_trainer(accelerator: str, precision: str, nodes: int, devices_per_node: int, cluster_environment,
                  ddp_timeout_s: int, cpus_per_task: int, static_graph: bool = True,
                  **options: Any) -> pl.Trainer:
    """A Trainer for ``nodes`` × ``devices_per_node`` processes (one per device) of this job.

    Several processes: DDP over NCCL (GPUs) or gloo (CPUs), ranks from ``cluster_environment``, and a
    collective that waits more than ``ddp_timeout_s`` fails the job instead of hanging it. One
    process: the environment still comes in as a plugin, so Lightning does not guess from SLURM's
    variables. On CPUs the process uses its ``cpus_per_task`` for its intra-op threads.
    ``static_graph``: see :func:`ddp_options` (False for a compiled network).
    ``options`` go to ``pl.Trainer`` as they are."""
    if accelerator == "cpu":
        torch.set_num_threads(cpus_per_task)
    strategy: str | DDPStrategy = "auto"
    if nodes * devices_per_node > 1:
        strategy = DDPStrategy(
            cluster_environment=cluster_environment,
            process_group_backend="nccl" if accelerator == "gpu" else "gloo",
            timeout=datetime.timedelta(seconds=ddp_timeout_s),
            **ddp_options(static_graph),
        )
    single = nodes * devices_per_node == 1 and cluster_environment is not None
    return pl.Trainer(accelerator=accelerator, devices=devices_per_node, num_nodes=nodes, strategy=strategy,
                      plugins=[cluster_environment] if single else None, precision=precision,
                      enable_model_summary=False, **options)
