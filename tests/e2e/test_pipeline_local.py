"""The whole pipeline with the local profile (`snakemake --profile profiles/local`) on tiny
generated data in a temporary folder: sample data, shards, 2-process DDP training through
submitit's local executor, evaluation, report."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from helpers import (REPO, TINY_CONFIG, VENV_BIN, Workflow, check_report, check_run, check_shards, describe,
                     dry_run_jobs, expected_jobs)

pytestmark = pytest.mark.e2e

PROFILE = str(REPO / "profiles" / "local")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Workflow:
    workflow = Workflow.create(tmp_path_factory.mktemp("local-pipeline"), TINY_CONFIG)
    proc = workflow.snakemake("--profile", PROFILE)
    assert proc.returncode == 0, describe(proc)
    return workflow


def test_local_profile_dry_run_lists_every_job(tmp_path):
    workflow = Workflow.create(tmp_path, TINY_CONFIG)
    proc = workflow.snakemake("--profile", PROFILE, "-n")
    assert proc.returncode == 0, describe(proc)
    assert dry_run_jobs(proc.stdout) == expected_jobs(TINY_CONFIG)


def test_all_outputs_present(local_run):
    results = local_run.results
    for path in [*(f"shards/{split}/manifest.json" for split in ("train", "val")),
                 *(f"runs/default/{name}" for name in ("summary.json", "metrics.csv", "steps.csv", "model.pt",
                                                       "eval.json", "mllog.txt")),
                 "report/report.html", "report/summary.md", "report/summary.csv"]:
        assert (results / path).is_file(), path
    # A finished run leaves no resume checkpoint behind (a rerun would train afresh).
    assert not (local_run.run_dir / "checkpoints" / "last.ckpt").exists()


def test_shards_match_their_manifests(local_run):
    manifests = check_shards(local_run.results)
    sample = TINY_CONFIG["sample_data"]
    assert manifests["val"]["samples"] == sample["classes"] * sample["val_per_class"]
    assert manifests["train"]["samples"] == sample["classes"] * sample["train_per_class"]
    # odd_files makes three train files a PNG, a CMYK and a greyscale JPEG: converted, not rejected.
    assert len(manifests["train"]["converted"]) == 3 and not manifests["train"]["rejected"]


def test_training_evaluation_and_accuracy(local_run):
    check_run(local_run)


def test_report_written(local_run):
    check_report(local_run.results)


def test_nothing_left_to_do(local_run):
    proc = local_run.snakemake("--profile", PROFILE, "-n")
    assert proc.returncode == 0, describe(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr, describe(proc)


def test_flashnet_report_opens_in_chromium(local_run, tmp_path):
    """The pipeline's own report, from a real run: no console errors, the sections, the figures."""
    from browser import distinct_colours, load_page, require_chromium

    from flashnet.report.html import SECTIONS

    seen = load_page(require_chromium(), local_run.results / "report" / "report.html", tmp_path / "profile")
    assert seen["problems"] == []
    assert seen["headings"] == ["flashnet report", *(heading for _, heading, _ in SECTIONS)]
    assert seen["images"] and all(image["loaded"] for image in seen["images"])
    assert seen["accuracy_png"] is not None and distinct_colours(seen["accuracy_png"]) > 50


def test_snakemakes_own_report(local_run, tmp_path):
    """`snakemake --report` over the finished run: every report() output with its caption, in a page
    that loads in Chromium without console errors."""
    from browser import load_page, require_chromium

    report = tmp_path / "report.html"
    proc = local_run.snakemake("--report", str(report))
    assert proc.returncode == 0, describe(proc)
    text = report.read_text()
    for name in ("summary.csv", "references.csv", "projection.csv", "accuracy_vs_epoch.png", "accuracy_vs_time.png",
                 "accuracy_vs_batch.png", "throughput.png", "lr_schedule.png"):
        assert name in text, name
    seen = load_page(require_chromium(), report, tmp_path / "profile")
    # Snakemake's template inlines Tailwind's browser build, which warns that it is "not for
    # production": Snakemake's own warning, not ours. Errors, exceptions and failed loads still count.
    errors = [p for p in seen["problems"] if not p.startswith(("console.warning", "log warning"))]
    assert errors == []
    assert "Snakemake" in seen["dom"] and "flashnet" in seen["dom"]
    assert "global batch" in seen["dom"]  # the workflow description lists the runs


def test_the_shipped_default_runs_end_to_end(tmp_path):
    """What `make run` runs: config/config.yaml as shipped (10 generated classes, the `default` run),
    with the local profile, in a folder of its own. Its terminal shows the training advance (the
    progress lines reach Snakemake's stderr, no tty needed), and `flashnet status` says it finished."""
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    workflow = Workflow.create(tmp_path / "default", shipped)
    proc = workflow.snakemake("--profile", PROFILE)
    assert proc.returncode == 0, describe(proc)
    check_shards(workflow.results)
    check_run(workflow)
    check_report(workflow.results)
    check_progress_lines(proc.stdout + proc.stderr, workflow, shipped["runs"]["default"]["epochs"])

    status = subprocess.run([str(VENV_BIN / "flashnet"), "status", "--directory", str(workflow.workdir),
                             "--configfile", str(workflow.workdir / "overlay.yaml")],
                            cwd=REPO, env=workflow.env, capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stderr
    (row,) = [line for line in status.stdout.splitlines() if line.startswith("default ")]
    assert "finished, evaluated" in row and "8/8" in row, status.stdout


def check_progress_lines(terminal: str, workflow: Workflow, epochs: int) -> None:
    ours = [line for line in terminal.splitlines() if line.startswith(("[train default]", "[evaluate default]"))]
    assert re.fullmatch(r"\[train default\] submitted local job \d+; log \S+/logs/train/default.log, job logs in "
                        r"\S+/runs/default/jobs", ours[0]), ours
    epoch_lines = [line for line in ours if line.startswith("[train default] epoch ")]
    # one line per epoch, each with loss, top-1, images/s and an ETA; nothing floods in between
    assert [line.split(",")[0] for line in epoch_lines] == [f"[train default] epoch {e}/{epochs}"
                                                            for e in range(1, epochs + 1)], ours
    assert all(re.search(r"loss [\d.]+, top-1 [\d.]+ %, \d+ img/s, .* trained, ETA", line) for line in epoch_lines)
    assert any(line.startswith("[train default] finished: top-1 ") for line in ours), ours
    assert ours[-1].startswith("[evaluate default] finished: top-1 "), ours
    assert len(ours) <= epochs + 10, ours
    # the log has them too, with the job's full output
    log = (workflow.results / "logs" / "train" / "default.log").read_text()
    assert all(line in log for line in ours if line.startswith("[train default]"))
    assert "step" in log and "val top-1" in log
