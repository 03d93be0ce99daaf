"""Tests of flashnet.bench.gpu_throughput: the smoke run on the CPU goes through every configuration's
code path (reference loop, the module by hand and through Trainer.fit, CPU and device decoding from
generated shards); the choices, goals and table built from its rows."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from flashnet.bench import gpu_throughput as bench

# What every configuration must produce: the reference and the data-only configurations one row
# (a hand-written loop), the project's module two (by hand, and through Trainer.fit).
EXPECTED_ROWS = {
    (config.id, loop)
    for config in bench.CONFIGS.values()
    for loop in {"reference": ["manual"], "loader": ["loader"], "project": ["manual", "fit"]}[config.kind]
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of every configuration (about 30 s on a 2-core CPU): exit code, JSON, table."""
    out = tmp_path_factory.mktemp("gpu-bench") / "results.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = bench.main(["--smoke", "--configs", "all", "--out", str(out)])
    return code, json.loads(out.read_text()), printed.getvalue()


# --------------------------------------------------------------------------- the smoke run


def test_smoke_run_succeeds_with_a_row_for_every_configuration_and_loop(smoke):
    code, report, _ = smoke
    assert code == 0
    assert {(row["config"], row["loop"]) for row in report["results"]} == EXPECTED_ROWS
    failed = [(row["config"], row["loop"], row.get("error")) for row in report["results"] if row["status"] != "ok"]
    assert failed == []


def test_smoke_rows_hold_positive_consistent_numbers(smoke):
    _, report, _ = smoke
    batch = report["scale"]["batch_size"]
    for row in report["results"]:
        where = (row["config"], row["loop"])
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0, where
        assert row["images_per_s"] == pytest.approx(row["steps"] * batch / row["seconds"]), where
        assert row["ms_per_step"] == pytest.approx(row["seconds"] * 1e3 / row["steps"]), where
        if row["loop"] == "loader":
            assert row["tflops"] is None, where
            continue
        assert row["tflops"] == pytest.approx(row["images_per_s"] * report["flop_per_image"] / 1e12), where
        assert row["fraction_of_matmul"] == pytest.approx(row["tflops"] / report["matmul_tflops"]), where
        assert row["loss_finite"] is True, where
        if row["loop"] == "manual":
            # the optimizer is part of the step, never all of it
            assert 0 < row["optimizer_share"] < 1, where


def test_smoke_runs_the_tiny_model_on_the_cpu_and_says_its_numbers_are_not_figures(smoke):
    _, report, table = smoke
    assert report["smoke"] is True
    assert report["machine"]["device"] == "cpu"
    assert report["scale"] == {"model": "resnet18", "image_size": 32, "batch_size": 8, "steps": 2, "warmup": 1,
                               "matmul_size": 256, "num_classes": 10, "smoke": True}
    assert report["matmul_tflops_start"] > 0 and report["matmul_tflops_end"] > 0
    assert "NOT performance figures" in table.splitlines()[0]


def test_smoke_table_has_a_line_per_row_and_the_goals(smoke):
    _, report, table = smoke
    lines = table.splitlines()
    for row in report["results"]:
        assert any(line.split()[:2] == [row["config"], row["loop"]] for line in lines), (row["config"], row["loop"])
    assert "Lightning overhead" in table
    assert set(report["lightning_overhead"]) == {c.id for c in bench.CONFIGS.values() if c.kind == "project"}
    assert [goal["goal"].split(" (")[0] for goal in report["goals"]] == [
        "project step", "shards", "shards", "best end-to-end images/s"]


def test_smoke_pipeline_configurations_read_the_generated_shards(smoke):
    _, report, _ = smoke
    rows = {(row["config"], row["loop"]): row for row in report["results"]}
    assert rows[("3", "manual")]["settings"]["data"] == "shards-cpu"
    assert rows[("4", "fit")]["settings"]["data"] == "shards-gpu"
    # configurations 3 and 4 use the compile mode of the fastest compiled synthetic configuration
    assert rows[("3", "fit")]["settings"]["compile"] == bench.pipeline_compile_mode("auto", report["results"])


