"""The one Trainer factory: what a node refuses, and the strategy every job (training or evaluation)
gets: DDP with the launcher's timeout over gloo on CPUs (no buffer broadcast, fp32 gradients), no DDP for
one process."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

from flashnet.config import ConfigError, RunConfig
from flashnet.train.lars import LARS, lars_param_groups
from flashnet.train.trainer import allreduce_dtype, build_trainer, resolve_accelerator


@pytest.mark.parametrize("overrides, error", [
    ({"accelerator": "gpu"}, "accelerator: gpu, but this node has no CUDA device"),
    ({"accelerator": "auto", "precision": "16-mixed"}, "precision: 16-mixed needs a GPU"),
    ({"accelerator": "auto", "decode_device": "cuda"}, "decode_device: cuda needs a GPU"),
])
def test_the_job_refuses_what_its_node_cannot_do(overrides, error, tiny_run):
    if torch.cuda.is_available():
        pytest.skip("checks what a node without CUDA refuses")
    with pytest.raises(ConfigError, match=error):
        resolve_accelerator(RunConfig.from_dict(tiny_run(**overrides)))
    assert resolve_accelerator(RunConfig.from_dict(tiny_run(accelerator="auto"))) == "cpu"


def test_bf16_only_where_the_gpu_has_it_in_hardware(monkeypatch, tiny_run):
    """A V100 emulates bf16: torch.cuda.is_bf16_supported() says yes unless asked about hardware."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    run = RunConfig.from_dict(tiny_run(accelerator="gpu", precision="bf16-mixed"))
    with pytest.raises(ConfigError, match="bf16-mixed is not supported by Tesla V100"):
        resolve_accelerator(run)
    assert resolve_accelerator(RunConfig.from_dict(tiny_run(accelerator="gpu", precision="16-mixed"))) == "gpu"


def test_several_processes_get_ddp_with_the_launchers_timeout():
    """Evaluation built its own DDPStrategy without a timeout: a hung rank hung the job for DDP's
    default 30 minutes whatever launcher.ddp_timeout_s said."""
    trainer = build_trainer("cpu", "32-true", nodes=1, devices_per_node=2, cluster_environment=None,
                            ddp_timeout_s=77, cpus_per_task=1, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._timeout == datetime.timedelta(seconds=77)
    assert trainer.strategy._process_group_backend == "gloo"
    assert trainer.strategy._ddp_comm_hook is None  # fp32 gradients on the wire
    assert trainer.strategy._ddp_kwargs == {"broadcast_buffers": False, "gradient_as_bucket_view": True,
                                            "static_graph": True}


def test_one_process_gets_no_ddp_and_its_cpus_for_threads():
    threads = torch.get_num_threads()
    try:
        trainer = build_trainer("cpu", "32-true", nodes=1, devices_per_node=1, cluster_environment=None,
                                ddp_timeout_s=600, cpus_per_task=1, logger=False)
        assert isinstance(trainer.strategy, SingleDeviceStrategy)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_gradients_are_all_reduced_in_fp32_whatever_the_precision(tiny_run):
    """A bf16 ring all-reduce biases gradients at 2,048 ranks (docs/benchmarks/allreduce.md): no
    16-bit comm hook, and the summary says float32."""
    for precision in ("bf16-mixed", "16-mixed", "32-true"):
        run = RunConfig.from_dict(tiny_run(accelerator="gpu", precision=precision))
        assert allreduce_dtype(run, "gpu") == allreduce_dtype(run, "cpu") == "float32"
    trainer = build_trainer("cpu", "bf16-mixed", nodes=1, devices_per_node=2, cluster_environment=None,
                            ddp_timeout_s=60, cpus_per_task=1, static_graph=False, logger=False)
    assert trainer.strategy._ddp_comm_hook is None
    assert trainer.strategy._ddp_kwargs["static_graph"] is False  # a compiled network's setting


class _TwoLayers(pl.LightningModule):
    """Linear → BatchNorm → Linear under LARS; each rank trains on data of its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))

    def on_train_start(self):
        ddp = self.trainer.strategy.model  # DDP wraps the module while it trains
        self.ddp_flags = (ddp.broadcast_buffers, ddp.gradient_as_bucket_view, ddp.static_graph)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.net(images), labels)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(100 + self.global_rank)
        data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=generator) * (1 + self.global_rank),
                                              torch.randint(0, 3, (32,), generator=generator))
        return torch.utils.data.DataLoader(data, batch_size=8)

    def configure_optimizers(self):
        return LARS(lars_param_groups(self.net, 1e-4), lr=0.5, momentum=0.9)


def _train_two_layers(rank: int, port: int, results) -> None:
    from lightning_fabric.plugins.environments import LightningEnvironment

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    trainer = build_trainer("cpu", "32-true", nodes=1, devices_per_node=2, cluster_environment=LightningEnvironment(),
                            ddp_timeout_s=60, cpus_per_task=1, max_steps=4, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False)
    module = _TwoLayers()
    trainer.fit(module)
    results[rank] = {
        "flags": module.ddp_flags,
        "params": [p.detach().clone() for p in module.net.parameters()],
        "running_mean": module.net[1].running_mean.clone(),
    }


def test_ddp_keeps_ranks_in_step_without_broadcasting_buffers():
    """Two gloo ranks through Lightning with the flags of ``ddp_options``: after 4 steps on
    different data the weights are equal on both ranks (gradients all-reduced, also with
    static_graph under Lightning's automatic optimisation, cf. Lightning#20704), while each
    rank's BatchNorm running statistics are its own: nothing broadcasts rank 0's buffers (the
    ``health`` work all-reduces them before evaluation)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_train_two_layers, args=(port, results), nprocs=2, start_method="fork")
        results = dict(results)
    assert results[0]["flags"] == results[1]["flags"] == (False, True, True)
    for p0, p1 in zip(results[0]["params"], results[1]["params"]):
        torch.testing.assert_close(p0, p1, rtol=1e-6, atol=1e-7)
    initial = _TwoLayers().net
    assert not torch.equal(results[0]["params"][0], initial[0].weight.detach())  # it did train
    assert not torch.allclose(results[0]["running_mean"], results[1]["running_mean"])
