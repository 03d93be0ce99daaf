"""The warm-up before MLPerf's run_start: what it runs, that it compiles everything before
run_start, and that it leaves training bit for bit as without it."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

from flashnet.train.callbacks import StopRequest
from flashnet.train.recipe import TrainSpec, train
from flashnet.train.warmup import SavedState, synthetic_batch, val_batch_sizes


def make_spec(tiny_dataset, out: Path, **overrides) -> TrainSpec:
    run = tiny_dataset.run(**overrides)
    return TrainSpec("tiny", run, str(tiny_dataset.train_manifest), str(tiny_dataset.val_manifest), str(out),
                     tiny_dataset.launcher())


def test_val_batch_sizes_cover_full_short_and_padding_batches():
    # Validation balanced by sample (data/loader.py val_batches): 50 samples over 2 ranks, batch 4:
    # 25 each, 6 full batches and a short one of 1
    assert val_batch_sizes(50, 2, 4) == (4, 1)
    # one rank, a whole number of batches: full batches only
    assert val_batch_sizes(16, 1, 4) == (4,)
    # 9 samples over 4 ranks, batch 2: shares 2, 2, 2, 3; ranks 0-2 run a padding batch of 1
    assert val_batch_sizes(9, 4, 2) == (2, 1)


def test_synthetic_batches_have_the_real_batches_shapes():
    decoded = synthetic_batch(3, 16, encoded=False)
    assert decoded.images.shape == (3, 16, 16, 3) and decoded.images.dtype == torch.uint8
    assert decoded.valid.all() and len(synthetic_batch(2, 16, encoded=True).jpegs) == 2


def test_saved_state_puts_back_weights_buffers_and_generators():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    saved = SavedState.capture(model)
    draws = (random.random(), np.random.rand(), torch.rand(1))
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # moves BN statistics, makes gradients
    with torch.no_grad():
        model[0].weight.add_(1)
    saved.restore(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws


class CompileCounts(pl.Callback):
    """Dynamo's unique graphs so far, when the first training step starts (after MLPerf's run_start)."""

    def __init__(self):
        self.at_first_step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.at_first_step is None:
            self.at_first_step = counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("warmup", [True, False])
def test_a_compiled_run_compiles_nothing_after_run_start_when_warmed_up(tiny_dataset, tmp_path, warmup):
    """Warmed up, every graph (train, eval at the full and the short val batch sizes) is compiled
    before run_start; without the warm-up some are compiled inside the timed region, which shows
    the count can tell them apart."""
    torch._dynamo.reset()
    counters.clear()
    seen = CompileCounts()
    summary = train(make_spec(tiny_dataset, tmp_path, compile=True, epochs=1, warmup_epochs=0.5,
                              warmup_before_run_start=warmup), None, StopRequest(), extra_callbacks=[seen])
    assert summary["mlperf"]["status"] in ("success", "aborted")  # run_stop was logged: validation ran
    compiled_after_run_start = counters["stats"]["unique_graphs"] - seen.at_first_step
    if warmup:
        assert seen.at_first_step > 0 and compiled_after_run_start == 0
    else:
        assert seen.at_first_step == 0 and compiled_after_run_start > 0
    torch._dynamo.reset()


def test_warmup_leaves_training_bit_identical(tiny_dataset, tmp_path):
    results = {}
    for warmup in (True, False):
        out = tmp_path / str(warmup)
        summary = train(make_spec(tiny_dataset, out, epochs=1.5, warmup_epochs=0.5, log_every_steps=1,
                                  warmup_before_run_start=warmup), None, StopRequest())
        weights = torch.load(out / "model.pt", weights_only=True)["state_dict"]
        results[warmup] = (weights, (out / "steps.csv").read_text().splitlines(), summary["final_top1"])
    (warm, warm_steps, warm_top1), (cold, cold_steps, cold_top1) = results[True], results[False]
    for name in cold:
        assert torch.equal(warm[name], cold[name]), name
    untimed = lambda lines: [line.split(",")[:2] + line.split(",")[3:5] for line in lines]  # noqa: E731
    assert untimed(warm_steps) == untimed(cold_steps)  # step, epoch, lr and train loss of every step
    assert warm_top1 == cold_top1


def _train_rank(rank: int, port: int, spec: TrainSpec) -> None:
    """One of two gloo DDP ranks, with the environment a local job exports (jobs/task.py)."""
    from lightning_fabric.plugins.environments import LightningEnvironment

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", NODE_RANK="0")
    train(spec, LightningEnvironment(), StopRequest())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_warmup_leaves_ddp_training_bit_identical(tiny_dataset, tmp_path):
    """Two gloo ranks: the warm-up's forward, backward (with DDP's all-reduce) and evaluation
    forwards through DDP leave the weights, BN statistics and metrics as without it."""
    weights = {}
    for warmup in (True, False):
        out = tmp_path / str(warmup)
        spec = make_spec(tiny_dataset, out, devices_per_node=2, batch_size=16, epochs=1, warmup_epochs=0.5,
                         log_every_steps=1, warmup_before_run_start=warmup)
        mp.start_processes(_train_rank, args=(free_port(), spec), nprocs=2, start_method="fork")
        weights[warmup] = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    for name in weights[False]:
        assert torch.equal(weights[True][name], weights[False][name]), name
