"""``flashnet status``: one table of every run of a configuration, from what is already recorded.

Sources, all read-only: the run folder (summary.json, eval.json, metrics.csv, steps.csv, the resume
checkpoint, ``jobs/active.json`` while a rule waits on a job), the train rule's log (which job it
submitted, why it failed, how often the job resumed) and, for a SLURM job, ``sacct`` (state, nodes,
one record per requeue). Without SLURM (local runs, a laptop) sacct is simply not asked; a missing
or half-written file reads as what it is, never as an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

from . import config as cfg
from .jobs import slurm
from .jobs.lock import local_job_alive
from .progress import format_duration
from .runfolder import (epoch_rows, eta_s, failure_state, last_step_row, read_failure, read_json, run_total_steps,
                        short_reason, time_to_target)

# The workflow this package belongs to (workflow/flashnet/ in it): its schema and presets.
WORKFLOW_DIR = cfg.WORKFLOW_ROOT
SUBMITTED = re.compile(r"^submitted (local|slurm) job (\S+) for run", re.M)
RESUMED = re.compile(r"^resuming from ", re.M)


def query_sacct(job_id: str) -> list[slurm.Attempt] | None:
    """The job's runs from SLURM's accounting (None without an answer); status does not wait long."""
    return slurm.attempts(job_id, timeout_s=30)


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@dataclasses.dataclass
class RunStatus:
    run: str
    state: str
    job: str = ""
    nodes: str = ""
    epoch: str = ""
    step: str = ""
    top1: str = ""
    images_per_s: str = ""
    time_used: str = ""
    eta: str = ""
    to_target: str = ""
    logs: str = ""


COLUMNS = {"run": "run", "state": "state", "job": "job", "nodes": "nodes", "epoch": "epoch", "step": "step",
           "top1": "top-1", "images_per_s": "img/s", "time_used": "trained", "eta": "ETA",
           "to_target": "to target", "logs": "logs"}


def job_of(run_dir: Path, rule_log: Path, text: str) -> tuple[str, str, bool] | None:
    """(cluster, job id, a rule is waiting on it) for the run's latest job, if it ever had one."""
    active = read_json(run_dir / "jobs" / "active.json")
    if active and "job_id" in active:
        return str(active.get("cluster", "local")), str(active["job_id"]), True
    submitted = SUBMITTED.findall(text)
    if submitted:
        cluster, job_id = submitted[-1]
        return cluster, job_id, False
    return None


def job_state(cluster: str, job_id: str, waiting: bool, sacct: Callable, alive: Callable) -> tuple[str, str, int]:
    """(state word, nodes, requeues) of the job by its scheduler; "" for a state nobody knows."""
    if cluster == "slurm":
        attempts = sacct(job_id)
        if attempts is None:
            return ("submitted (no sacct here to ask)" if waiting else ""), "", 0
        if not attempts:
            return ("queued" if waiting else ""), "", 0
        last = attempts[-1]
        requeues = len(attempts) - 1
        if last.state in slurm.QUEUED_STATES:
            return "queued", "", requeues
        if last.state in slurm.ACTIVE_STATES:
            return "running", last.nodes, requeues
        return last.state, last.nodes, requeues
    return ("running" if alive(job_id) else ""), ("local" if alive(job_id) else ""), 0


def run_status(name: str, run: dict[str, Any], results_dir: Path, train_samples: int | None,
               sacct: Callable[[str], list[slurm.Attempt] | None] = query_sacct,
               alive: Callable[[str], bool] = local_job_alive) -> RunStatus:
    run_dir = results_dir / "runs" / name
    rule_log = results_dir / "logs" / "train" / f"{name}.log"
    status = RunStatus(name, "not started", logs=f"{rule_log}, {run_dir / 'jobs'}")
    summary = read_json(run_dir / "summary.json") or {}
    step, wall = fill_progress(status, run, run_dir, summary, train_samples)
    text = read_text(rule_log)
    job = job_of(run_dir, rule_log, text)
    if summary.get("finished"):
        status.state = finished_state(run_dir, results_dir / "logs" / "evaluate" / f"{name}.log", job)
        status.job = f"{job[1]} ({job[0]})" if job else ""
        return status
    recorded = read_failure(run_dir)  # the job's own word on why it stopped: diverged, hung
    if job is None:
        status.state = (failure_state(recorded) if recorded else None) or failure(text) or \
            ("stopped" if step else "not started")
        return status
    cluster, job_id, waiting = job
    status.job = f"{job_id} ({cluster})"
    state, status.nodes, requeues = job_state(cluster, job_id, waiting, sacct, alive)
    if state in ("queued", "running") or state.startswith("submitted"):
        again = requeues or (len(RESUMED.findall(text)) if cluster == "local" else 0)
        status.state = state + (f", requeued ×{again}" if again else "") + ("" if waiting else ", no rule waiting on it")
        if state == "running":
            status.eta = format_duration(eta_s(step, run_total_steps(run, train_samples),
                                               wall))
    elif recorded:
        status.state = failure_state(recorded)
    elif failure(text):
        status.state = failure(text)
    elif state:
        status.state = f"failed: SLURM says {state}" + (f" after {requeues} requeue(s)" if requeues else "")
    else:
        status.state = "stopped" + (" (resumable)" if (run_dir / "checkpoints" / "last.ckpt").exists() else "")
    return status


