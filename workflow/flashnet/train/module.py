"""The LightningModules: :class:`ImageNetClassifier` trains (torchvision ResNet v1.5,
label-smoothed cross-entropy, LARS or SGD with the warmup + polynomial schedule stepped every
iteration, top-1/top-5 with torchmetrics); :class:`Evaluator` scores a trained model on the val set.

Both run the same way under any launcher: ranks, devices and precision come from the Trainer.
Both take their inputs from a :class:`~flashnet.data.batch.Batch` through :func:`model_inputs`
(decoded on the device if the batch carries JPEGs, normalised there, padding labelled
:data:`IGNORED`) and count accuracy with :func:`accuracy_metrics`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from ..config import RunConfig
from ..data.batch import Batch
from ..data.transforms import normalize
from .lars import LARS, lars_param_groups, lr_table
from .schedule import WarmupPolySchedule

IGNORED = -100  # label of val padding samples, which the accuracy metrics (and the loss) skip


def build_model(run: RunConfig, num_classes: int) -> nn.Module:
    """torchvision's ResNet (v1.5: stride 2 in the 3×3 convolution), optionally with the last BN
    γ of each residual block zeroed so every block starts as the identity (Goyal et al. §5.1)."""
    return torchvision.models.get_model(run.model, weights=None, num_classes=num_classes,
                                        zero_init_residual=run.zero_init_residual)


def bn_group_ranks(world_size: int, group_size: int) -> list[list[int]]:
    """Consecutive ranks in groups of ``group_size``: ranks are numbered node by node, so a group
    that fits on one node stays on it and its all-reduces never leave the node."""
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def synchronise_batchnorm(model: nn.Module, group_size: int) -> nn.Module:
    """BatchNorm statistics pooled over this rank's group of ``group_size`` devices (MLPerf's
    ``model_bn_span`` = group_size × per-device batch), as NVIDIA's MLPerf runs do.

    The groups are made without a ``new_group`` call per group on every rank (world/span calls,
    1,024 on each of 2,048 ranks at a span of 2): under NCCL one ``split_group`` call on every rank
    splits the default communicator (ncclCommSplit; needs the default group bound to a device, as
    Lightning's DDP strategy and ``startup.join_process_group`` bind it); elsewhere (gloo, or a torch
    without ``split_group``) each rank makes only its own group, with ``new_group(...,
    use_local_synchronization=True)``, which ranks outside the group need not call. torch 2.14's
    ``split_group`` refuses gloo ("Only the NCCL and custom plugin backends are supported");
    ``new_subgroups_by_enumeration`` would still call ``new_group`` once per group."""
    import torch.distributed as dist

    groups = bn_group_ranks(dist.get_world_size(), group_size)
    if dist.get_backend() == "nccl" and hasattr(dist, "split_group"):
        own = dist.split_group(split_ranks=groups, group_desc="batchnorm")
    else:
        own = dist.new_group(groups[dist.get_rank() // group_size], use_local_synchronization=True)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=own)


def classifier_bias(model: nn.Module) -> list[torch.Tensor]:
    """The last Linear layer's bias (ResNet's fc), as a list: empty without one."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    return [linears[-1].bias] if linears else []


def batchnorm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm layer's running mean and variance (not its batch counter), in module order."""
    return [stat for layer in model.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
            for stat in (layer.running_mean, layer.running_var)]


def average_batchnorm_statistics(model: nn.Module) -> None:
    """Every rank's BN running statistics replaced by their mean over all ranks, in one all-reduce
    of all of them flattened together (a collective: call on every rank).

    Without DDP's buffer broadcast each rank keeps the statistics of its own batches; NVIDIA's MLPerf
    ResNet averages them before every evaluation (``reduce_batchnorm_stats`` in ``common/fit.py`` of
    mlcommons/training_results_v3.1 NVIDIA/benchmarks/resnet/implementations/mxnet, a grouped
    Horovod all-reduce, whose default op is the average), so validation and model.pt see the
    statistics of the whole global batch, not one rank's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    stats = batchnorm_statistics(model)
    for dtype in sorted({stat.dtype for stat in stats}, key=str):  # fp32 in practice; one all-reduce per dtype
        same = [stat for stat in stats if stat.dtype == dtype]
        flat = torch.cat([stat.reshape(-1) for stat in same])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for stat, mean in zip(same, flat.split([stat.numel() for stat in same])):
            stat.copy_(mean.view_as(stat))


@dataclasses.dataclass(frozen=True)
class RankAgreement:
    """What all ranks agreed on at a check: each named flag (true where any rank's was, e.g.
    ``stop``: a stop was requested), the first step at which any rank saw a non-finite loss (-1:
    none), and the mean train loss over all ranks since the last log step (None: no step since)."""

    flags: dict[str, bool]
    nonfinite_step: int  # -1: every loss since the last check was finite
    mean_loss: float | None

    @property
    def stop(self) -> bool:
        return self.flags.get("stop", False)


def build_optimizer(run: RunConfig, model: nn.Module, schedule: WarmupPolySchedule | None = None
                    ) -> torch.optim.Optimizer:
    """LARS (stepping ``schedule`` itself, on the device, when given) or torch's SGD."""
    groups = lars_param_groups(model, run.weight_decay, exclude_bn_and_bias=run.lars_exclude_bn_bias,
                               decayed=classifier_bias(model) if run.fc_bias_weight_decay else ())
    if run.optimizer == "lars":
        table = None if schedule is None else lr_table(schedule, schedule.horizon_steps + 1)
        return LARS(groups, lr=run.lr, momentum=run.momentum, nesterov=run.nesterov, eta=run.lars_eta,
                    eps=run.lars_epsilon, trust_clip=run.lars_trust_clip,
                    trust_weight_decay=run.lars_trust_weight_decay, momentum_form=run.lars_momentum_form,
                    lr_schedule=table)
    for group in groups:
        group.pop("lars", None)
    return torch.optim.SGD(groups, lr=run.lr, momentum=run.momentum, nesterov=run.nesterov, foreach=True)


