"""Tests of flashnet.bench.gpu.runners: the rows each configuration's run produces (from the shared
smoke run), and the compile mode the shard pipelines borrow from the synthetic ones."""

from __future__ import annotations

import pytest

from flashnet.bench.gpu.runners import pipeline_compile_mode


def row(config, loop, rate, **settings):
    """A measured row as the runners write it, with only what the goals and choices read."""
    return {"config": config, "loop": loop, "status": "ok", "images_per_s": rate, "settings": settings}


def test_smoke_rows_hold_positive_consistent_numbers(smoke):
    _, report, _, _ = smoke
    batch = report["scale"]["batch_size"]
    for result in report["results"]:
        where = (result["config"], result["loop"])
        assert result["images_per_s"] > 0 and result["ms_per_step"] > 0, where
        assert result["images_per_s"] == pytest.approx(result["steps"] * batch / result["seconds"]), where
        assert result["ms_per_step"] == pytest.approx(result["seconds"] * 1e3 / result["steps"]), where
        if result["loop"] == "loader":
            assert result["tflops"] is None, where
            continue
        assert result["tflops"] == pytest.approx(result["images_per_s"] * report["flop_per_image"] / 1e12), where
        assert result["fraction_of_matmul"] == pytest.approx(result["tflops"] / report["matmul_tflops"]), where
        assert result["loss_finite"] is True, where
        if result["loop"] == "manual":
            # the optimizer is part of the step, never all of it
            assert 0 < result["optimizer_share"] < 1, where


def test_smoke_pipeline_configurations_read_the_generated_shards(smoke):
    _, report, _, _ = smoke
    rows = {(result["config"], result["loop"]): result for result in report["results"]}
    assert rows[("3", "manual")]["settings"]["data"] == "shards-cpu"
    assert rows[("4", "fit")]["settings"]["data"] == "shards-gpu"
    # configurations 3 and 4 compile as `compile: true` does (--pipeline-compile-mode default)
    assert rows[("3", "fit")]["settings"]["compile"] == "default"
    assert rows[("4", "fit")]["settings"]["strategy"] == "ddp (1 process, gloo)"
    assert rows[("3", "fit")]["settings"]["page_cache"].startswith("asked (posix_fadvise")


def test_pipeline_compile_mode_is_the_fastest_compiled_synthetic_one_through_fit():
    rows = [row("2", "fit", 3800, compile="default"), row("2r", "fit", 3950, compile="reduce-overhead"),
            row("2r", "manual", 9999, compile="reduce-overhead"), row("2e", "fit", 9999, compile=None)]
    assert pipeline_compile_mode("auto", rows) == "reduce-overhead"
    assert pipeline_compile_mode("auto", rows[:1]) == "default"
    assert pipeline_compile_mode("auto", []) == "default"  # what `compile: true` does
    assert pipeline_compile_mode("none", rows) is None
    assert pipeline_compile_mode("max-autotune-no-cudagraphs", rows) == "max-autotune-no-cudagraphs"
