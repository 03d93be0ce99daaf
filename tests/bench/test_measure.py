"""Tests of flashnet.bench.measure: the operation counts against PyTorch's own counter and by
hand, and the timers' behaviour without a GPU."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from flashnet.bench import measure


def test_training_flops_of_resnet50_at_224_px_are_3_times_2_times_its_forward_macs():
    # torchvision: ResNet-50 forward = 4.089 G multiply-adds; ×2 FLOP each; ×3 for forward + backward
    assert measure.training_flops_per_image("resnet50", 224) == pytest.approx(3 * 2 * 4.089e9)
    assert measure.training_flops_per_image("resnet50", 224) / 1e9 == pytest.approx(24.534)
    # half the side, a quarter of the pixels
    assert measure.training_flops_per_image("resnet18", 112) == pytest.approx(3 * 2 * 1.814e9 / 4)


def test_flop_constant_agrees_with_pytorch_flop_counter_within_two_percent():
    """FlopCounterMode counts convolutions and matmuls of a real forward + backward (on the meta
    device: no arithmetic is done). It finds slightly fewer, because the image needs no gradient."""
    model = torchvision.models.resnet50().to("meta")
    images = torch.randn(2, 3, 224, 224, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    counted = counter.get_total_flops() / 2
    assert counted / measure.training_flops_per_image("resnet50", 224) == pytest.approx(1.0, abs=0.02)


def test_achieved_tflops_and_fraction_of_the_matmul_rate_by_hand():
    # 1,000 images/s × 24.534 GFLOP = 24.534 TFLOP/s
    assert measure.achieved_tflops(1000, 24.534e9) == pytest.approx(24.534)
    # 8192³ multiply-adds = 549,755,813,888; ×2 = 1.0995e12 FLOP in 1.4 ms = 785.4 TFLOP/s
    assert measure.matmul_tflops(8192, 1.4e-3) == pytest.approx(785.36, abs=0.01)
    # 3,900 images/s of ResNet-50 against a 798 TFLOP/s matmul: 95.7 TFLOP/s, 12.0%
    tflops = measure.achieved_tflops(3900, measure.training_flops_per_image("resnet50", 224))
    assert tflops == pytest.approx(95.68, abs=0.01)
    assert tflops / 798 == pytest.approx(0.1199, abs=1e-4)
    # 50 steps of batch 256 in 4 s
    assert measure.images_per_second(50, 256, 4.0) == 3200


def test_host_syncs_are_not_counted_on_the_cpu():
    assert measure.count_host_syncs(lambda: None, torch.device("cpu")) == (None, None)
