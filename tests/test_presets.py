"""Every preset equals its published source, value by value, as `flashnet recipe` resolves it.

The sources' numbers live here as data, each table with the file it comes from, so a preset that drifts
from its source fails by name.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from flashnet.resolve import IMAGENET_TRAIN_IMAGES, Resolved, mllog_lines, resolve_run
from flashnet.mlperf.rules import division

# mlcommons/logging, mlperf_logging/rcp_checker/training_4.0.0/rcps_resnet.json: batch size →
# (opt_base_learning_rate, opt_learning_rate_warmup_epochs, opt_momentum, opt_weight_decay,
#  opt_learning_rate_decay_steps, model_bn_span, "Epochs to converge").
RCP_RESNET_4_0_0 = {
    1632: (7.4, 2, 0.9, 5.0e-5, 27476, 204, [34, 34, 34, 35, 35, 37, 35, 35, 33, 35, 35, 37, 37, 35, 35, 34, 35]),
    3264: (10.5, 2, 0.9, 0.00005, 14523, 204, [36, 35, 34, 34, 36, 35, 35, 35, 35, 37, 35, 35, 35, 36, 35]),
    4096: (10, 5, 0.9, 2e-4, 13137, 64, [39, 42, 40, 41, 39, 40, 41, 39, 40, 39]),
    8192: (17, 5, 0.9, 2e-4, 6095, 64, [42, 44, 43, 41, 41, 41, 42, 42, 43, 41]),
    13056: (12.8, 9, 0.9, 2.5e-5, 4710, 204, [46, 46, 44, 46, 45, 46, 45, 45, 45, 46]),
    32768: (21.2, 16, 0.94, 2.5e-5, 2267, 128, [56, 56, 55, 56, 56, 56, 56, 56, 57, 56]),
    49152: (19.405, 24, 0.951807, 0.0001, 1846, 256, [68, 68, 68, 68, 69, 68, 68, 67, 69, 67]),
    58880: (23.246, 29, 0.951807, 0.0001, 1785, 230, [80, 81, 80, 78, 80, 80, 81, 79, 80, 80]),
    65536: (24.699, 31, 0.951807, 1e-4, 1133, 128, [83, 85, 84, 86, 85, 85, 83, 84, 85, 85]),
    67840: (24.699, 31, 0.951807, 0.0001, 1133, 424,
            [86, 87, 86, 87, 86, 85, 86, 86, 86, 85, 86, 86, 86, 86, 86, 85, 86, 86, 87, 85, 85, 86, 85, 87, 86, 85,
             85, 86]),
}
# The same file's rows at batch 49,152 and up, and the closed rules (closed_resnet_lars.yaml), fix these:
MLPERF_LARS_FIXED = {"end_lr": 0.0001, "lr_decay_power": 2, "lars_epsilon": 0.0}


def preset(name: str) -> Resolved:
    run, origin = resolve_run(name, [])
    assert origin == "preset"
    return Resolved.of(run, IMAGENET_TRAIN_IMAGES)


# ---------------------------------------------------------------- step counts as the sources' code makes them

N = 1_281_167  # ImageNet-1k train images (every source's num_examples / NUM_IMAGES['train'])

NVIDIA_FIT_PY = ("mlcommons/training_results_v4.0, NVIDIA/benchmarks/resnet/implementations/*_mxnet/common/fit.py: "
                 "get_epoch_size, PolySchedule(warmup_iterations = epoch_size * warmup_epochs), "
                 "`if eval_data and epoch % eval_period == eval_offset` (0-based epoch), num_epoch epochs of "
                 "epoch_size steps")
TF2_REFERENCE = ("mlcommons/training, retired_benchmarks/resnet-tf2/tensorflow2/common.py "
                 "get_num_train_iterations (drop_train_remainder True: NUM_IMAGES['train'] // batch_size; "
                 "train_epochs rounded up to end on an evaluation), lars_util.py (warmup_steps = warmup_epochs * "
                 "steps_per_epoch), resnet_ctl_imagenet_main.py (eval every epochs_between_evals * steps from "
                 "eval_offset_epochs * steps)")
FUJITSU_FIT_PY = ("mlcommons/training_results_v0.6, Fujitsu/benchmarks/resnet/implementations/mxnet/JobScripts/"
                  "image_classification/common/fit.py: get_epoch_size, warmup_steps = get_epoch_size * warmup_epochs, "
                  "decay_steps = --decay_steps after the warmup, `epoch >= eval_offset and (epoch - eval_offset) % "
                  "eval_period == 0`, ResizeIter(train, epoch_size) for num_epochs epochs")

# preset → (source's code, ranks, per-rank batch, warmup epochs, decay steps, eval period, eval offset as the
# source's flag says it, num epochs). Ranks and per-rank batch: the RCP row's BN span on one device (NVIDIA),
# the TF2 reference's global batch (its steps do not depend on devices), Fujitsu's 2,048 GPUs × 42. NVIDIA's
# EVAL_OFFSET is flashnet's eval_offset; the TF2 reference's eval_offset_epochs is the 1-based first epoch.
# Num epochs: NVIDIA's NUMEPOCHS as its configs choose it, on a validated epoch past the LR horizon
# (config_DGXH100_multi_316x8x16.sh: 'EVAL_OFFSET="1" #Targeting epoch 70 (total 70)'); None: the LR
# horizon in epochs as the TF2 reference's --train_epochs, which get_num_train_iterations rounds up.
SOURCE_RUNS = {
    "mlperf-lars-b1632": (NVIDIA_FIT_PY, 8, 204, 2, 27476, 4, 2, 39),
    "mlperf-lars-b3264": (NVIDIA_FIT_PY, 16, 204, 2, 14523, 4, 2, 39),
    "mlperf-lars-b4096": (TF2_REFERENCE, 1, 4096, 5, 13137, 4, 4, None),
    "mlperf-lars-b8192": (TF2_REFERENCE, 1, 8192, 5, 6095, 4, 2, None),
    "mlperf-lars-b13056": (NVIDIA_FIT_PY, 64, 204, 9, 4710, 4, 1, 58),
    "mlperf-lars-b32768": (TF2_REFERENCE, 1, 32768, 16, 2267, 4, 4, None),
    "mlperf-lars-b49152": (NVIDIA_FIT_PY, 192, 256, 24, 1846, 4, 3, 96),
    "mlperf-lars-b58880": (NVIDIA_FIT_PY, 256, 230, 29, 1785, 4, 3, 112),
    "mlperf-lars-b65536": (TF2_REFERENCE, 1, 65536, 31, 1133, 4, 1, None),
    "mlperf-lars-b67840": (NVIDIA_FIT_PY, 160, 424, 31, 1133, 4, 1, 94),
    "fujitsu-mlperf-v0.6": (FUJITSU_FIT_PY, 2048, 42, 36, 780, 4, 1, 90),
}


def source_step_counts(preset_name: str) -> dict:
    """Steps per epoch, warmup steps, the steps after which it evaluates, total steps and the step at
    which the LR reaches its floor, computed as the preset's source's code computes them."""
    code, ranks, per_rank, warmup_epochs, decay_steps, period, offset, num_epochs = SOURCE_RUNS[preset_name]
    if code == TF2_REFERENCE:
        epoch_size = N // (ranks * per_rank)
        num_epochs = math.ceil((epoch_size * warmup_epochs + decay_steps) / epoch_size)
        train_epochs = offset + math.ceil((num_epochs - offset) / period) * period
        evals = [offset * epoch_size + k * period * epoch_size for k in range(train_epochs // period + 1)]
        evals = [step for step in evals if 0 < step <= train_epochs * epoch_size]
    else:
        epoch_size = math.ceil(int(N / ranks) / per_rank)
        train_epochs = num_epochs
        if code == NVIDIA_FIT_PY:
            evaluated = [epoch for epoch in range(train_epochs) if epoch % period == offset]
        else:
            evaluated = [epoch for epoch in range(train_epochs) if epoch >= offset and (epoch - offset) % period == 0]
        evals = [(epoch + 1) * epoch_size for epoch in evaluated]
    warmup = epoch_size * warmup_epochs
    return {"steps_per_epoch": epoch_size, "warmup_steps": warmup, "eval_steps": evals,
            "total_steps": epoch_size * train_epochs, "floor_step": warmup + decay_steps, "decay_steps": decay_steps}


def flashnet_step_counts(resolved: Resolved) -> dict:
    return {"steps_per_epoch": resolved.steps_per_epoch, "warmup_steps": resolved.schedule.warmup_steps,
            "eval_steps": resolved.eval_steps, "total_steps": resolved.total_steps,
            "floor_step": resolved.schedule.horizon_steps, "decay_steps": resolved.schedule.decay_steps}


@pytest.mark.parametrize("name", sorted(SOURCE_RUNS))
def test_preset_steps_are_its_sources(name):
    resolved = preset(name)
    assert flashnet_step_counts(resolved) == source_step_counts(name)
    lr = resolved.schedule
    assert lr(lr.horizon_steps - 1) == pytest.approx(resolved.run.end_lr)  # the floor, on the 1-based step
    assert lr(lr.horizon_steps - 2) > resolved.run.end_lr * (1 + 1e-9)
    # the run's last step is a validated one: no evaluation off the cadence
    assert resolved.eval_steps[-1] == resolved.total_steps


def test_the_issues_figures():
    """NVIDIA at 67,840 (160 ranks × 424): 19 steps an epoch, warmup 589 (flashnet's floor counting
    made 18 and 558); Fujitsu: 15 steps an epoch, warmup 540, 1,350 steps, floor 0.0325 at step 1,320."""
    b67840, fujitsu = flashnet_step_counts(preset("mlperf-lars-b67840")), flashnet_step_counts(preset("fujitsu-mlperf-v0.6"))
    assert (b67840["steps_per_epoch"], b67840["warmup_steps"]) == (19, 589)
    assert (fujitsu["steps_per_epoch"], fujitsu["warmup_steps"], fujitsu["total_steps"], fujitsu["floor_step"]) == (
        15, 540, 1350, 1320)
    assert fujitsu["eval_steps"][-1] == 1350 and fujitsu["eval_steps"][0] == 30


@pytest.mark.parametrize("name", sorted(SOURCE_RUNS))
def test_recipe_prints_the_sources_step_counts(name):
    out = subprocess.run([sys.executable, "-m", "flashnet.cli", "recipe", name], capture_output=True, text=True,
                         check=True).stdout
    counts = source_step_counts(name)
    lines = dict(line.strip().split("  ", 1) for line in out.splitlines()[1:] if not line.strip().startswith("-"))
    assert lines["steps per epoch"].strip().startswith(f"{counts['steps_per_epoch']:,} = ")
    assert f"= {counts['warmup_steps']:,} steps" in lines["warmup"]
    assert f"reaches end_lr {preset(name).run.end_lr:g} at step {counts['floor_step']:,}" in lines["decay"]
    assert f"= {counts['total_steps']:,} steps" in lines["length"]
    assert lines["validation"].strip().endswith(f"{counts['eval_steps'][-1]:,}")


def test_every_rcp_row_has_a_preset_and_every_mlperf_preset_a_row():
    from flashnet.config import load_presets
    from flashnet.resolve import WORKFLOW_ROOT

    names = {n for n in load_presets(WORKFLOW_ROOT / "config" / "presets.yaml") if n.startswith("mlperf-lars-")}
    assert names == {f"mlperf-lars-b{batch}" for batch in RCP_RESNET_4_0_0}


def test_package_rcp_table_equals_this_copy_of_the_source():
    from flashnet.mlperf.rcp import RCP_RESNET_EPOCHS

    assert RCP_RESNET_EPOCHS == {batch: tuple(sorted(row[-1])) for batch, row in RCP_RESNET_4_0_0.items()}


@pytest.mark.parametrize("batch", sorted(RCP_RESNET_4_0_0))
def test_mlperf_preset_equals_its_rcp_row(batch):
    lr, warmup, momentum, weight_decay, decay_steps, bn_span, epochs = RCP_RESNET_4_0_0[batch]
    resolved = preset(f"mlperf-lars-b{batch}")
    run, schedule = resolved.run, resolved.schedule
    assert (run.batch_size, run.optimizer, run.model, run.image_size) == (batch, "lars", "resnet50", 224)
    assert (run.lr, run.warmup_epochs, run.momentum, run.weight_decay) == (lr, warmup, momentum, weight_decay)
    assert schedule.decay_steps == decay_steps  # as the row states it, not derived from epochs
    assert run.bn_span == bn_span and run.per_device_batch * run.bn_group_size == bn_span
    assert {key: getattr(run, key) for key in MLPERF_LARS_FIXED} == MLPERF_LARS_FIXED
    assert (run.label_smoothing, run.lars_eta, run.target_top1, run.stop_at_target) == (0.1, 0.001, 0.759, True)
    assert run.zero_init_residual is False  # MLPerf's reference keeps γ = 1
    # The whole LR horizon fits in `epochs`: the schedule is never cut short.
    assert schedule.horizon_steps <= resolved.total_steps
    assert schedule(resolved.total_steps - 1) == pytest.approx(0.0001)
    # Validation every 4 epochs (the rules), one of them on the row's (olympic) mean epochs to converge.
    mean = float(np.mean(sorted(epochs)[1:-1]))
    assert run.eval_every_epochs == 4 and math.floor(mean + 0.5) in resolved.eval_epochs
    assert division(run) == "closed"


def test_recipe_mllog_of_b32768_says_what_the_rcp_row_says():
    """The issue's check, through the command line a user runs."""
    out = subprocess.run([sys.executable, "-m", "flashnet.cli", "recipe", "mlperf-lars-b32768", "--mllog"],
                         capture_output=True, text=True, check=True).stdout
    import json

    values = {(r := json.loads(line.removeprefix(":::MLLOG ")))["key"]: r["value"] for line in out.splitlines()}
    assert values == {
        "global_batch_size": 32768, "gradient_accumulation_steps": 1, "opt_name": "lars",
        "lars_opt_base_learning_rate": 21.2, "lars_opt_end_learning_rate": 0.0001,
        "lars_opt_learning_rate_decay_poly_power": 2, "lars_opt_learning_rate_decay_steps": 2267,
        "lars_epsilon": 0.0, "lars_opt_learning_rate_warmup_epochs": 16, "lars_opt_momentum": 0.94,
        "lars_opt_weight_decay": 2.5e-5, "model_bn_span": 128, "train_samples": 1_281_167,
    }


