"""flashnet recipe: what a person reads before spending GPU-hours, through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashnet import resolve


def recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashnet.cli", "recipe", *args], capture_output=True, text=True)


def test_a_preset_is_shown_with_its_steps_schedule_and_division():
    out = recipe("mlperf-lars-b32768")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "mlperf-lars-b32768  (preset)" in text
    assert "32,768 = 32 node(s) × 8 device(s) × 128 per device" in text
    assert "39 = floor(1,281,167 / 32,768)" in text
    assert "16 epochs = 624 steps, linear to lr 21.2" in text
    assert "2,267 steps, power 2; reaches end_lr 0.0001 at step 2,891" in text
    # the first validated epoch (offset 3: 4, 8, ..., 76) at or past the LR horizon, as the TF2 reference rounds
    assert "at most 76 epochs = 2,964 steps; stops at the first validation ≥ 75.9% top-1" in text
    assert "(every 4, offset 3); after steps 156, 312," in text and text.count("2,964") >= 2
    assert "closed (meets the closed ResNet-50 rules" in text


def test_an_nvidia_preset_counts_its_epochs_as_nvidias_fit_py():
    text = recipe("mlperf-lars-b67840").stdout
    assert "19 = ceil(floor(1,281,167 / 160 ranks) / 424) (ceil_per_rank): 1,288,960 samples" in text
    assert "31 epochs = 589 steps" in text and "at most 94 epochs = 1,786 steps" in text


def test_a_run_of_the_configuration_says_which_closed_rules_it_breaks():
    text = recipe("default").stdout
    assert "default  (run of the configuration)" in text and "open; the closed rules it breaks:" in text
    assert "- model: resnet18 (closed: resnet50)" in text
    assert "- eval_every_epochs: 1 (closed: every 4 epochs, offset 0-3)" in text


def test_configfiles_merge_over_the_default_and_a_manifest_sets_the_sample_count(tmp_path):
    (tmp_path / "mine.yaml").write_text("runs:\n  big:\n    preset: mlperf-lars-b3264\n    nodes: 4\n"
                                        "  default:\n    epochs: 2\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"samples": 100_000}))
    text = recipe("big", "--configfile", str(tmp_path / "mine.yaml"), "--manifest", str(tmp_path / "manifest.json")).stdout
    assert "100,000" in text and "3,264 = 4 node(s) × 8 device(s) × 102 per device" in text
    assert "31 = ceil(floor(100,000 / 32 ranks) / 102) (ceil_per_rank)" in text  # the preset's NVIDIA counting
    # the preset's BN span (204) is two devices of 102 now: synchronised
    assert "204 samples = 2 device(s) × 102 (SyncBatchNorm)" in text
    default = recipe("default", "--configfile", str(tmp_path / "mine.yaml")).stdout
    assert "at most 2 epochs" in default and "resnet18 at 48 px" in default  # merged key by key


@pytest.mark.parametrize("args, message", [
    (["nope"], "nope: neither a run of the configuration (default) nor a preset (fujitsu-mlperf-v0.6"),
    (["default", "--manifest", "missing.json"], "missing.json: not a shard manifest"),
])
def test_bad_names_and_files_are_one_line_errors(args, message):
    out = recipe(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_bad_run_in_a_configfile_names_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("runs:\n  x:\n    lars_epsilon: -1\n")
    out = recipe("x", "--configfile", str(tmp_path / "bad.yaml"))
    assert out.returncode == 2 and "runs.x.lars_epsilon: -1 is less than the minimum of 0" in out.stderr


def test_a_configfile_that_is_not_yaml_is_named(tmp_path):
    (tmp_path / "broken.yaml").write_text("runs: [unclosed\n")
    out = recipe("x", "--configfile", str(tmp_path / "broken.yaml"))
    assert out.returncode == 2 and "broken.yaml: cannot read it" in out.stderr


def test_a_horizon_longer_than_the_run_is_said_plainly():
    run, _ = resolve.resolve_run("mlperf-lars-b32768", [])
    text = resolve.describe(resolve.Resolved.of(run.replace(epochs=60), resolve.IMAGENET_TRAIN_IMAGES),
                            "cut", "run", "ImageNet")
    assert "the horizon of 2,891 steps outlasts the run's 2,340" in text


def test_a_run_of_the_configuration_uses_its_own_manifest_once_written(tmp_path):
    (tmp_path / "shards" / "train").mkdir(parents=True)
    (tmp_path / "shards" / "train" / "manifest.json").write_text(json.dumps({"samples": 1003}))
    (tmp_path / "mine.yaml").write_text(f"results_dir: {tmp_path}\n")
    text = recipe("default", "--configfile", str(tmp_path / "mine.yaml")).stdout
    assert f"1,003 ({tmp_path}/shards/train/manifest.json)" in text and "15 = floor(1,003 / 64)" in text
    assert "warmup           1 epoch = 15 steps" in text
