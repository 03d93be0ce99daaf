"""Start-up checks done once, by rank 0, and broadcast to the other ranks.

Every rank used to check the shards itself (``verify_manifest``: three ``stat`` calls per shard,
1,282 + 50 shards for ImageNet at 256 MB) and to CRC-read the whole resume checkpoint
(``checkpoints.choose_resume``: ResNet-50 with momentum is ~200 MB). At the record's 2,048 ranks that
is some 8 million metadata operations on the cluster's file system and 400 GB read, to learn what
one rank can learn for all: rank 0 does both and broadcasts one small object (the resume path, what
was skipped, or the error), and every rank reads only the manifests' JSON (needed for its sample
table anyway). ``flashnet bench epoch`` counts the operations per rank.

The checks need the process group before the Trainer exists (the resume choice decides the
MLPerf log's first lines and ``trainer.fit``'s ``ckpt_path``), so :func:`join_process_group`
starts it the way Lightning's DDP strategy would (``DDPStrategy.setup_distributed``: ranks from the
cluster environment, the backend, the timeout, the device id under NCCL); the strategy then finds
it initialised and uses it (``lightning_fabric.utilities.distributed._init_dist_connection`` returns
early on an initialised group).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..data.manifest import load_manifest, verify_manifest
from ..data.sources import DataError
from . import checkpoints


def join_process_group(cluster_environment, nodes: int, devices_per_node: int, accelerator: str,
                       timeout_s: int) -> None:
    """Start this job's process group (several processes only), as Lightning's DDP strategy would."""
    world_size = nodes * devices_per_node
    if cluster_environment is None or world_size == 1 or dist.is_initialized():
        return
    local_rank = cluster_environment.local_rank()
    cluster_environment.set_global_rank(cluster_environment.node_rank() * devices_per_node + local_rank)
    cluster_environment.set_world_size(world_size)
    os.environ["MASTER_ADDR"] = cluster_environment.main_address
    os.environ["MASTER_PORT"] = str(cluster_environment.main_port)
    options: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if accelerator == "gpu":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # broadcast_object_list stages objects on the current device
        options["device_id"] = device  # binds NCCL's communicator now: split_group needs it (train/module.py)
    dist.init_process_group("nccl" if accelerator == "gpu" else "gloo", rank=cluster_environment.global_rank(),
                            world_size=world_size, **options)


def on_rank_zero_once(work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0 only, its result (or its error, raised again on every rank) broadcast to
    all ranks; without a process group, ``work()`` here."""
    if not (dist.is_available() and dist.is_initialized()):
        return work()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", work())
        except (DataError, OSError) as error:
            box[0] = ("error", error)
    dist.broadcast_object_list(box, src=0)
    outcome, value = box[0]
    if outcome == "error":
        raise value
    return value


@dataclasses.dataclass(frozen=True)
class StartupChecks:
    """What rank 0 found: the resume checkpoint to load (or None) and what it skipped on the way."""

    resume: Path | None
    skipped: tuple[str, ...]


def check_inputs(checkpoint: Path, manifests: tuple[str, ...]) -> StartupChecks:
    """Rank 0's checks: every manifest's shards present and whole (sizes), and the newest intact
    resume checkpoint (CRC-read)."""
    for manifest in manifests:
        verify_manifest(manifest)
    skipped: list[str] = []
    resume = checkpoints.choose_resume(checkpoint, say=skipped.append)
    return StartupChecks(resume, tuple(skipped))


def checked_once(checkpoint: Path, train_manifest: str, val_manifest: str) -> tuple[StartupChecks, dict, dict]:
    """The start-up checks, done by rank 0 and broadcast, and the two manifests (read by every rank:
    one file each, which its sample table needs anyway)."""
    checks = on_rank_zero_once(lambda: check_inputs(checkpoint, (train_manifest, val_manifest)))
    return checks, load_manifest(train_manifest), load_manifest(val_manifest)
