"""`flashnet status` on run folders in every state, with sacct's answers given as the text sacct
prints (`--parsable2`, the fields status asks for); the real SLURM job is in
tests/e2e/test_pipeline_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flashnet import cli, status
from flashnet.jobs import slurm
from flashnet.runfolder import METRICS_COLUMNS, STEPS_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
RUN = {"epochs": 8, "batch_size": 64, "target_top1": 0.5}
TRAIN_SAMPLES = 1000  # 15 steps an epoch at batch 64: 120 steps in all

# What `sacct -D -X -n -P -o JobID,State,NodeList,ElapsedRaw,ExitCode -j 42` prints, one line per run
# of the job: a first run requeued, a second preempted, the third one running.
SACCT_REQUEUED_TWICE = """42|REQUEUED|flashnet-n1|95|0:0
42|PREEMPTED|flashnet-n2|40|0:15
42|RUNNING|flashnet-n[1-2]|12|0:0
"""
SACCT_PENDING = "42|PENDING|None assigned|0|0:0\n"
SACCT_RUNNING = "42|RUNNING|flashnet-n[1-2]|300|0:0\n"
SACCT_CANCELLED = "42|CANCELLED by 0|flashnet-n1|30|0:0\n"


def write_csv(path: Path, fields: tuple[str, ...], rows: list[dict], cut: int = 0) -> None:
    lines = [",".join(fields)] + [",".join(str(row.get(f, "")) for f in fields) for row in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text[:-cut] if cut else text)


def epoch_row(epoch: int, top1: float = 0.3) -> dict:
    return {"epoch": epoch, "step": 15 * epoch, "wall_s": 30.0 * epoch, "train_loss": 2.0 / epoch, "val_top1": top1,
            "val_top5": 0.9, "images_per_s": 32.0, "lr": 0.1, "validation_s": 1.5}


def make_run(results: Path, name: str, epochs: int = 0, job: tuple[str, str] | None = None, waiting: bool = False,
             log: str = "", finished: bool = False, evaluated: bool = False, checkpoint: bool = False,
             top1s: tuple[float, ...] = ()) -> Path:
    run_dir = results / "runs" / name
    (run_dir / "jobs").mkdir(parents=True)
    if epochs:
        rows = [epoch_row(e, top1s[e - 1] if top1s else 0.3) for e in range(1, epochs + 1)]
        write_csv(run_dir / "metrics.csv", METRICS_COLUMNS, rows)
        write_csv(run_dir / "steps.csv", STEPS_COLUMNS,
                  [{"step": s, "epoch": s / 15, "wall_s": 2.0 * s, "lr": 0.1, "train_loss": 1.0, "images_per_s": 40.0}
                   for s in range(5, 15 * epochs + 1, 5)])
    lines = []
    if job:
        lines.append(f"submitted {job[0]} job {job[1]} for run {name}; 1 node(s) × 2 device(s); "
                     f"logs in {run_dir}/jobs")
        if waiting:
            (run_dir / "jobs" / "active.json").write_text(json.dumps({"cluster": job[0], "job_id": job[1]}))
    log_file = results / "logs" / "train" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("\n".join(lines + [log]) + "\n")
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"finished": True, "steps": 15 * epochs,
                                                          "train_seconds": 30.0 * epochs}))
    if evaluated:
        (run_dir / "eval.json").write_text("{}")
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run_dir


def status_of(results: Path, name: str, sacct_text: str | None = None, alive: bool = False) -> status.RunStatus:
    sacct = (lambda job_id: None) if sacct_text is None else (lambda job_id: slurm.parse_sacct(sacct_text, job_id))
    return status.run_status(name, RUN, results, TRAIN_SAMPLES, sacct=sacct, alive=lambda job_id: alive)


def test_not_started(tmp_path):
    s = status_of(tmp_path, "fresh")
    assert (s.state, s.job, s.epoch, s.eta) == ("not started", "", "", "")


def test_slurm_job_queued(tmp_path):
    make_run(tmp_path, "r", job=("slurm", "42"), waiting=True)
    s = status_of(tmp_path, "r", SACCT_PENDING)
    assert (s.state, s.job, s.nodes) == ("queued", "42 (slurm)", "")


def test_slurm_job_running_with_progress_and_eta(tmp_path):
    make_run(tmp_path, "r", epochs=2, job=("slurm", "42"), waiting=True, top1s=(0.3, 0.55))
    s = status_of(tmp_path, "r", SACCT_RUNNING)
    assert (s.state, s.nodes) == ("running", "flashnet-n[1-2]")
    assert (s.epoch, s.step, s.top1, s.images_per_s) == ("2/8", "30/120", "55.0 %", "40")
    assert s.time_used == "60 s"  # steps.csv's last row: step 30 at 60 s
    assert s.eta == "3 min 00 s"  # 90 steps left at 2 s a step
    assert s.to_target == "60 s"  # epoch 2 reached 0.5


def test_slurm_job_requeued_twice(tmp_path):
    make_run(tmp_path, "r", epochs=1, job=("slurm", "42"), waiting=True)
    s = status_of(tmp_path, "r", SACCT_REQUEUED_TWICE)
    assert s.state == "running, requeued ×2"
    pending_again = SACCT_REQUEUED_TWICE.replace("42|RUNNING|flashnet-n[1-2]|12|0:0", "42|PENDING|None assigned|0|0:0")
    assert status_of(tmp_path, "r", pending_again).state == "queued, requeued ×2"


def test_slurm_job_still_running_after_snakemake_was_killed(tmp_path):
    make_run(tmp_path, "r", epochs=1, job=("slurm", "42"))  # in the log, but no active.json: nobody waits
    assert status_of(tmp_path, "r", SACCT_RUNNING).state == "running, no rule waiting on it"


def test_slurm_job_without_sacct_here(tmp_path):
    make_run(tmp_path, "r", job=("slurm", "42"), waiting=True)
    assert status_of(tmp_path, "r", None).state == "submitted (no sacct here to ask)"


def test_failed_with_the_reason_from_the_rule_log(tmp_path):
    log = ("flashnet train: job 42 (FAILED) failed:\nJob (task=0) failed during processing with trace:\n"
           "Traceback (most recent call last):\n  ...\n"
           "flashnet.train.callbacks.NonFiniteLoss: loss became NaN or infinite at step 17; stopping\n"
           "logs: a and b; rerunning the workflow resumes from the last checkpoint if one was written")
    make_run(tmp_path, "r", epochs=1, job=("slurm", "42"), log=log, checkpoint=True)
    s = status_of(tmp_path, "r", "42|FAILED|flashnet-n1|50|1:0\n")
    assert s.state == ("failed: job 42 (FAILED) failed: flashnet.train.callbacks.NonFiniteLoss: loss became NaN or "
                       "infinite at step 17; stopping")


def test_diverged_and_hung_runs_say_so_from_the_jobs_own_record(tmp_path):
    from flashnet.runfolder import record_failure

    log = "flashnet train: job 42 (FAILED) failed:\nflashnet.train.health.Diverged: train loss 7e+07 ...\n"
    run_dir = make_run(tmp_path, "r", epochs=1, job=("slurm", "42"), log=log, checkpoint=True)
    record_failure(run_dir, "diverged", "train loss 7e+07 (mean over all ranks, up to step 20) is above "
                                        "divergence_loss_factor 10 × ln(1000 classes) = 69.1; the run diverged")
    state = status_of(tmp_path, "r", "42|FAILED|flashnet-n1|50|1:0\n").state
    assert state == ("diverged: train loss 7e+07 (mean over all ranks, up to step 20) is above "
                     "divergence_loss_factor 10 × ln(1000 classes) = 69.1; the run diverged")
    record_failure(run_dir, "hung", "watchdog: no training step for 61 s (limit 60 s); rank(s) 3 did not answer")
    assert status_of(tmp_path, "r", SACCT_CANCELLED).state == (
        "failed: hung: watchdog: no training step for 61 s (limit 60 s); rank(s) 3 did not answer")
    # a job of the run running again: its state, not the last job's record
    assert status_of(tmp_path, "r", SACCT_RUNNING).state.startswith("running")


def test_failed_by_slurm_alone(tmp_path):
    make_run(tmp_path, "r", job=("slurm", "42"))  # the waiter was killed before it could say why
    assert status_of(tmp_path, "r", SACCT_CANCELLED).state == "failed: SLURM says CANCELLED"


def test_failed_before_any_job(tmp_path):
    make_run(tmp_path, "r", log="flashnet train: error: runs.r.loggers: wandb needs the wandb package")
    assert status_of(tmp_path, "r").state == "failed: runs.r.loggers: wandb needs the wandb package"


def test_local_job_running_after_a_resume(tmp_path):
    make_run(tmp_path, "r", epochs=1, job=("local", "4242"), waiting=True, log="resuming from x/last.ckpt")
    s = status_of(tmp_path, "r", alive=True)
    assert (s.state, s.job, s.nodes) == ("running, requeued ×1", "4242 (local)", "local")


def test_stopped_local_run_is_resumable(tmp_path):
    make_run(tmp_path, "r", epochs=3, job=("local", "4242"), checkpoint=True)
    s = status_of(tmp_path, "r", alive=False)
    assert (s.state, s.epoch) == ("stopped (resumable)", "3/8")


def test_finished_and_evaluated(tmp_path):
    make_run(tmp_path, "r", epochs=8, job=("local", "4242"), finished=True, evaluated=True, top1s=(0.1,) * 7 + (0.6,))
    s = status_of(tmp_path, "r")
    assert (s.state, s.epoch, s.step, s.top1, s.to_target) == ("finished, evaluated", "8/8", "120/120", "60.0 %",
                                                              "4 min 00 s")
    make_run(tmp_path, "low", epochs=8, finished=True, top1s=(0.1,) * 8)
    assert status_of(tmp_path, "low").to_target == "not reached"


def test_finished_run_being_evaluated_or_whose_evaluation_failed(tmp_path):
    run_dir = make_run(tmp_path, "r", epochs=8, job=("local", "4242"), finished=True)
    (run_dir / "jobs" / "active.json").write_text(json.dumps({"cluster": "local", "job_id": "5151"}))
    s = status_of(tmp_path, "r", alive=True)
    assert (s.state, s.job) == ("finished, evaluating", "5151 (local)")
    (run_dir / "jobs" / "active.json").unlink()
    log = tmp_path / "logs" / "evaluate" / "r.log"
    log.parent.mkdir(parents=True)
    log.write_text("flashnet evaluate: error: evaluated 290 samples but val/manifest.json lists 300\n")
    assert status_of(tmp_path, "r").state == ("finished, evaluation failed: evaluated 290 samples but "
                                              "val/manifest.json lists 300")


def test_half_written_run_folder_never_fails(tmp_path):
    run_dir = make_run(tmp_path, "half", epochs=2, job=("slurm", "42"))
    write_csv(run_dir / "metrics.csv", METRICS_COLUMNS, [epoch_row(1), epoch_row(2)], cut=12)  # last row cut short
    (run_dir / "steps.csv").write_bytes(b"step,epoch,wall_s\n5,0.3")
    (run_dir / "summary.json").write_text('{"finished": tr')
    (run_dir / "jobs" / "active.json").write_text('{"clus')
    (tmp_path / "logs" / "train" / "half.log").write_bytes(b"\xff\xfe submitted slurm job")
    s = status_of(tmp_path, "half", "")
    assert s.epoch == "1/8" and s.state.startswith("stopped")
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    (empty / "metrics.csv").write_text("")
    assert status_of(tmp_path, "empty").state == "not started"


def test_command_line_table_for_a_configfile(tmp_path, capsys):
    results = tmp_path / "results"
    make_run(results, "default", epochs=2, job=("local", "999999999"), waiting=True)
    configfile = tmp_path / "mine.yaml"
    configfile.write_text(yaml.safe_dump({"runs": {"extra": {"model": "resnet18", "epochs": 3}}}))
    # snakemake's --directory: results_dir (the shipped "results") is relative to it
    assert cli.main(["status", "--configfile", str(configfile), "--directory", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "state", "job"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"default", "extra"}  # the shipped run and the configfile's, merged as snakemake does
    assert "stopped" in rows["default"] and "2/8" in rows["default"]  # its job is not alive here
    assert "not started" in rows["extra"]
    assert str(results / "logs" / "train" / "default.log") in rows["default"]


def test_command_line_names_a_bad_configfile(tmp_path, capsys):
    configfile = tmp_path / "bad.yaml"
    configfile.write_text("runs: {default: {epochs: -1}}\n")
    assert cli.main(["status", "--configfile", str(configfile), "--directory", str(ROOT)]) == 2
    assert "epochs" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["nothing.yaml"])
def test_command_line_names_a_missing_configfile(tmp_path, capsys, missing):
    assert cli.main(["status", "--configfile", str(tmp_path / missing), "--directory", str(ROOT)]) == 2
    assert missing in capsys.readouterr().err
