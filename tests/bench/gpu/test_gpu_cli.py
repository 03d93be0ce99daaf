"""Tests of flashnet.bench.gpu.cli: the smoke run on the CPU goes through every configuration's code
path (reference loop, the module by hand and through Trainer.fit, CPU and device decoding from
generated shards) and writes its JSON; without a GPU and without --smoke it explains and stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flashnet.bench.gpu import cli
from flashnet.bench.gpu.configs import CONFIGS, DEFAULT_BATCH_SIZES, DEFAULT_CONFIGS, smoke_batch_size

# What every configuration must produce: the reference and the data-only configurations one row
# (a hand-written loop), the project's module two (by hand, and through Trainer.fit).
EXPECTED_ROWS = {
    (config.id, loop)
    for config in CONFIGS.values()
    for loop in {"reference": ["manual"], "loader": ["loader"], "project": ["manual", "fit"]}[config.kind]
}


def test_smoke_run_succeeds_with_a_row_for_every_configuration_and_loop(smoke):
    code, report, _, _ = smoke
    assert code == 0
    assert {(row["config"], row["loop"]) for row in report["results"]} == EXPECTED_ROWS
    assert {row["batch_size"] for row in report["results"]} == {2}
    assert report["complete"] is True
    assert [tuple(row) for row in report["planned"]] == [(r["config"], r["batch_size"], r["loop"])
                                                         for r in report["results"]]
    failed = [(row["config"], row["loop"], row.get("error")) for row in report["results"] if row["status"] != "ok"]
    assert failed == []


def test_smoke_runs_the_tiny_model_on_the_cpu_and_says_its_numbers_are_not_figures(smoke):
    _, report, table, _ = smoke
    assert report["smoke"] is True
    assert report["machine"]["device"] == "cpu"
    assert report["scale"] == {"model": "resnet18", "image_size": 32, "batch_size": 2, "steps": 2, "warmup": 1,
                               "matmul_size": 256, "num_classes": 10, "smoke": True}
    assert report["batch_sizes"] == [2] and report["batch_sizes_asked"] == [32]
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


def test_the_dry_run_plans_every_row_the_gpu_run_would_measure():
    """Same configurations and loops, each GPU batch size by its sixteenth: what the e2e dry run runs."""
    gpu = cli.parse_args([])
    dry = cli.parse_args(["--smoke"])
    assert gpu.batch_sizes == DEFAULT_BATCH_SIZES == (32, 64, 128, 256)
    assert [c.id for c in cli.select_configs(gpu.configs)] == list(DEFAULT_CONFIGS)
    gpu_rows = cli.planned_rows(cli.select_configs(gpu.configs), gpu.batch_sizes)
    dry_rows = cli.planned_rows(cli.select_configs(dry.configs), [smoke_batch_size(b) for b in dry.batch_sizes])
    assert [(c, smoke_batch_size(b), loop) for c, b, loop in gpu_rows] == dry_rows
    assert len(gpu_rows) == 4 * 16  # per batch: 5, 5c, 3d, 4d one row; 1, 2e, 2, 2h, 3, 4 two


@pytest.mark.e2e
def test_dry_run_measures_every_configuration_at_every_batch_size(tmp_path):
    """The CPU dry run of the default GPU run: every row it plans comes back measured (minutes on 2 cores)."""
    out = tmp_path / "out"
    assert cli.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads((out / "gpu.json").read_text())
    measured = [(r["config"], r["batch_size"], r["loop"]) for r in report["results"] if r["status"] == "ok"]
    assert measured == [tuple(row) for row in report["planned"]]
    assert {b for _, b, _ in measured} == {2, 4, 8, 16}
    assert {r["settings"]["page_cache"] for r in report["results"] if r["config"] in ("3d", "3", "4d", "4")} <= {
        "asked (posix_fadvise DONTNEED per shard; drop_caches not used)"}


def test_markdown_table_has_a_row_per_result_and_says_where_it_ran(smoke):
    _, report, _, markdown = smoke
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith(("| cfg", "| ---"))]
    assert len(rows) == len(report["results"])
    assert rows[0].split(" | ")[:3] == ["| 5", "2", "manual"]
    assert "SMOKE RUN" in markdown and report["machine"]["date"] in markdown
    assert "partial" not in markdown


def test_a_spent_time_budget_writes_the_remaining_rows_as_skipped(tmp_path, capsys):
    assert cli.main(["--smoke", "--configs", "5,1", "--batch-sizes", "32", "--time-budget", "0",
                     "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["config"], r["loop"], r["status"]) for r in report["results"]] == [
        ("5", "manual", "skipped"), ("1", "manual", "skipped"), ("1", "fit", "skipped")]
    assert "time budget of 0.0 s spent" in (tmp_path / "gpu.md").read_text()


def test_out_defaults_to_the_device_machines_OUT_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert cli.output_paths(cli.parse_args([]).out) == (tmp_path / "gpu.json", tmp_path / "gpu.md")
    assert cli.output_paths(tmp_path / "r.json") == (tmp_path / "r.json", tmp_path / "r.md")


def test_the_run_leaves_no_process_group_or_address_behind(smoke):
    """The fit loops' DDP group (world size 1) ends with the run: nothing in this process or its
    children finds its port taken afterwards."""
    assert not torch.distributed.is_initialized()
    assert "MASTER_PORT" not in os.environ
