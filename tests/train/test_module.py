"""flashnet.train.module: BatchNorm groups for ``bn_span``; one input preparation and one set of
accuracy metrics for the classifier and the evaluator, fed the loaders' Batch."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from flashnet.config import RunConfig
from flashnet.data.batch import Batch, JpegCrops
from flashnet.data.transforms import normalize
from flashnet.train.module import (IGNORED, Evaluator, ImageNetClassifier, bn_group_ranks, model_inputs,
                                   synchronise_batchnorm)
from flashnet.train.schedule import WarmupPolySchedule

CLASSES = 4
SIZE = 32


def test_bn_groups_are_consecutive_ranks():
    assert bn_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert bn_group_ranks(4, 4) == [[0, 1, 2, 3]]
    assert bn_group_ranks(3, 1) == [[0], [1], [2]]


def _convert(rank: int, world: int, group: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    made = []  # the groups this rank made: its own only, not one per group of the world
    new_group = dist.new_group
    dist.new_group = lambda ranks, **options: made.append(list(ranks)) or new_group(ranks, **options)
    try:
        model = synchronise_batchnorm(torchvision.models.resnet18(num_classes=4), group)
        assert made == [bn_group_ranks(world, group)[rank // group]], made
        sync = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        plain = [m for m in model.modules() if type(m) is torch.nn.BatchNorm2d]
        results[rank] = (len(sync), len(plain), sorted({tuple(dist.get_process_group_ranks(m.process_group))
                                                        for m in sync}))
    finally:
        dist.new_group = new_group
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


# --------------------------------------------------------------------------- batches in, accuracy out


def padded_batch(labels: list[int] = (0, 1, 2, 3, 1)) -> Batch:
    """Five decoded images, the last two padding (as the val loader masks them)."""
    images = torch.randint(0, 256, (5, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Batch(torch.tensor(labels), torch.tensor([True, True, True, False, False]), images=images)


@pytest.fixture
def classifier(tiny_run) -> ImageNetClassifier:
    schedule = WarmupPolySchedule(peak_lr=1.0, warmup_steps=1, decay_steps=10, power=2.0, end_lr=0.0)
    module = ImageNetClassifier(tiny_run(image_size=SIZE), CLASSES, dataclasses.asdict(schedule))
    return module.eval()


def test_model_inputs_normalise_the_images_and_label_padding_ignored():
    batch = padded_batch()
    images, labels = model_inputs(batch, SIZE, torch.device("cpu"))
    assert torch.equal(images, normalize(batch.images, torch.contiguous_format))
    assert labels.tolist() == [0, 1, 2, IGNORED, IGNORED]


def test_the_module_leaves_jpegs_on_the_host_when_lightning_moves_a_batch(classifier):
    """Lightning's transfer hook, not overridden: the batch's own ``to`` moves what the step reads
    ("meta" stands in for a GPU) and keeps the JPEGs in host memory for nvJPEG."""
    crops = JpegCrops((torch.zeros(4, dtype=torch.uint8),), torch.tensor([[0, 0, 8, 8]]), torch.tensor([False]))
    batch = Batch(torch.tensor([1]), torch.tensor([True]), jpegs=crops)
    moved = classifier.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved.labels.device.type == moved.valid.device.type == "meta" and moved.jpegs is crops


def test_classifier_and_evaluator_count_the_same_accuracy_without_padding(classifier):
    """The same weights and batch, labelled so that one of the three real samples is predicted
    right and both padding samples would be: both modules' top-1 is 1/3, the evaluator counts 3."""
    with torch.no_grad():
        predicted = classifier(normalize(padded_batch().images, torch.contiguous_format)).argmax(1).tolist()
    wrong = [(p + 1) % CLASSES for p in predicted]
    batch = padded_batch([predicted[0], wrong[1], wrong[2], predicted[3], predicted[4]])
    with torch.no_grad():
        classifier.validation_step(batch, 0)
        evaluator = Evaluator(RunConfig.from_dict(classifier.hparams.run), copy.deepcopy(classifier.model), CLASSES)
        evaluator.eval().validation_step(batch, 0)
    evaluator.on_validation_epoch_end()
    assert classifier.val_top1.compute().item() == evaluator.results["top1"] == pytest.approx(1 / 3)
    assert evaluator.results["top5"] == classifier.val_top5.compute().item() == 1.0  # 4 classes: top-5 is all
    assert evaluator.results["samples"] == 3
    assert len(evaluator.results["per_class"]) == CLASSES


def test_lars_steps_the_schedule_itself_and_takes_the_runs_momentum_form(tiny_run):
    """LARS gets the whole schedule as a device-side table (no LambdaLR, whose count would also
    advance on steps fp16 skips); SGD keeps the LambdaLR."""
    from flashnet.train.lars import LARS

    schedule = WarmupPolySchedule(peak_lr=2.0, warmup_steps=3, decay_steps=5, power=2.0, end_lr=0.01)
    module = ImageNetClassifier(tiny_run(lars_momentum_form="tf_reference"), CLASSES, dataclasses.asdict(schedule))
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, LARS) and optimizer.defaults["momentum_form"] == "tf_reference"
    torch.testing.assert_close(optimizer.lr_schedule, torch.tensor([schedule(s) for s in range(9)]))
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(schedule(0))
    sgd = ImageNetClassifier(tiny_run(optimizer="sgd"), CLASSES, dataclasses.asdict(schedule))
    assert isinstance(sgd.configure_optimizers()["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LambdaLR)
