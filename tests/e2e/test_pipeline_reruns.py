"""What the local pipeline does after something went wrong or changed, on real Snakemake runs of
tiny data (issue 22): a failed run under --keep-going, a logger added to a finished run, a deleted
model.pt."""

from __future__ import annotations

import copy
import socket

import pytest
import yaml

from flashnet.config import RESULT_NEUTRAL_KEYS
from helpers import REPO, TINY_CONFIG, Workflow, describe, dry_run_jobs

pytestmark = pytest.mark.e2e

PROFILE = str(REPO / "profiles" / "local")
# One device, one epoch of two steps: what matters here is which jobs run, not what they learn.
GOOD = {**TINY_CONFIG["runs"]["default"], "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "devices_per_node": 1,
        "loader_workers": 0, "log_every_steps": 1}
SMALL = {**copy.deepcopy(TINY_CONFIG),
         "sample_data": {**TINY_CONFIG["sample_data"], "classes": 2, "train_per_class": 8, "val_per_class": 4,
                         "odd_files": False},
         "shards": {**TINY_CONFIG["shards"], "samples_per_shard": 8, "jobs": 1},
         "evaluate": {"batch_size": 8, "devices": 1, "workers": 0}}


def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def with_runs(workflow: Workflow, runs: dict) -> None:
    """Rewrite the overlay with these runs (the config file's own `default` is overlaid by ours)."""
    workflow.config = {**workflow.config, "runs": runs}
    (workflow.workdir / "overlay.yaml").write_text(yaml.safe_dump(workflow.config, sort_keys=False))


@pytest.fixture(scope="module")
def kept_going(tmp_path_factory) -> tuple[Workflow, str]:
    """`default` trains and evaluates; `bad` names an MLflow server nobody runs, so it fails on the
    submitting side, in seconds (issue 22, case 6)."""
    bad = {**GOOD, "loggers": ["csv", "mlflow"], "mlflow_tracking_uri": f"http://127.0.0.1:{closed_port()}"}
    workflow = Workflow.create(tmp_path_factory.mktemp("keep-going"), {**SMALL, "runs": {"default": GOOD, "bad": bad}})
    proc = workflow.snakemake("--profile", PROFILE, "--keep-going")
    assert proc.returncode != 0, describe(proc)
    return workflow, proc.stdout + proc.stderr


def test_one_failed_run_leaves_a_report_of_the_others(kept_going):
    """Issue 22, case 4: `default` trained and evaluated, and results/report/ was never created."""
    workflow, output = kept_going
    markdown = (workflow.results / "report" / "summary.md").read_text()
    assert "from 1 of 2 run(s)" in markdown
    assert "| bad | failed (see results/logs/train/bad.log) |" in markdown
    assert (workflow.results / "report" / "report.html").exists()
    assert "flashnet: report of the 1 run(s) that finished" in output, output[-3000:]


def test_an_error_before_submission_is_shown_on_the_terminal(kept_going):
    """Issue 22, case 9: an error raised before the job is submitted reached only the rule log."""
    _, output = kept_going
    assert "flashnet train: error: runs.bad.mlflow_tracking_uri http://127.0.0.1:" in output, output[-3000:]


def test_the_partial_report_is_built_again_by_the_next_invocation(kept_going):
    """Without the failed run in the config, the next run rebuilds the report (and nothing else)."""
    workflow, _ = kept_going
    with_runs(workflow, {"default": GOOD})
    proc = workflow.snakemake("--profile", PROFILE, "-n")
    assert proc.returncode == 0, describe(proc)
    assert dry_run_jobs(proc.stdout) == {"report": 1, "all": 1}
    proc = workflow.snakemake("--profile", PROFILE)
    assert proc.returncode == 0, describe(proc)
    assert "Runs without results" not in (workflow.results / "report" / "summary.md").read_text()


def test_adding_a_logger_to_a_finished_run_retrains_nothing(kept_going):
    """Issue 22, case 8: adding a tracker retrained the finished run ("Params have changed")."""
    workflow, _ = kept_going
    # Every result-neutral key changed at once (the checkpoint cadence is one too; its key is left to the schema).
    neutral = {"loggers": ["csv", "tensorboard"], "log_every_steps": 5, "loader_workers": 1, "wandb_mode": "disabled",
               "mlflow_tracking_uri": "http://127.0.0.1:1"}
    assert set(neutral) < RESULT_NEUTRAL_KEYS
    logged = {**GOOD, **neutral}
    with_runs(workflow, {"default": logged})
    proc = workflow.snakemake("--profile", PROFILE, "-n")
    assert proc.returncode == 0, describe(proc)
    assert dry_run_jobs(proc.stdout) == {}, proc.stdout[-3000:]
    # A key that changes the result still does.
    with_runs(workflow, {"default": {**GOOD, "lr": GOOD["lr"] / 2}})
    proc = workflow.snakemake("--profile", PROFILE, "-n")
    assert dry_run_jobs(proc.stdout) == {"train": 1, "evaluate": 1, "report": 1, "all": 1}, proc.stdout[-3000:]
    with_runs(workflow, {"default": GOOD})


def test_a_deleted_model_is_trained_again(kept_going):
    """Issue 22, case 9: a model.pt deleted once eval.json existed was never noticed."""
    workflow, _ = kept_going
    with_runs(workflow, {"default": GOOD})
    (workflow.run_dir / "model.pt").unlink()
    proc = workflow.snakemake("--profile", PROFILE, "-n")
    assert proc.returncode == 0, describe(proc)
    assert dry_run_jobs(proc.stdout) == {"train": 1, "evaluate": 1, "report": 1, "all": 1}, proc.stdout[-3000:]
