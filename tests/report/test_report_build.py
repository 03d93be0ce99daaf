"""The whole report stage: the files it writes, all-or-nothing publishing, the page and the captions."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
from PIL import Image

from flashnet import cli, pipeline
from flashnet.data.sources import DataError
from flashnet.report import build, plots
from flashnet.report.html import SECTIONS

REPO = Path(__file__).resolve().parents[2]
EXPECTED_FILES = {"summary.md", "summary.csv", "references.csv", "projection.csv", "accuracy_vs_epoch.png",
                  "accuracy_vs_time.png", "accuracy_vs_batch.png", "throughput.png", "lr_schedule.png",
                  "report.html"}


@pytest.fixture
def two_runs(make_run):
    return [make_run("lars-b64"),
            make_run("h100-b1024", model="resnet50", batch_size=1024, devices_per_node=4, accelerator="gpu",
                     device_name="NVIDIA H100 80GB HBM3", precision="bf16-mixed", images_per_s=11000.0,
                     target_top1=0.759, final_top1=0.765)]


def test_writes_exactly_the_report_files(two_runs, settings, tmp_path):
    out_dir = tmp_path / "results" / "report"
    files = build.build_report(two_runs, settings, out_dir)
    assert set(files) == EXPECTED_FILES
    assert {path.name for path in out_dir.iterdir()} == EXPECTED_FILES  # no staging folder left behind
    for name in EXPECTED_FILES:
        assert (out_dir / name).stat().st_size > 0
    for name in plots.FIGURE_WRITERS:
        with Image.open(out_dir / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == (990, 594)  # 9 × 5.4 in at 110 dpi


def test_report_from_cli(two_runs, settings, tmp_path, capsys):
    out_dir = tmp_path / "report"
    status = cli.main(["report", "--runs", *map(str, two_runs), "--settings", json.dumps(settings),
                       "--out-dir", str(out_dir)])
    assert status == 0
    assert "report of 2 run(s)" in capsys.readouterr().out
    assert {path.name for path in out_dir.iterdir()} == EXPECTED_FILES


def test_failure_while_writing_keeps_the_previous_report(two_runs, settings, tmp_path, monkeypatch):
    out_dir = tmp_path / "report"
    build.build_report(two_runs[:1], settings, out_dir)
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}

    def broken_plot(runs, path):
        raise RuntimeError("disk full")

    monkeypatch.setitem(plots.FIGURE_WRITERS, "lr_schedule", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        build.build_report(two_runs, settings, out_dir)
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


def test_page_is_self_contained(two_runs, settings, tmp_path):
    page = build.build_report(two_runs, settings, tmp_path / "report")["report.html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "<link" not in page and "@import" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 5 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "url(" not in page  # no CSS fetches either
    headings = re.findall(r"<h[12][^>]*>(.*?)</h[12]>", page)
    assert headings == ["flashnet report", *(heading for _, heading, _ in SECTIONS)]
    assert headings[1:] == ["Runs", "Accuracy", "Throughput", "Learning rate", "Published reference points",
                            "Projection"]
    assert "published, not measured here" in page and "estimate, not a measurement" in page
    assert "2.14.1" in page and "NVIDIA H100 80GB HBM3" in page  # versions and hardware from the summaries


def test_figures_match_the_workflow():
    assert list(plots.FIGURE_WRITERS) == list(pipeline.REPORT_FIGURES)
    assert list(plots.FIGURE_TITLES) == list(plots.FIGURE_WRITERS)


def test_every_report_output_has_a_short_caption():
    rule = (REPO / "workflow/rules/report.smk").read_text()
    captions = set(re.findall(r'caption="\.\./report/(\w+)\.rst"', rule))
    assert captions == {"summary", "references", "projection"}
    assert 'caption=f"../report/{name}.rst"' in rule
    for name in captions | set(pipeline.REPORT_FIGURES):
        lines = (REPO / "workflow/report" / f"{name}.rst").read_text().strip().splitlines()
        assert 1 <= len(lines) <= 4, name
    assert (REPO / "workflow/report/workflow.rst").read_text().strip()


def test_captions_render_with_the_config():
    """Snakemake renders captions as Jinja templates with ``snakemake.config``; they must render."""
    jinja2 = pytest.importorskip("jinja2")
    config = {"data_dir": "resources/sample-imagenet", "results_dir": "results",
              "report": {"projection_devices": 2048, "projection_epochs": 90, "link_gbps": 100, "link_latency_us": 5},
              "runs": {"lars-b256": {"model": "resnet18", "image_size": 48, "batch_size": 256, "optimizer": "lars",
                                     "lr": 2.0, "epochs": 10, "precision": "32-true", "nodes": 2,
                                     "devices_per_node": 1, "accelerator": "cpu"}}}
    snakemake = types.SimpleNamespace(config=config)
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    rendered = environment.from_string((REPO / "workflow/report/projection.rst").read_text()).render(
        snakemake=snakemake)
    assert "at 2048 devices" in rendered and "100 Gbit/s" in rendered
    rendered = environment.from_string((REPO / "workflow/report/workflow.rst").read_text()).render(
        snakemake=snakemake)
    assert "resources/sample-imagenet" in rendered
    # the runs table (tests/report/test_workflow_description.py renders it through docutils)
    assert "   * - ``lars-b256``\n     - resnet18\n     - 48 px\n     - 256\n     - lars\n     - 2.0\n" in rendered
    assert "     - 2 × 1\n     - cpu\n" in rendered


@pytest.mark.parametrize("values, wide", [([40.0, 53.0], False), ([40.0, 11000.0], True), ([0.0, 5.0], False)])
def test_wide_ranges_go_on_log_axes(values, wide):
    assert plots.spans_wide_range(values) is wide


@pytest.mark.parametrize("seconds, unit", [(90.0, (1.0, "s")), (412.5, (60.0, "min")), (9000.0, (3600.0, "h"))])
def test_time_axis_units(seconds, unit):
    assert plots.time_axis(seconds) == unit


def test_duration_tick_labels():
    assert [plots.short_duration(s) for s in (1, 30, 60, 300, 3600, 7200, 86400)] == \
           ["1 s", "30 s", "1 min", "5 min", "1 h", "2 h", "1 d"]


def test_a_run_shorter_than_its_log_interval_still_gets_a_report(two_runs, settings, tmp_path):
    """Issue 14: a smoke test of fewer steps than log_every_steps leaves steps.csv with its header
    only, and the report rule used to fail the whole workflow on it."""
    steps = two_runs[0] / "steps.csv"
    steps.write_text(steps.read_text().splitlines()[0] + "\n")
    out_dir = tmp_path / "report"
    assert set(build.build_report(two_runs, settings, out_dir)) == EXPECTED_FILES


def test_a_partial_report_covers_the_runs_that_finished_and_lists_the_others_with_why(two_runs, settings, tmp_path):
    """Issue 22, case 4: under --keep-going one failed run left every other run without a report."""
    runs_dir = two_runs[0].parent
    diverged = runs_dir / "lr-1e4"
    diverged.mkdir()
    (diverged / "failure.json").write_text(json.dumps({"kind": "diverged", "message": "loss 7e+07 at step 40, 100x the first steps' 2.3\n"
                                                       "(the last resume checkpoint is kept)"}))
    crashed = runs_dir / "crashed"
    crashed.mkdir()
    (crashed / "summary.json").write_text(json.dumps({"run": "crashed", "finished": False}))
    evaluation_failed = two_runs[0].parent / "no-eval"
    evaluation_failed.mkdir()
    for name in ("summary.json", "metrics.csv", "steps.csv"):
        (evaluation_failed / name).write_bytes((two_runs[0] / name).read_bytes())
    folders = [*two_runs, diverged, crashed, evaluation_failed]
    logs = tmp_path / "results" / "logs"
    with pytest.raises(DataError, match="lr-1e4/summary.json: missing"):
        build.build_report(folders, settings, tmp_path / "strict")  # without partial every run must be there
    files = build.build_report(folders, settings, tmp_path / "report", partial=True, logs_dir=logs)
    assert set(files) == EXPECTED_FILES
    markdown = files["summary.md"].read_text()
    assert "from 2 of 5 run(s)" in markdown
    assert "### Runs without results (3)" in markdown
    assert "| lr-1e4 | diverged: loss 7e+07 at step 40, 100x the first steps' 2.3 |" in markdown
    assert f"| crashed | failed (see {logs / 'train' / 'crashed.log'}) |" in markdown
    assert f"| no-eval | evaluation failed (see {logs / 'evaluate' / 'no-eval.log'}) |" in markdown
    table = (tmp_path / "report" / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == ["lars-b64", "h100-b1024"]
    page = files["report.html"].read_text()
    assert '<h3 id="unfinished">Runs without results (3)</h3>' in page and "diverged: loss 7e+07" in page
    assert "2 of 5 runs on" in page


def test_partial_report_from_the_command_line(two_runs, settings, tmp_path, capsys):
    failed = two_runs[0].parent / "failed"
    failed.mkdir()
    status = cli.main(["report", "--runs", *map(str, two_runs), str(failed), "--settings", json.dumps(settings),
                       "--out-dir", str(tmp_path / "report"), "--partial", "--logs-dir", "results/logs"])
    assert status == 0, capsys.readouterr().err
    assert "| failed | failed (see results/logs/train/failed.log) |" in (tmp_path / "report" / "summary.md").read_text()
