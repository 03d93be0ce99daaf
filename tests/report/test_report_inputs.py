"""Bad run folders are refused with a DataError naming the file and the problem, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashnet import cli
from flashnet.data.sources import DataError
from flashnet.report.build import build_report
from flashnet.report.runs import load_run, load_runs


def edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def test_good_run_loads(make_run):
    run = load_run(make_run("lars-b64"))
    assert run.name == "lars-b64"
    assert list(run.metrics["epoch"]) == list(range(1, 17))
    assert run.steps["step"][0] == 0 and run.steps["lr"].max() == pytest.approx(2.0, rel=0.01)
    assert run.evaluation["samples"] == 300


def test_summary_missing(make_run):
    folder = make_run("lars-b64")
    (folder / "summary.json").unlink()
    with pytest.raises(DataError, match=r"lars-b64/summary\.json: missing"):
        load_run(folder)


def test_training_did_not_finish(make_run):
    folder = make_run("lars-b64")
    edit_json(folder / "summary.json", finished=False)
    with pytest.raises(DataError, match=r"lars-b64/summary\.json: training did not finish"):
        load_run(folder)


def test_eval_missing(make_run):
    folder = make_run("lars-b64")
    (folder / "eval.json").unlink()
    with pytest.raises(DataError, match=r"lars-b64/eval\.json: missing"):
        load_run(folder)


def test_metrics_missing_columns(make_run):
    folder = make_run("lars-b64")
    path = folder / "metrics.csv"
    lines = path.read_text().splitlines()
    # Drop the val_top1 and val_top5 columns (5th and 6th).
    path.write_text("\n".join(",".join(line.split(",")[:4] + line.split(",")[6:]) for line in lines) + "\n")
    with pytest.raises(DataError, match=r"lars-b64/metrics\.csv: missing column\(s\) val_top1, val_top5"):
        load_run(folder)


def test_eval_saw_the_wrong_number_of_samples(make_run):
    folder = make_run("lars-b64")
    edit_json(folder / "eval.json", samples=290)
    with pytest.raises(DataError, match=r"lars-b64/eval\.json: evaluated 290 samples but the validation set has 300"):
        load_run(folder)


def test_steps_missing(make_run):
    folder = make_run("lars-b64")
    (folder / "steps.csv").unlink()
    with pytest.raises(DataError, match=r"lars-b64/steps\.csv: missing"):
        load_run(folder)


def test_metrics_cell_not_a_number(make_run):
    folder = make_run("lars-b64")
    path = folder / "metrics.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[2], "soon", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics\.csv: line 4, column wall_s: 'soon' is not a number"):
        load_run(folder)


def test_metrics_without_rows(make_run):
    folder = make_run("lars-b64")
    path = folder / "metrics.csv"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"metrics\.csv: no data rows"):
        load_run(folder)


def test_summary_missing_a_key(make_run):
    folder = make_run("lars-b64")
    values = json.loads((folder / "summary.json").read_text())
    del values["images_per_s_per_device"]
    (folder / "summary.json").write_text(json.dumps(values))
    with pytest.raises(DataError, match=r"summary\.json: missing key\(s\) images_per_s_per_device"):
        load_run(folder)


def test_summary_not_json(make_run):
    folder = make_run("lars-b64")
    (folder / "summary.json").write_text('{"run": "lars-b64", ')
    with pytest.raises(DataError, match=r"summary\.json: not valid JSON"):
        load_run(folder)


def test_summary_of_another_run(make_run):
    folder = make_run("lars-b64")
    edit_json(folder / "summary.json", run="other")
    with pytest.raises(DataError, match=r"says run 'other' but lies in the folder of run 'lars-b64'"):
        load_run(folder)


def test_run_given_twice(make_run):
    folder = make_run("lars-b64")
    with pytest.raises(DataError, match="given more than once: lars-b64"):
        load_runs([folder, folder])


def test_bad_run_writes_nothing(make_run, settings, tmp_path):
    good = make_run("lars-b64")
    bad = make_run("sgd-b32")
    edit_json(bad / "eval.json", samples=299)
    out_dir = tmp_path / "report"
    with pytest.raises(DataError, match="sgd-b32/eval.json"):
        build_report([good, bad], settings, out_dir)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_cli_prints_one_line_and_exits_2(make_run, settings, tmp_path, capsys):
    folder = make_run("lars-b64")
    edit_json(folder / "summary.json", finished=False)
    status = cli.main(["report", "--runs", str(folder), "--settings", json.dumps(settings),
                       "--out-dir", str(tmp_path / "report")])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("flashnet report: error: ") and "summary.json: training did not finish" in err