def _checker(lines: list[str], tmp_path, rule_file: str) -> subprocess.CompletedProcess:
    """MLCommons' compliance checker on these lines, starting from one of its rule files."""
    log = tmp_path / "mllog.txt"
    log.write_text("\n".join(lines) + "\n")
    return subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                           "--ruleset", "4.0.0", "--config", rule_file, "--log_output", str(tmp_path / "checker.log"),
                           str(log)], capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("batch", sorted(RCP_RESNET_4_0_0))
def test_mlperf_presets_hyperparameters_pass_mlcommons_lars_rules(batch, tmp_path):
    # closed_resnet.yaml enqueues training_3.1.0/closed_resnet_lars.yaml for opt_name lars (identical to 4.0.0's)
    result = _checker(mllog_lines(preset(f"mlperf-lars-b{batch}")), tmp_path, "training_4.0.0/closed_resnet_lars.yaml")
    assert result.returncode == 0 and "SUCCESS" in result.stderr + result.stdout, result.stderr


def test_fujitsu_hyperparameters_fail_the_closed_lars_rules(tmp_path):
    result = _checker(mllog_lines(preset("fujitsu-mlperf-v0.6")), tmp_path, "training_4.0.0/closed_resnet_lars.yaml")
    assert result.returncode == 1
    for key in ("lars_opt_end_learning_rate", "lars_opt_learning_rate_decay_poly_power", "lars_epsilon"):
        assert key in result.stderr


