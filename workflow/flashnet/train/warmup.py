"""The warm-up before MLPerf's ``run_start``: the training step and every evaluation batch shape run
once on synthetic data, then the training state is put back exactly as it was.

Why: MLPerf's time to train (``run_start`` → ``run_stop``) would otherwise hold ``torch.compile``'s
graph compilations (the train graph, the eval graph, the eval graph of a short last batch, the one
of a 1-sample padding batch), cuDNN's autotuning of every convolution shape and the first NCCL
all-reduce, all met for the first time inside the timed region. The rules let a submission warm up
on synthetic data during initialisation, and NVIDIA's ResNet-50 submissions do (MLCommons'
training_results_v3.1, NVIDIA/benchmarks/resnet/implementations/mxnet/common/fit.py, ``fit``:
forward/backward on dummy zero batches and a pass over synthetic eval data before the timed loop).

Where: Lightning's ``on_fit_start``, which comes after the process group is up, DDP has wrapped the
model and the resume checkpoint's weights are loaded, and before the optimizer state is restored
and before ``on_train_start``, where :class:`flashnet.mlperf.log.MLPerfLog` logs ``init_stop`` and
``run_start``. The steps go through the strategy, as the fit loop's do (the precision plugin's
autocast, DDP's forward and its gradient all-reduce), so what is compiled and tuned is what the
real steps run. The optimizer is not stepped: its state is not touched, and the schedule, the
scaler and the global step do not move.

What is restored: every tensor of the module's state (weights, BatchNorm running statistics and
batch counts, the loss bookkeeping buffers), copied back in place (DDP's buckets and the
optimizer keep pointing at the same tensors); the gradients (cleared); the metrics' state (reset);
the random number generators of Python, NumPy, torch and CUDA. A run with the warm-up and one
without train bit for bit alike (tests/train/test_warmup.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import simplejpeg
import torch
import torch.distributed as dist
from torchmetrics import Metric

from ..data.batch import Batch
from ..data import loader
from ..data.loader import collate_decoded, collate_encoded


def val_batch_sizes(val_samples: int, world_size: int, batch_size: int) -> tuple[int, ...]:
    """Every size of val batch that any rank runs, largest first: full batches, short last ones, and
    the 1-sample padding batches, from the val loader's own plan (``data/loader.py: val_batches``).

    The same on every rank, so every rank warms up with the same number of evaluation forwards:
    DDP's forward may broadcast buffers, a collective each rank must join."""
    sizes = {max(len(batch), 1) for rank in range(world_size)
             for batch in loader.val_batches(val_samples, world_size, rank, batch_size)}
    return tuple(sorted(sizes, reverse=True))


def synthetic_batch(size: int, image_size: int, encoded: bool) -> Batch:
    """``size`` valid samples of a fixed noise image (label 0), decoded or as JPEGs for nvJPEG: the
    shapes and paths of a real batch, from a generator of its own (the global ones are not drawn)."""
    noise = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (image_size, image_size, 3), dtype=torch.uint8, generator=noise)
    if encoded:
        jpeg = simplejpeg.encode_jpeg(image.numpy())
        return collate_encoded([(jpeg, (0, 0, image_size, image_size), False, 0)] * size)
    return collate_decoded([(image, 0)] * size)


@dataclasses.dataclass
class SavedState:
    """The module's tensors and the random number generators' states, to put back after the warm-up."""

    tensors: dict[str, torch.Tensor]
    rng: dict[str, Any]
    training: bool

    @classmethod
    def capture(cls, module: torch.nn.Module) -> SavedState:
        tensors = {name: tensor.detach().clone() for name, tensor in module.state_dict(keep_vars=True).items()}
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return cls(tensors, rng, module.training)

    def restore(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, tensor in module.state_dict(keep_vars=True).items():
                tensor.copy_(self.tensors[name])  # in place: DDP's buckets and the optimizer hold these
        module.zero_grad(set_to_none=True)
        for metric in module.modules():
            if isinstance(metric, Metric):
                metric.reset()
        random.setstate(self.rng["python"])
        np.random.set_state(self.rng["numpy"])
        torch.set_rng_state(self.rng["torch"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state_all(self.rng["cuda"])
        module.train(self.training)


def evaluation_grad_mode(trainer: pl.Trainer) -> contextlib.AbstractContextManager:
    """The grad mode of the fit loop's validation (compiled graphs are specialised on it, down to the
    input's dispatch keys): Lightning builds that loop with ``inference_mode=False``
    (``loops/training_epoch_loop.py``), and runs every evaluation under gloo without inference mode
    (``loops/utilities.py: _no_grad_context``)."""
    gloo = dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"
    if gloo or not trainer.fit_loop.epoch_loop.val_loop.inference_mode:
        return torch.no_grad()
    return torch.inference_mode()


class Warmup(pl.Callback):
    """Runs one training step's forward and backward and one evaluation forward per val batch size
    (:func:`val_batch_sizes`) on synthetic batches at ``on_fit_start``, then restores the state."""

    def __init__(self, image_size: int, train_batch_size: int, eval_batch_sizes: Sequence[int],
                 decode_on_device: bool = False):
        self.image_size, self.train_batch_size = image_size, train_batch_size
        self.eval_batch_sizes, self.decode_on_device = tuple(eval_batch_sizes), decode_on_device

    def _batch(self, trainer: pl.Trainer, size: int) -> Batch:
        return trainer.strategy.batch_to_device(synthetic_batch(size, self.image_size, self.decode_on_device))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saved = SavedState.capture(pl_module)
        try:
            self._train_step(trainer, pl_module)
            self._evaluation(trainer, pl_module)
        finally:
            saved.restore(pl_module)
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _train_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.train()
        loss = trainer.strategy.training_step(self._batch(trainer, self.train_batch_size), 0)
        loss.backward()  # DDP's gradient all-reduce runs; the optimizer is not stepped

    def _evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.eval()
        with evaluation_grad_mode(trainer):
            for index, size in enumerate(self.eval_batch_sizes):
                trainer.strategy.validation_step(self._batch(trainer, size), index)

