"""The summary table, its number formats, the published references and summary.md."""

from __future__ import annotations

import json

import csv
import datetime

import numpy as np
import pytest

from flashnet.report import projection as proj
from flashnet.report.references import FUJITSU, REFERENCES, reference, reference_csv_rows
from flashnet.report.runs import load_runs
from flashnet.report.summary import (recipe_table, references_table, software_table, summary_csv_row,
                                     summary_markdown, summary_table, timing_table)
from flashnet.report.tables import (Table, format_count, format_duration, format_percent, format_published_duration,
                                    format_published_percent, format_rate, format_time_to_target, markdown_table)

# The fake run's defaults (conftest.make_run): 1,000 images per epoch at 40 images/s is 25 s an epoch,
# 37.5 s for the slower first; the curve first reaches the 70% target after epoch 11.
TIME_TO_TARGET_S = 37.5 + 10 * 25.0  # 287.5
TRAIN_S = 37.5 + 15 * 25.0  # 412.5


@pytest.mark.parametrize("seconds, text", [
    (0.0, "0 s"), (10.96, "10.96 s"), (74.7, "74.7 s"), (119.994, "119.99 s"), (120.0, "2 min 00 s"),
    (224.0, "3 min 44 s"), (287.5, "4 min 48 s"), (3599.4, "59 min 59 s"), (3600.0, "1 h"), (3900.0, "1 h 05 min"),
    (29 * 3600 + 59 * 60 + 40, "30 h"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_duration_refuses_negative_durations():
    with pytest.raises(ValueError):
        format_duration(-1.0)


@pytest.mark.parametrize("unknown", [None, float("nan"), float("inf")])
def test_format_duration_says_unknown(unknown):
    assert format_duration(unknown) == "?"


@pytest.mark.parametrize("seconds, epochs, text", [
    (None, None, "not reached"), (None, 3.0, "not reached"), (float("nan"), None, "not reached"),
    (287.5, 11.0, "4 min 48 s (epoch 11)"), (74.7, None, "74.7 s"), (3600.0, 2.5, "1 h (epoch 2.5)"),
])
def test_time_to_target_formatting(seconds, epochs, text):
    assert format_time_to_target(seconds, epochs) == text


def test_number_formats():
    assert format_percent(0.74404) == "74.40%"
    assert format_percent(0.7, 1) == "70.0%"
    assert [format_published_percent(r.top1) for r in REFERENCES] == ["76.3%", "75.03%", "75.08%", "75.9%"]
    assert [format_published_duration(r.time_s) for r in REFERENCES] == ["1 h", "224 s", "74.7 s", "10.96 s"]
    assert format_count(81920) == "81,920" and format_count(16.0) == "16" and format_count(15.5) == "15.5"
    assert format_rate(38.7878) == "38.8" and format_rate(10666.67) == "10,667"


def test_markdown_table_aligns_numbers_and_escapes_pipes():
    table = Table(headers=("name", "value"), rows=(("a|b", "1"),), numeric=(False, True))
    assert markdown_table(table) == "| name | value |\n|---|---:|\n| a\\|b | 1 |\n"


def test_summary_row_takes_accuracy_from_eval_and_the_rest_from_summary(make_run):
    folder = make_run("lars-b64", eval_top1=0.7312, eval_top5=0.9155)
    [run] = load_runs([folder])
    row = summary_csv_row(run)
    assert row["final_top1"] == 0.7312 and row["final_top5"] == 0.9155  # eval.json, not summary.json's 0.74
    assert run.summary["final_top1"] == 0.74
    assert row["global_batch"] == 64 and row["world_size"] == 2 and row["nodes"] == 1
    assert row["time_to_target_s"] == TIME_TO_TARGET_S and row["epochs_to_target"] == 11.0
    assert row["train_seconds"] == TRAIN_S
    assert row["images_per_s"] == 38.788 and row["images_per_s_per_device"] == 19.394  # 16,000 images / 412.5 s
    assert row["eval_samples"] == 300

    table = summary_table([run])
    assert table.rows == (("lars-b64", "73.12%", "91.55%", "70.0%", "4 min 48 s (epoch 11)", "4 min 50 s",
                           "6 min 52 s", "38.8", "19.4"),)
    assert recipe_table([run]).rows == (("lars-b64", "resnet18", "64", "LARS", "32-true", "1 × 2",
                                         "AMD EPYC 7B13 (2 cores)", "16", "open"),)
    assert software_table([run]).column("torch") == ["2.14.1"]
    assert software_table([run]).column("Git revision") == ["0123456789ab"]


def test_the_train_time_is_split_into_steps_validation_checkpoints_and_startup(make_run):
    [run] = load_runs([make_run("lars-b64")])  # 412.5 s: 16 validations of 2 s, 16 checkpoints of 0.5 s (conftest)
    row = summary_csv_row(run)
    assert (row["step_seconds"], row["validation_seconds"], row["checkpoint_seconds"], row["startup_seconds"]) == \
        (360.0, 32.0, 8.0, 12.5)
    assert (row["validations"], row["checkpoints"], row["job_segments"]) == (16, 16, 1)
    table = timing_table([run])
    assert table.headers == ("Run", "Train time", "Training steps", "Validation", "Checkpoint writes", "Start-up")
    assert table.rows == (("lars-b64", "6 min 52 s", "6 min 00 s (87%)", "32 s (8%; 16 × 2 s)",
                           "8 s (2%; 16 × 0.5 s)", "12.5 s (3%; 1 job)"),)


def test_a_run_trained_before_phases_were_timed_says_not_measured(make_run):
    [run] = load_runs([make_run("old", timed_phases=False)])
    assert len(run.metrics["validation_s"]) == 16 and np.isnan(run.metrics["validation_s"]).all()
    assert summary_csv_row(run)["validation_seconds"] is None
    assert timing_table([run]).rows == (("old", "6 min 52 s", *["not measured"] * 4),)


def test_a_run_that_stopped_at_its_target_says_so(make_run):
    folder = make_run("lars-b64")
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "stopped_at_target": True, "stopped_at_epoch": 11}))
    [run] = load_runs([folder])
    assert summary_csv_row(run)["stopped_at_target"] == 11
    assert recipe_table([run]).column("Epochs") == ["11 of 16 (stopped at target)"]


