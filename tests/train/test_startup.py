"""flashnet.train.startup: the start-up checks run by rank 0 alone and broadcast to every rank."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from flashnet.data.sources import DataError
from flashnet.train.startup import StartupChecks, check_inputs, on_rank_zero_once


def _checks_on_two_ranks(rank: int, port: int, folder: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        def work():
            (Path(folder) / f"ran-on-{rank}").touch()  # which ranks did the work
            return {"resume": "last.ckpt"}

        def failing():
            raise DataError("shards/val/manifest.json: lists val-000001.tar, which is missing")

        answer = on_rank_zero_once(work)
        try:
            on_rank_zero_once(failing)
            error = None
        except DataError as raised:
            error = str(raised)
        results[rank] = (answer, error)
    finally:
        dist.destroy_process_group()


def test_rank_zero_does_the_work_and_every_rank_gets_its_answer_or_its_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_checks_on_two_ranks, args=(port, str(tmp_path), results), nprocs=2, start_method="fork")
        results = dict(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ran-on-0"]
    for rank in (0, 1):
        answer, error = results[rank]
        assert answer == {"resume": "last.ckpt"}
        assert error == "shards/val/manifest.json: lists val-000001.tar, which is missing"


def test_without_a_process_group_the_work_runs_here():
    assert on_rank_zero_once(lambda: 7) == 7


def test_check_inputs_verifies_the_shards_and_skips_a_damaged_checkpoint(tiny_dataset, tmp_path):
    manifests = (str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert check_inputs(checkpoint, manifests) == StartupChecks(None, ())
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"PK\x03\x04 cut short")
    checks = check_inputs(checkpoint, manifests)
    assert checks.resume is None and len(checks.skipped) == 1 and "damaged resume checkpoint" in checks.skipped[0]