def model_inputs(batch: Batch, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, labels) on ``device``; padding samples' labels are :data:`IGNORED`, so
    no metric counts them. Images are channels_last on GPUs, plain NCHW on CPUs (faster there)."""
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    images = normalize(batch.device_images(image_size, device), layout)
    return images, torch.where(batch.valid, batch.labels, IGNORED)


def accuracy_metrics(num_classes: int) -> tuple[MulticlassAccuracy, MulticlassAccuracy]:
    """Top-1 and top-5 accuracy (top-k of every class when there are fewer than 5), skipping
    :data:`IGNORED` labels; ``compute()`` gathers over all ranks."""
    return tuple(MulticlassAccuracy(num_classes, top_k=k, average="micro", ignore_index=IGNORED)
                 for k in (1, min(5, num_classes)))


def fresh_log_totals(device: torch.device) -> torch.Tensor:
    return torch.tensor([0.0, 0.0, 0.0, math.inf], dtype=torch.float64, device=device)


class ImageNetClassifier(pl.LightningModule):
    def __init__(self, run: dict[str, Any], num_classes: int, schedule: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters()
        self.run_config = RunConfig.from_dict(run)
        self.schedule = WarmupPolySchedule(**schedule)
        self.model = build_model(self.run_config, num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.run_config.label_smoothing)
        self.val_top1, self.val_top5 = accuracy_metrics(num_classes)
        # Device-side bookkeeping, read only at log intervals so the step never waits on the host.
        # Saved in resume checkpoints (not in model.pt), shared over the ranks first (share_epoch_loss),
        # so an epoch's mean loss over all ranks survives a requeue.
        self.register_buffer("loss_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros((), dtype=torch.long))
        # This rank's first non-finite step (-1: none), as bench/gpu reads it; the run's checks use log_totals.
        self.register_buffer("first_nonfinite_step", torch.full((), -1, dtype=torch.long))
        # Since the last check, on this rank: [finite losses' sum, steps, non-finite losses, first
        # non-finite step (inf: none)]. Not a buffer, so DDP's buffer broadcast never overwrites it
        # with rank 0's and checkpoints do not carry it; reduced over the ranks by agree_across_ranks.
        self.log_totals: torch.Tensor | None = None
        self.agreement: RankAgreement | None = None  # this batch end's agreement, once taken

    def setup(self, stage: str) -> None:
        # Runs after the process group is up and before DDP wraps the model.
        if self.run_config.bn_group_size > 1:
            self.model = synchronise_batchnorm(self.model, self.run_config.bn_group_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels = model_inputs(batch, self.run_config.image_size, self.device)
        loss = self.criterion(self(images), labels)
        self.count_loss(loss.detach())
        return loss

    def count_loss(self, loss: torch.Tensor) -> None:
        """Device-side bookkeeping of this step's loss: no host sync (read at checks only)."""
        finite = torch.isfinite(loss)
        self.first_nonfinite_step.copy_(torch.where(
            (~finite) & (self.first_nonfinite_step < 0), self.global_step, self.first_nonfinite_step))
        finite_loss = torch.where(finite, loss.double(), 0.0)
        self.loss_sum += finite_loss
        self.loss_count += 1
        if self.log_totals is None or self.log_totals.device != finite_loss.device:
            self.log_totals = fresh_log_totals(finite_loss.device)
        self.log_totals[:3] += torch.stack((finite_loss, torch.ones_like(finite_loss), (~finite).double()))
        self.log_totals[3] = torch.where(finite, self.log_totals[3], self.log_totals[3].clamp(max=self.global_step))

    def on_train_start(self) -> None:
        # A fresh interval: a warm-up step on synthetic data before training (train/warmup.py, at
        # on_fit_start) counts nothing here; it restores buffers, and these are not buffers.
        self.log_totals, self.agreement = None, None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.agreement = None  # a new step: the next check agrees afresh

    def agree_across_ranks(self, flags: dict[str, bool]) -> RankAgreement:
        """One all-reduce of [loss sum, steps, non-finite losses, *flags] over all ranks, taken once
        per batch end (a second call in the same batch end returns the first's answer, so the
        callbacks asking give the same flags: :meth:`.callbacks.ResumeCheckpoints.agreement_flags`);
        a collective: every rank calls it at the same points. A second, one-number all-reduce finds
        the first non-finite step, only on the way to failing. The loss interval restarts at log steps."""
        if self.agreement is not None:
            return self.agreement
        if self.log_totals is None:
            self.log_totals = fresh_log_totals(self.device)
        totals = self.log_totals
        asked = torch.tensor([float(value) for value in flags.values()], dtype=torch.float64, device=totals.device)
        reduced = torch.cat((totals[:3], asked))
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(reduced)
        loss_sum, steps, nonfinite, *raised = reduced.tolist()
        nonfinite_step = -1
        if nonfinite:
            first = totals[3:].clone()
            if distributed:
                dist.all_reduce(first, op=dist.ReduceOp.MIN)
            nonfinite_step = int(first.item())
        if self.global_step % self.run_config.log_every_steps == 0:
            totals.zero_()
            totals[3] = math.inf
        self.agreement = RankAgreement({name: count > 0 for name, count in zip(flags, raised)}, nonfinite_step,
                                       loss_sum / steps if steps else None)
        return self.agreement

    def on_validation_start(self) -> None:
        self.agreement = None  # a stop may be asked for during validation: the next check agrees afresh
        if not self.trainer.sanity_checking:
            average_batchnorm_statistics(self.model)  # validation sees the statistics of every rank

    def on_train_end(self) -> None:
        average_batchnorm_statistics(self.model)  # model.pt holds the statistics of every rank

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = model_inputs(batch, self.run_config.image_size, self.device)
        logits = self(images)
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val_top1", self.val_top1.compute(), sync_dist=False, logger=False)
        self.log("val_top5", self.val_top5.compute(), sync_dist=False, logger=False)
        self.val_top1.reset()
        self.val_top5.reset()

    def share_epoch_loss(self) -> None:
        """Each rank's running epoch loss (``loss_sum``, ``loss_count``) replaced by its mean over
        the ranks (a collective: call on every rank). A resume checkpoint holds rank 0's buffers and
        every rank resumes from them; after this they carry every rank's share, and
        :meth:`take_mean_train_loss`, which sums over the ranks, gives the same epoch mean as an
        uninterrupted run (every rank counts the same steps, so the mean count is exact)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        totals = torch.stack([self.loss_sum, self.loss_count.double()])
        dist.all_reduce(totals)
        totals /= dist.get_world_size()
        self.loss_sum.copy_(totals[0])
        self.loss_count.copy_(totals[1].round().long())

    def take_mean_train_loss(self) -> float:
        """Mean train loss since the last call, over all ranks (a collective: call on every rank)."""
        totals = torch.stack([self.loss_sum, self.loss_count.double()])
        totals = self.all_gather(totals).reshape(-1, 2).sum(0)
        self.loss_sum.zero_()
        self.loss_count.zero_()
        return float(totals[0] / totals[1].clamp(min=1))

    def configure_optimizers(self):
        optimizer = build_optimizer(self.run_config, self.model, self.schedule)
        if isinstance(optimizer, LARS):
            # LARS steps the schedule on the device and only over applied steps (fp16 skips excluded).
            return optimizer
        peak = self.schedule.peak_lr
        # LambdaLR scales each group's initial lr (= peak) by schedule(step) / peak.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.schedule(step) / peak)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Evaluator(pl.LightningModule):
    """A trained model's top-1, top-5, per-class top-1 and sample count over the val batches, in
    :attr:`results` on every rank after ``Trainer.validate``."""

    def __init__(self, run: RunConfig, network: nn.Module, num_classes: int):
        super().__init__()
        self.run_config = run
        self.model = network  # as model.pt's reader built it: the weights are not copied again
        self.top1, self.top5 = accuracy_metrics(num_classes)
        self.per_class = MulticlassAccuracy(num_classes, top_k=1, average=None, ignore_index=IGNORED)
        self.samples = SumMetric()
        self.results: dict[str, Any] = {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = model_inputs(batch, self.run_config.image_size, self.device)
        logits = self.model(images)
        for metric in (self.top1, self.top5, self.per_class):
            metric.update(logits, labels)
        self.samples.update(batch.valid.sum())

    def on_validation_epoch_end(self) -> None:
        # compute() gathers over all ranks, so every rank holds the totals.
        self.results = {
            "top1": float(self.top1.compute()),
            "top5": float(self.top5.compute()),
            "per_class": [float(v) for v in self.per_class.compute()],
            "samples": int(self.samples.compute()),
        }
