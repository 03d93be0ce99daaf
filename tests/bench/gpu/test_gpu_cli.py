"""Tests of flashnet.bench.gpu.cli: the smoke run on the CPU goes through every configuration's code
path (reference loop, the module by hand and through Trainer.fit, CPU and device decoding from
generated shards) and writes its JSON; without a GPU and without --smoke it explains and stops."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flashnet.bench.gpu import cli
from flashnet.bench.gpu.configs import CONFIGS

# What every configuration must produce: the reference and the data-only configurations one row
# (a hand-written loop), the project's module two (by hand, and through Trainer.fit).
EXPECTED_ROWS = {
    (config.id, loop)
    for config in CONFIGS.values()
    for loop in {"reference": ["manual"], "loader": ["loader"], "project": ["manual", "fit"]}[config.kind]
}


def test_smoke_run_succeeds_with_a_row_for_every_configuration_and_loop(smoke):
    code, report, _ = smoke
    assert code == 0
    assert {(row["config"], row["loop"]) for row in report["results"]} == EXPECTED_ROWS
    failed = [(row["config"], row["loop"], row.get("error")) for row in report["results"] if row["status"] != "ok"]
    assert failed == []


def test_smoke_runs_the_tiny_model_on_the_cpu_and_says_its_numbers_are_not_figures(smoke):
    _, report, table = smoke
    assert report["smoke"] is True
    assert report["machine"]["device"] == "cpu"
    assert report["scale"] == {"model": "resnet18", "image_size": 32, "batch_size": 8, "steps": 2, "warmup": 1,
                               "matmul_size": 256, "num_classes": 10, "smoke": True}
    assert report["matmul_tflops_start"] > 0 and report["matmul_tflops_end"] > 0
    assert "NOT performance figures" in table.splitlines()[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_and_without_smoke_it_explains_and_exits_2(capsys):
    assert cli.main(["--configs", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_make_shards_needs_a_place_to_write_them(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--smoke", "--make-shards", "10"])
    assert "--make-shards needs --shards" in capsys.readouterr().err


def test_help_runs_as_a_module_and_through_the_flashnet_command():
    for command in ([sys.executable, "-m", "flashnet.bench.gpu", "--help"],
                    [sys.executable, "-m", "flashnet", "bench", "gpu", "--help"]):
        shown = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        assert "ResNet-50 training throughput on one GPU" in shown and "--smoke" in shown, command