def test_run_that_missed_its_target_says_not_reached(make_run):
    [run] = load_runs([make_run("sgd-b32", optimizer="sgd", final_top1=0.62)])
    assert summary_csv_row(run)["time_to_target_s"] is None
    assert summary_table([run]).column("Time to target") == ["not reached"]


def test_references_have_the_published_figures():
    assert [(r.name, r.devices, r.batch_size, r.time_s, r.top1) for r in REFERENCES] == [
        ("Goyal et al. 2017", 256, 8_192, 3600.0, 0.763),
        ("Sony 2018", 2_176, None, 224.0, 0.7503),
        ("Fujitsu 2019", 2_048, 81_920, 74.7, 0.7508),
        ("MLPerf Training v3.0", 3_584, None, 10.96, 0.759),
    ]
    assert reference("Fujitsu 2019") is FUJITSU
    assert all(r.citation and r.url.startswith("https://") for r in REFERENCES)
    assert [r.top1_is_target for r in REFERENCES] == [False, False, False, True]
    rows = reference_csv_rows()
    assert {row["source"] for row in rows} == {"published, not measured here"}
    assert rows[1]["batch_size"] == ""  # Sony: no single batch size, left empty rather than guessed
    assert references_table().column("Top-1") == ["76.3%", "75.03%", "75.08%", "75.9% target"]


def test_summary_markdown_has_every_part(make_run, settings):
    runs = load_runs([make_run("lars-b64"), make_run("sgd-b32", optimizer="sgd", final_top1=0.62)])
    projection_settings = proj.ProjectionSettings.from_dict(settings)
    projections = [proj.project_run(run, projection_settings) for run in runs]
    text = summary_markdown(runs, projections, projection_settings,
                            datetime.datetime(2025, 3, 1, 12, 30, tzinfo=datetime.timezone.utc))
    assert text.startswith("# flashnet report\n")
    assert "Generated 2025-03-01 12:30 UTC from 2 run(s)" in text
    assert "## Published reference points (published, not measured here)" in text
    assert "## Projection (an estimate, not a measurement)" in text
    assert "| lars-b64 | 74.40% |" in text and "not reached" in text
    assert "### Where the training time went\n" in text and "| lars-b64 | 6 min 52 s | 6 min 00 s (87%) |" in text
    for ref in REFERENCES:
        assert ref.name in text and ref.citation in text
    for name in ("accuracy_vs_epoch", "accuracy_vs_time", "accuracy_vs_batch", "throughput", "lr_schedule"):
        assert f"({name}.png)" in text
    assert "No overlap of compute and communication" in text
    assert "Fujitsu's 74.7 s" in text


def test_summary_csv_round_trip(make_run, settings, tmp_path):
    from flashnet.report.build import build_report

    folder = make_run("lars-b64", eval_top1=0.7312)
    files = build_report([folder], settings, tmp_path / "report")
    with files["summary.csv"].open() as f:
        [row] = list(csv.DictReader(f))
    assert row["run"] == "lars-b64" and row["final_top1"] == "0.7312" and row["global_batch"] == "64"
    assert float(row["time_to_target_s"]) == TIME_TO_TARGET_S and row["precision"] == "32-true"
    assert float(row["step_seconds"]) == 360.0 and row["checkpoints"] == "16"


def test_a_reference_file_with_an_unknown_key_names_the_file(tmp_path):
    from flashnet.report.references import load_references

    path = tmp_path / "references.yaml"
    path.write_text("- {name: X, authors: Y, devices: 1, device_name: Z, batch_size: null, time_s: 1.0, top1: 0.5,\n"
                    "   top1_is_target: false, citation: C, url: U, speedup: 2}\n")
    with pytest.raises(ValueError, match=r"references\.yaml: .*speedup"):
        load_references(path)