def test_data_configurations_time_enough_batches_to_outlast_the_prefetch_backlog():
    assert bench.data_steps(10, 50, 14) == (28, 140)
    assert bench.data_steps(40, 500, 14) == (40, 500)
    assert bench.data_steps(1, 2, 0) == (2, 10)  # no workers: the main process is one stream


# --------------------------------------------------------------------------- choices and goals


def test_configurations_run_in_a_fixed_order_and_unknown_ones_are_refused():
    assert [c.id for c in bench.select_configs("5,1,3,2")] == ["5", "1", "2", "3"]
    assert [c.id for c in bench.select_configs("all")] == list(bench.RUN_ORDER)
    with pytest.raises(ValueError, match="unknown configuration"):
        bench.select_configs("1,7")


def row(config, loop, rate, **settings):
    return {"config": config, "loop": loop, "status": "ok", "images_per_s": rate, "settings": settings}


def test_pipeline_compile_mode_is_the_fastest_compiled_synthetic_one_through_fit():
    rows = [row("2", "fit", 3800, compile="default"), row("2r", "fit", 3950, compile="reduce-overhead"),
            row("2r", "manual", 9999, compile="reduce-overhead"), row("2e", "fit", 9999, compile=None)]
    assert bench.pipeline_compile_mode("auto", rows) == "reduce-overhead"
    assert bench.pipeline_compile_mode("auto", rows[:1]) == "default"
    assert bench.pipeline_compile_mode("auto", []) == "default"  # what `compile: true` does
    assert bench.pipeline_compile_mode("none", rows) is None
    assert bench.pipeline_compile_mode("max-autotune-no-cudagraphs", rows) == "max-autotune-no-cudagraphs"


def test_goals_compare_the_right_rows():
    rows = [row("5", "manual", 2800), row("2", "fit", 3900, compile="default"),
            row("2r", "fit", 3700, compile="reduce-overhead"),
            row("3", "fit", 3744, compile="default"), row("4", "fit", 3000, compile="default"),
            {"config": "4", "loop": "manual", "status": "failed", "error": "x"}]
    goals = {goal["goal"]: goal for goal in bench.goal_summary(rows)}
    assert goals["project step (2, fit) / plain reference (5)"]["value"] == pytest.approx(3900 / 2800)
    assert goals["project step (2, fit) / plain reference (5)"]["met"] is True
    assert goals["shards (3, fit) / synthetic (2, fit)"]["value"] == pytest.approx(0.96)
    assert goals["shards (3, fit) / synthetic (2, fit)"]["met"] is True
    assert goals["shards (4, fit) / synthetic (2, fit)"]["met"] is False
    assert goals["best end-to-end images/s (3, fit)"]["value"] == 3744
    assert goals["best end-to-end images/s (3, fit)"]["met"] is False


def test_a_pipeline_that_fails_through_fit_is_judged_by_its_hand_written_loop():
    rows = [row("2", "fit", 3900, compile="default"), row("2", "manual", 4000, compile="default"),
            {"config": "4", "loop": "fit", "status": "failed", "error": "ValueError"},
            row("4", "manual", 3800, compile="default")]
    goals = {goal["goal"]: goal for goal in bench.goal_summary(rows)}
    assert goals["shards (4, manual) / synthetic (2, manual)"]["value"] == pytest.approx(0.95)
    assert goals["shards (4, manual) / synthetic (2, manual)"]["met"] is True
    assert goals["best end-to-end images/s (4, manual)"]["value"] == 3800


def test_lightning_overhead_is_the_rate_lost_through_fit():
    rows = [row("2", "manual", 4000), row("2", "fit", 3800), row("1", "manual", 1600)]
    assert bench.lightning_overhead(rows) == {"2": pytest.approx(0.05)}


def test_empty_cells_keep_the_column_width():
    assert bench._number(None, "8.1f") == "       -"
    assert bench._number(0.125, "8.1f", 100) == "    12.5"
    assert bench._number(3, "6d") == "     3"


# --------------------------------------------------------------------------- without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_and_without_smoke_it_explains_and_exits_2(capsys):
    assert bench.main(["--configs", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_make_shards_needs_a_place_to_write_them(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--make-shards", "10"])
    assert "--make-shards needs --shards" in capsys.readouterr().err
