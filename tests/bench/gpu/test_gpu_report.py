"""Tests of flashnet.bench.gpu.report: the goals and Lightning's overhead computed from the right rows,
and the table (from the shared smoke run)."""

from __future__ import annotations

import pytest

from flashnet.bench.gpu.configs import CONFIGS
from flashnet.bench.gpu.report import _number, goal_summary, lightning_overhead


def row(config, loop, rate, **settings):
    """A measured row as the runners write it, with only what the goals and choices read."""
    return {"config": config, "loop": loop, "status": "ok", "images_per_s": rate, "settings": settings}


def test_smoke_table_has_a_line_per_row_and_the_goals(smoke):
    _, report, table, _ = smoke
    lines = table.splitlines()
    for result in report["results"]:
        assert any(line.split()[:3] == [result["config"], "2", result["loop"]] for line in lines), (result["config"],
                                                                                                    result["loop"])
    assert "batch 2: Lightning overhead" in table
    assert set(report["lightning_overhead"]["2"]) == {c.id for c in CONFIGS.values() if c.kind == "project"}
    assert {goal["batch_size"] for goal in report["goals"]} == {2}
    assert [goal["goal"].split(" (")[0] for goal in report["goals"]] == [
        "project step", "shards", "shards", "best end-to-end images/s"]


def test_goals_compare_the_right_rows():
    rows = [row("5", "manual", 2800), row("2", "fit", 3900, compile="default"),
            row("2r", "fit", 3700, compile="reduce-overhead"),
            row("3", "fit", 3744, compile="default"), row("4", "fit", 3000, compile="default"),
            {"config": "4", "loop": "manual", "status": "failed", "error": "x"}]
    goals = {goal["goal"]: goal for goal in goal_summary(rows)}
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
    goals = {goal["goal"]: goal for goal in goal_summary(rows)}
    assert goals["shards (4, manual) / synthetic (2, manual)"]["value"] == pytest.approx(0.95)
    assert goals["shards (4, manual) / synthetic (2, manual)"]["met"] is True
    assert goals["best end-to-end images/s (4, manual)"]["value"] == 3800


def test_lightning_overhead_is_the_rate_lost_through_fit():
    rows = [row("2", "manual", 4000), row("2", "fit", 3800), row("1", "manual", 1600)]
    assert lightning_overhead(rows) == {"2": pytest.approx(0.05)}


def test_empty_cells_keep_the_column_width():
    assert _number(None, "8.1f") == "       -"
    assert _number(0.125, "8.1f", 100) == "    12.5"
    assert _number(3, "6d") == "     3"
