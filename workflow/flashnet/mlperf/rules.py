"""Which MLPerf Training division's ResNet-50 rules a run meets (training 4.0.0).

Sources: the compliance checker's rule files in mlcommons/logging,
``mlperf_logging/compliance_checker/training_4.0.0/closed_resnet.yaml`` and
``training_3.1.0/closed_resnet_{lars,sgd}.yaml`` (which 4.0.0 enqueues; identical to 4.0.0's), and the
hyperparameter table and rules of mlcommons/training_policies ``training_rules.adoc`` (v4.0):
"By default, the hyperparameters must be the same as the reference", evaluation "Every 4 epochs with
offset 0 or 1 or 2 or 3", the quality target 75.90 % top-1, label smoothing "0 or 0.1", LARS momentum
"0.9 for batch<32k", and "CLOSED: The same preprocessing steps as the reference implementation must be
used" (Preprocessing During the Run). For the crop, the MLPerf ResNet reference
(mlcommons/training, ``retired_benchmarks/resnet-tf2/tensorflow2/imagenet_preprocessing.py``) crops
``area_range=[0.05, 1.0]``, ``aspect_ratio_range=[0.75, 1.33]``, and NVIDIA's closed submissions crop
the same area (``run_and_time.sh --min-random-area 0.05 --max-random-area 1.0``) at 3/4 to 4/3
(``dali.py``'s defaults), so both aspect-ratio spellings are closed. Closed runs evaluate on the
cadence only: a run whose last epoch is off it would log its final evaluation off cadence, so a
closed run's length ends on a validated epoch (NVIDIA's configs choose NUMEPOCHS so; the reference
rounds its train_epochs up to one).

A run that breaks none of them is eligible for the closed division; the data set (ImageNet-1k) is
the user's to provide and is not checked here.
"""

from __future__ import annotations

import math

CLOSED_TARGET_TOP1 = 0.759
REFERENCE_CROP_SCALE = (0.05, 1.0)
CLOSED_CROP_RATIOS = ((0.75, 1.33), (3 / 4, 4 / 3))  # the reference's, NVIDIA's
EVAL_PERIOD = 4
END_LR = 0.0001


def _is_integer(x: float) -> bool:
    """The checker's own test: ``abs(round(x) - x) < 1e-5``."""
    return abs(round(x) - x) < 1e-5


def _weight_decay_ok(weight_decay: float) -> bool:
    """``is_integer(math.log2(wd / 0.0001))``: 0.0001 × 2^N."""
    return weight_decay > 0 and _is_integer(math.log2(weight_decay / 0.0001))


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))


def closed_division_breaks(run) -> list[str]:
    """The closed ResNet-50 rules ``run`` breaks, each as ``key: what it is (what the rule says)``;
    empty when it meets them all."""
    breaks = []

    def rule(ok: bool, text: str) -> None:
        if not ok:
            breaks.append(text)

    rule(run.model == "resnet50", f"model: {run.model} (closed: resnet50)")
    rule(run.image_size == 224, f"image_size: {run.image_size} (closed: the reference's 224)")
    rule(math.isclose(run.target_top1, CLOSED_TARGET_TOP1), f"target_top1: {run.target_top1} (closed: 0.759)")
    rule(run.eval_every_epochs == EVAL_PERIOD,
         f"eval_every_epochs: {run.eval_every_epochs} (closed: every 4 epochs, offset 0-3)")
    rule(run.label_smoothing in (0.0, 0.1), f"label_smoothing: {run.label_smoothing} (closed: 0 or 0.1)")
    rule(_close(run.crop_scale, REFERENCE_CROP_SCALE) and any(_close(run.crop_ratio, r) for r in CLOSED_CROP_RATIOS),
         f"crop_scale/crop_ratio: {list(run.crop_scale)}/{[round(r, 4) for r in run.crop_ratio]} "
         "(closed: the reference's [0.05, 1.0]/[0.75, 1.33], or 3/4 to 4/3 as NVIDIA's)")
    last = math.ceil(run.epochs)
    rule(_is_integer(run.epochs) and (last - 1) % run.eval_every_epochs == run.eval_offset % run.eval_every_epochs,
         f"epochs: {run.epochs:g} (closed: evaluations on the cadence only, so the last epoch is one that "
         f"validates: (epochs - 1) mod {run.eval_every_epochs} = eval_offset {run.eval_offset})")
    rule(run.eval_offset < EVAL_PERIOD, f"eval_offset: {run.eval_offset} (closed: 0-3)")
    rule(run.no_augment_from_epoch is None,
         f"no_augment_from_epoch: {run.no_augment_from_epoch} (closed: the reference's augmentation throughout)")
    rule(math.isclose(run.end_lr, END_LR), f"end_lr: {run.end_lr} (closed: 0.0001)")
    rule(_weight_decay_ok(run.weight_decay), f"weight_decay: {run.weight_decay} (closed: 0.0001 × 2^N)")
    rule(not run.nesterov, "nesterov: true (closed: the reference's heavy-ball momentum)")
    if run.optimizer == "lars":
        rule(run.lars_epsilon == 0.0, f"lars_epsilon: {run.lars_epsilon} (closed: 0)")
        rule(run.lr_decay_power == 2, f"lr_decay_power: {run.lr_decay_power} (closed: 2)")
        rule(run.batch_size >= 32768 or math.isclose(run.momentum, 0.9),
             f"momentum: {run.momentum} (closed: 0.9 below batch 32,768)")
        rule(math.isclose(run.lars_eta, 0.001), f"lars_eta: {run.lars_eta} (closed: the reference's 0.001)")
        rule(not run.lars_trust_clip, "lars_trust_clip: true (closed: the reference's unclipped trust ratio)")
        rule(run.lars_trust_weight_decay is None,
             f"lars_trust_weight_decay: {run.lars_trust_weight_decay} (closed: the reference's weight_decay)")
        rule(run.lars_exclude_bn_bias, "lars_exclude_bn_bias: false (closed: the reference keeps BN and biases "
                                       "out of LARS and weight decay)")
    else:
        rule(_is_integer(run.lr / 0.001), f"lr: {run.lr} (closed: a multiple of 0.001)")
        rule(math.isclose(run.momentum, 0.9), f"momentum: {run.momentum} (closed: 0.9)")
        rule(run.lr_decay_power == 2, f"lr_decay_power: {run.lr_decay_power} (closed: 2)")
        rule(_is_integer(run.warmup_epochs), f"warmup_epochs: {run.warmup_epochs} (closed: a whole number)")
    return breaks


def division(run) -> str:
    return "open" if closed_division_breaks(run) else "closed"
