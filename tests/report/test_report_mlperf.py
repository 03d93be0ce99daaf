"""MLPerf's time to train and the RCP comparison in the report, on fake runs at several batch sizes."""

from __future__ import annotations

import pytest

from flashnet.report.build import build_report
from flashnet.report.mlperf import COMPARABLE_ONLY, epochs_to_target, rcp_rows, rcp_table
from flashnet.report.runs import load_runs
from flashnet.report.summary import summary_csv_row, summary_table
from flashnet.resolve import IMAGENET_TRAIN_IMAGES


def imagenet_run(make_run, name: str, batch: int, epochs: float | None, **overrides):
    return make_run(name, batch_size=batch, devices_per_node=1, train_samples=IMAGENET_TRAIN_IMAGES,
                    mlperf={"epochs_to_target": epochs}, **overrides)


@pytest.fixture
def runs(make_run):
    return load_runs([
        imagenet_run(make_run, "b3264", 3264, 36.2),             # an RCP row
        imagenet_run(make_run, "b40000", 40000, 60.0),           # between rows 32,768 and 49,152
        imagenet_run(make_run, "b1024", 1024, 34.0),             # below the smallest row
        imagenet_run(make_run, "b86016", 86016, 90.0),           # above the largest: no RCP
        make_run("sample-b64", batch_size=64),                   # the sample data: not ImageNet-1k
        make_run("sgd-b32", batch_size=32, optimizer="sgd", lr=0.1, devices_per_node=1),  # not LARS: no row
    ])


def test_rcp_comparison_per_lars_run(runs):
    rows = {r["run"]: r for r in rcp_rows(runs)}
    assert list(rows) == ["b3264", "b40000", "b1024", "b86016", "sample-b64"]
    row_3264 = 457 / 13  # the 3,264 row: 528 epochs over 15 runs, less its 34 and its 37, over 13
    assert rows["b3264"]["rcp_mean_epochs"] == pytest.approx(row_3264) and rows["b3264"]["rcp_how"] == "row 3,264"
    assert rows["b3264"]["ratio"] == pytest.approx(36.2 / row_3264)
    between = 56 + 12 * (40000 - 32768) / (49152 - 32768)
    assert rows["b40000"]["rcp_mean_epochs"] == pytest.approx(between)
    assert rows["b40000"]["rcp_how"] == "interpolated between rows 32,768 and 49,152"
    assert rows["b1024"]["rcp_how"] == "below the smallest row: row 1,632"
    assert 34 < rows["b3264"]["rcp_min_epochs"] < rows["b3264"]["rcp_mean_epochs"]  # the checker's t-test bound
    assert rows["b86016"]["rcp_mean_epochs"] is None and rows["b86016"]["ratio"] is None
    assert rows["b86016"]["rcp_how"] == "missing: above the largest row (67,840)"
    assert rows["b3264"]["data"] == "ImageNet-1k" and rows["sample-b64"]["data"] == "1,000 images: not comparable"
    assert rows["sample-b64"]["rcp_mean_epochs"] is not None and rows["sample-b64"]["ratio"] is None  # not ImageNet-1k


def test_rcp_table_cells(runs):
    table = rcp_table(runs)
    assert table.column("Epochs to target")[:2] == ["36.20", "60.00"]
    assert table.column("RCP mean epochs")[3] == "–" and table.column("Ratio")[3] == "–"
    assert table.column("Ratio")[1] == f"{60 / (56 + 12 * 7232 / 16384):.2f}"


def test_epochs_to_target_from_steps_when_the_log_has_none(make_run):
    """A summary without MLPerf figures: epochs to target × steps per epoch × batch / train images."""
    [run] = load_runs([make_run("old", batch_size=64, mlperf={})])
    steps_per_epoch = run.summary["steps_per_epoch"]
    assert epochs_to_target(run) == pytest.approx(run.summary["epochs_to_target"] * steps_per_epoch * 64 / 1000)
    assert summary_table([run]).column("MLPerf time to train") == ["–"]


def test_time_to_train_in_the_summary(make_run):
    runs = load_runs([make_run("ok", mlperf={"time_to_train_s": 61.5}),
                      make_run("resumed", mlperf={"time_to_train_s": 70.0, "valid": False, "resumes": 1}),
                      make_run("missed", target_top1=0.99)])
    assert summary_table(runs).column("MLPerf time to train") == ["61.5 s", "70 s (not valid: resumed)",
                                                                  "not reached"]
    ok, resumed, missed = (summary_csv_row(run) for run in runs)
    assert (ok["mlperf_time_to_train_s"], ok["mlperf_valid"], ok["mlperf_division"]) == (61.5, True, "open")
    assert resumed["mlperf_valid"] is False and missed["mlperf_time_to_train_s"] is None


def test_division_in_the_recipe_table(make_run):
    from flashnet.report.summary import recipe_table

    runs = load_runs([make_run("open"), make_run("closed", mlperf={"division": "closed"}),
                      make_run("forced", mlperf={"division": "closed", "closed_rules_broken": ["model: x", "lr: y"]}),
                      make_run("old", mlperf={})])
    assert recipe_table(runs).column("MLPerf division") == ["open", "closed", "closed (forced; breaks 2 closed rules)",
                                                            "–"]


def test_report_files_show_both(runs, tmp_path, settings):
    files = build_report([run.folder for run in runs], settings, tmp_path / "report")
    markdown, html = files["summary.md"].read_text(), files["report.html"].read_text()
    for text in (markdown, html):
        assert COMPARABLE_ONLY in text and "MLPerf time to train" in text
        assert "interpolated between rows 32,768 and 49,152" in text
    assert "mlperf_time_to_train_s" in files["summary.csv"].read_text().splitlines()[0]