def fill_progress(status: RunStatus, run: dict[str, Any], run_dir: Path, summary: dict[str, Any],
                  train_samples: int | None) -> tuple[float, float]:
    """Epoch, step, top-1, images/s, time trained and time to target from the newest records;
    returns (step, seconds trained)."""
    rows, step_row = epoch_rows(run_dir), last_step_row(run_dir)
    step = max([r["step"] for r in rows] + ([step_row["step"]] if step_row else []), default=0)
    wall = max([r["wall_s"] for r in rows] + ([step_row["wall_s"]] if step_row else []), default=0.0)
    if summary.get("finished"):
        step, wall = summary.get("steps", step), summary.get("train_seconds", wall)
    total = run_total_steps(run, train_samples)
    if step:
        status.epoch = f"{rows[-1]['epoch'] if rows else 0:.0f}/{run['epochs']:g}"
        status.step = f"{step:.0f}/{total}" if total else f"{step:.0f}"
        status.time_used = format_duration(wall)
    if rows and "val_top1" in rows[-1]:
        status.top1 = f"{100 * rows[-1]['val_top1']:.1f} %"
    rate = (step_row or {}).get("images_per_s") or (rows[-1].get("images_per_s") if rows else None)
    if rate:
        status.images_per_s = f"{rate:.0f}"
    reached = time_to_target(rows, run["target_top1"])
    status.to_target = format_duration(reached) if reached is not None else ("not reached" if summary else "")
    return step, wall


def finished_state(run_dir: Path, evaluate_log: Path, job: tuple[str, str, bool] | None) -> str:
    if (run_dir / "eval.json").exists():
        return "finished, evaluated"
    if job and job[2]:  # a rule waits on a job of a finished run: the evaluation
        return "finished, evaluating"
    evaluation = failure(read_text(evaluate_log), "evaluate")
    return f"finished, evaluation {evaluation}" if evaluation else "finished"


def failure(text: str, command: str = "train") -> str | None:
    """``failed: <why>`` from a rule log's last ``flashnet <command>:`` line (and, where that only
    says the job failed, the exception that ended it)."""
    failures = list(re.finditer(rf"^flashnet {command}: (.*)$", text, re.M))
    if not failures:
        return None
    return f"failed: {short_reason(text[failures[-1].start(1):]).removeprefix('error: ')}"


def format_table(statuses: list[RunStatus]) -> str:
    rows = [list(COLUMNS.values())] + [[str(getattr(s, key)) for key in COLUMNS] for s in statuses]
    used = [i for i in range(len(COLUMNS)) if any(row[i] for row in rows[1:]) or i < 2]
    widths = [max(len(row[i]) for row in rows) for i in used]
    lines = ["  ".join(row[i].ljust(width) for i, width in zip(used, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def statuses(config: dict[str, Any], directory: Path = Path("."), **probes) -> list[RunStatus]:
    results_dir = Path(directory) / config["results_dir"]  # an absolute results_dir stays as it is
    manifest = read_json(results_dir / "shards" / "train" / "manifest.json") or {}
    return [run_status(name, run, results_dir, manifest.get("samples"), **probes)
            for name, run in config["runs"].items()]


def status_from_cli(args: argparse.Namespace) -> None:
    config = cfg.load_workflow_config(args.directory, args.configfile or [], args.replace_workflow_config)
    print(format_table(statuses(config, args.directory)))