# mlcommons/training_results_v0.6, Fujitsu/benchmarks/resnet/implementations/mxnet/JobScripts/parameters
# (and fit.py / dali.py for how they are used; see the preset's comments).
FUJITSU_PARAMETERS = {
    "--batch-size": 42, "GPUs": 2048, "--lr": 13.0, "--end_lr_ratio": 0.0025, "--warmup-epochs": 36,
    "--num-epochs": 90, "--decay_steps": 780, "--lr_decay": 2.2, "--mom": 0.96, "--wd": 5e-5,
    "--min-random-area": 0.05, "--max-random-area": 0.9, "--min-random-aspect-ratio": 0.666667,
    "--max-random-aspect-ratio": 1.5, "--no_augument_epoch": 85, "--smooth_alpha": 0.1, "--eval-period": 4,
    "--eval-offset": 1, "--accuracy-threshold": 0.759, "USE_FJSGD_LARC_ETA": 0.0025, "USE_ZERO_GAMMA_INIT": 0,
    "--dtype": "float16", "MLPERF_SUBMISSION_DIVISION": "open", "lars_epsilon": 1e-9,
}


def test_fujitsu_preset_equals_its_parameter_file():
    p = FUJITSU_PARAMETERS
    resolved = preset("fujitsu-mlperf-v0.6")
    run = resolved.run
    assert run.batch_size == p["GPUs"] * p["--batch-size"] == 86016 and run.world_size == p["GPUs"]
    assert (run.lr, run.warmup_epochs, run.epochs, run.lr_decay_power) == (
        p["--lr"], p["--warmup-epochs"], p["--num-epochs"], p["--lr_decay"])
    assert resolved.schedule.decay_steps == p["--decay_steps"]
    assert run.end_lr == pytest.approx(p["--end_lr_ratio"] * p["--lr"])
    assert (run.momentum, run.weight_decay, run.lars_eta, run.lars_epsilon) == (
        p["--mom"], p["--wd"], p["USE_FJSGD_LARC_ETA"], p["lars_epsilon"])
    assert run.crop_scale == (p["--min-random-area"], p["--max-random-area"])
    assert run.crop_ratio == (p["--min-random-aspect-ratio"], p["--max-random-aspect-ratio"])
    # `epoch < no_augument_epoch` with 0-based epochs: 1-based epochs 86..90 train on the val transform
    assert [e + 1 for e in range(90) if not run.augments(e)] == list(range(p["--no_augument_epoch"] + 1, 91))
    assert (run.label_smoothing, run.target_top1, run.stop_at_target) == (p["--smooth_alpha"],
                                                                          p["--accuracy-threshold"], True)
    assert (run.eval_every_epochs, run.eval_offset) == (p["--eval-period"], p["--eval-offset"])
    assert resolved.eval_epochs == list(range(2, 91, 4))  # fit.py: (epoch - offset) % period == 0, 0-based
    assert run.zero_init_residual is bool(p["USE_ZERO_GAMMA_INIT"]) and run.precision == "16-mixed"
    assert run.bn_span == 42 and run.bn_group_size == 1
    assert division(run) == p["MLPERF_SUBMISSION_DIVISION"]


