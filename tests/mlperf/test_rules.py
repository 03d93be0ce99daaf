"""flashnet.mlperf.rules: each closed ResNet-50 rule, met and broken."""

from __future__ import annotations

import pytest

from flashnet.mlperf.rules import closed_division_breaks, division
from flashnet.resolve import resolve_run

CLOSED, _ = resolve_run("mlperf-lars-b3264", [])


def test_the_rcp_preset_meets_every_closed_rule():
    assert closed_division_breaks(CLOSED) == [] and division(CLOSED) == "closed"


@pytest.mark.parametrize("change, broken", [
    ({"model": "resnet101"}, "model: resnet101"),
    ({"image_size": 192}, "image_size: 192"),
    ({"target_top1": 0.75}, "target_top1: 0.75"),
    ({"eval_every_epochs": 2, "eval_offset": 0}, "eval_every_epochs: 2"),
    ({"label_smoothing": 0.2}, "label_smoothing: 0.2"),
    ({"crop_scale": [0.08, 1.0]}, "crop_scale/crop_ratio"),  # torchvision's default, not the reference's
    ({"crop_ratio": [0.5, 2.0]}, "crop_scale/crop_ratio"),
    ({"no_augment_from_epoch": 30}, "no_augment_from_epoch: 30"),
    ({"epochs": 40}, "epochs: 40 (closed: evaluations on the cadence only"),  # last epoch 40 off offset 2
    ({"epochs": 38.5}, "epochs: 38.5"),
    ({"end_lr": 0.0}, "end_lr: 0.0"),
    ({"weight_decay": 0.00003}, "weight_decay: 3e-05"),  # not 0.0001 × 2^N
    ({"nesterov": True}, "nesterov: true"),
    ({"lars_epsilon": 1e-8}, "lars_epsilon: 1e-08"),
    ({"lr_decay_power": 2.2}, "lr_decay_power: 2.2"),
    ({"momentum": 0.95}, "momentum: 0.95 (closed: 0.9 below batch 32,768)"),
    ({"lars_eta": 0.002}, "lars_eta: 0.002"),
    ({"lars_trust_clip": True}, "lars_trust_clip: true"),
    ({"lars_exclude_bn_bias": False}, "lars_exclude_bn_bias: false"),
])
def test_each_broken_rule_is_named(change, broken):
    breaks = closed_division_breaks(CLOSED.replace(**change))
    assert len(breaks) == 1 and breaks[0].startswith(broken), breaks


def test_momentum_is_free_from_batch_32768_and_weight_decay_is_a_power_of_two_of_1e4():
    big, _ = resolve_run("mlperf-lars-b65536", [])
    assert closed_division_breaks(big.replace(momentum=0.97)) == []
    assert closed_division_breaks(CLOSED.replace(weight_decay=0.0004)) == []  # 0.0001 × 2²


def test_sgd_rules():
    sgd = CLOSED.replace(optimizer="sgd", lr=10.5, momentum=0.9)
    assert closed_division_breaks(sgd) == []
    assert closed_division_breaks(sgd.replace(lr=10.5004)) == ["lr: 10.5004 (closed: a multiple of 0.001)"]
    assert closed_division_breaks(sgd.replace(warmup_epochs=2.5)) == ["warmup_epochs: 2.5 (closed: a whole number)"]
    assert closed_division_breaks(sgd.replace(momentum=0.95)) == ["momentum: 0.95 (closed: 0.9)"]


def test_the_references_and_nvidias_crop_are_closed():
    """MLPerf's TF2 reference crops area [0.05, 1.0] at aspect [0.75, 1.33]; NVIDIA's closed runs crop
    --min-random-area 0.05 --max-random-area 1.0 at dali.py's 3/4 to 4/3."""
    assert closed_division_breaks(CLOSED.replace(crop_scale=[0.05, 1.0], crop_ratio=[0.75, 1.33])) == []
    assert closed_division_breaks(CLOSED.replace(crop_scale=[0.05, 1.0], crop_ratio=[3 / 4, 4 / 3])) == []


@pytest.mark.parametrize("epochs, closed", [(39, True), (35, True), (36, False), (37, False), (38, False)])
def test_a_closed_run_ends_on_an_epoch_that_validates(epochs, closed):
    # b3264 validates after epochs 3, 7, ..., 35, 39 (offset 2)
    assert (closed_division_breaks(CLOSED.replace(epochs=epochs)) == []) is closed
