"""flashnet.train.module: BatchNorm groups for ``bn_span``."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from flashnet.train.module import bn_group_ranks, synchronise_batchnorm


def test_bn_groups_are_consecutive_ranks():
    assert bn_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert bn_group_ranks(4, 4) == [[0, 1, 2, 3]]
    assert bn_group_ranks(3, 1) == [[0], [1], [2]]


def _convert(rank: int, world: int, group: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = synchronise_batchnorm(torchvision.models.resnet18(num_classes=4), group)
        sync = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        plain = [m for m in model.modules() if type(m) is torch.nn.BatchNorm2d]
        results[rank] = (len(sync), len(plain), sorted({tuple(dist.get_process_group_ranks(m.process_group))
                                                        for m in sync}))
    finally:
        dist.destroy_process_group()


def test_every_batchnorm_is_synchronised_over_its_group_of_ranks():
    world, group = 4, 2
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the children need no fresh imports of torch and torchvision
        mp.start_processes(_convert, args=(world, group, port, results), nprocs=world, start_method="fork")
        results = dict(results)
    for rank, (sync, plain, groups) in results.items():
        assert sync == 20 and plain == 0  # resnet18 has 20 BatchNorm layers
        assert groups == [tuple(bn_group_ranks(world, group)[rank // group])]