def test_goyal_preset_equals_the_paper():
    # Goyal et al. 2017 (arXiv:1706.02677): kn = 8,192 on 256 GPUs, η = 0.1 · kn/256, 5 warmup epochs, 90 epochs,
    # momentum 0.9, weight decay 1e-4, zero-γ init of each block's last BN.
    run = preset("goyal-sgd-b8192").run
    assert (run.batch_size, run.world_size, run.optimizer) == (8192, 256, "sgd")
    assert run.lr == pytest.approx(0.1 * 8192 / 256)
    assert (run.warmup_epochs, run.epochs, run.momentum, run.weight_decay) == (5, 90, 0.9, 1e-4)
    assert run.zero_init_residual and run.label_smoothing == 0.0


def test_optimizers_of_nvidia_and_fujitsu_presets_are_theirs():
    """NVIDIA's presets decay the fc bias without LARS (fit.py set_wd_mult); Fujitsu's trust ratio
    divides by its unscheduled 6.5e-4 (fit.py 'wd': args.wd * args.lr; mxnet_op.h)."""
    import torchvision

    from flashnet.train.module import build_optimizer

    model = torchvision.models.resnet18()
    nvidia = build_optimizer(preset("mlperf-lars-b3264").run, model)
    decayed_bias = [g for g in nvidia.param_groups if not g["lars"] and g["weight_decay"] > 0]
    assert len(decayed_bias) == 1 and decayed_bias[0]["params"] == [model.fc.bias]
    assert all(g["trust_weight_decay"] is None for g in nvidia.param_groups)
    google = build_optimizer(preset("mlperf-lars-b32768").run, model)
    assert all(g["weight_decay"] == 0 for g in google.param_groups if not g["lars"])
    fujitsu = build_optimizer(preset("fujitsu-mlperf-v0.6").run, model)
    assert {g["trust_weight_decay"] for g in fujitsu.param_groups} == {0.00065}
    assert 0.0025 / 0.00065 == pytest.approx(3.85, abs=0.005)
# The RCP rows MLPerf's TF2 reference trained (Google's, "before 1.0"): its LARS keeps the LR inside the
# momentum buffer (mlcommons/training image_classification/tensorflow2/lars_optimizer.py).
TF_REFERENCE_ROWS = {4096, 8192, 32768, 65536}


@pytest.mark.parametrize("batch", sorted(RCP_RESNET_4_0_0))
def test_google_rows_use_the_tf_reference_momentum_form(batch):
    expected = "tf_reference" if batch in TF_REFERENCE_ROWS else "torch"
    assert preset(f"mlperf-lars-b{batch}").run.lars_momentum_form == expected
