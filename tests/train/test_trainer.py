"""The one Trainer factory: what a node refuses, and the strategy every job (training or evaluation)
gets: DDP with the launcher's timeout over gloo on CPUs, no DDP for one process."""

from __future__ import annotations

import datetime

import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

from flashnet.config import ConfigError, RunConfig
from flashnet.train.trainer import allreduce_dtype, build_trainer, gradient_compression_hook, resolve_accelerator


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
    assert trainer.strategy._ddp_comm_hook is None  # gloo on CPUs keeps fp32 gradients


def test_one_process_gets_no_ddp_and_its_cpus_for_threads():
    threads = torch.get_num_threads()
    try:
        trainer = build_trainer("cpu", "32-true", nodes=1, devices_per_node=1, cluster_environment=None,
                                ddp_timeout_s=600, cpus_per_task=1, logger=False)
        assert isinstance(trainer.strategy, SingleDeviceStrategy)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_mixed_precision_gradients_travel_in_16_bits_on_gpus_only(tiny_run):
    assert gradient_compression_hook("bf16-mixed", "cpu") is None
    assert gradient_compression_hook("32-true", "gpu") is None
    assert gradient_compression_hook("bf16-mixed", "gpu").__name__ == "bf16_compress_hook"
    fp16 = RunConfig.from_dict(tiny_run(accelerator="gpu", precision="16-mixed"))
    assert allreduce_dtype(fp16, "gpu") == "float16" and allreduce_dtype(fp16, "cpu") == "float32"
