"""The summary of all runs (one row each), the software they ran on, and summary.md.

Final top-1/top-5 come from eval.json, the evaluation of the final checkpoint on every validation
image exactly once; everything else from summary.json, which training wrote. The per-epoch
validation in metrics.csv is only plotted: it may have seen a different number of images.
"""

from __future__ import annotations

import datetime

from . import projection as proj
from .mlperf import (COMPARABLE_ONLY, MLPERF_CSV_COLUMNS, RCP_NOTE, TIME_TO_TRAIN_NOTE, format_time_to_train,
                     format_division, mlperf_csv_fields, rcp_table)
from .plots import FIGURE_TITLES
from .references import PUBLISHED_LABEL, REFERENCES
from .runs import RunResults, UnfinishedRun
from .tables import (Table, format_count, format_duration, format_percent, format_published_duration,
                     format_published_percent, format_rate, format_time_to_target, markdown_table)

# summary.json's split of train_seconds (train/clock.py); absent in runs trained before it was measured
TIMING_KEYS = ("step_seconds", "validation_seconds", "validations", "checkpoint_seconds", "checkpoints",
               "startup_seconds", "job_segments")
SUMMARY_CSV_COLUMNS = (
    "run", "model", "global_batch", "optimizer", "precision", "nodes", "devices_per_node", "world_size",
    "accelerator", "device_name", "epochs", "steps", "final_top1", "final_top5", "target_top1",
    "time_to_target_s", "epochs_to_target", "stopped_at_target", *MLPERF_CSV_COLUMNS, "train_seconds",
    *TIMING_KEYS, "images_per_s", "images_per_s_per_device", "eval_samples",
)
NOT_MEASURED = "not measured"
TIMING_NOTE = ("Train time is the fit's wall clock over all job segments (time queued between them excluded): "
               "training steps, validations, resume checkpoint writes, and each job's start-up (from the start of "
               "the fit to the end of its first step: loader workers, compilation, the first batch). Images/s is "
               "over the training steps only (each job's first step left out). Runs trained before flashnet timed "
               "these apart say not measured, and their images/s is over the whole train time.")


def summary_csv_row(run: RunResults) -> dict[str, object]:
    """One run's row of summary.csv: raw numbers (seconds, fractions), None where there is none."""
    s, c, e = run.summary, run.config, run.evaluation
    return {
        "run": run.name, "model": c["model"], "global_batch": run.global_batch, "optimizer": c["optimizer"],
        "precision": s["precision"], "nodes": c["nodes"], "devices_per_node": c["devices_per_node"],
        "world_size": s["world_size"], "accelerator": s["accelerator"], "device_name": s["device_name"],
        "epochs": s["epochs"], "steps": s["steps"], "final_top1": e["top1"], "final_top5": e["top5"],
        "target_top1": s["target_top1"], "time_to_target_s": s["time_to_target_s"],
        "epochs_to_target": s.get("epochs_to_target"), "stopped_at_target": s.get("stopped_at_epoch"),
        "train_seconds": s["train_seconds"],
        "images_per_s": s["images_per_s"], "images_per_s_per_device": s["images_per_s_per_device"],
        "eval_samples": e["samples"], **{key: s.get(key) for key in TIMING_KEYS}, **mlperf_csv_fields(run),
    }


def summary_table(runs: list[RunResults]) -> Table:
    """What each run achieved: final accuracy, time to target, train time, throughput."""
    rows = []
    for run in runs:
        r = summary_csv_row(run)
        rows.append((
            r["run"], format_percent(r["final_top1"]), format_percent(r["final_top5"]),
            format_percent(r["target_top1"], 1), format_time_to_target(r["time_to_target_s"], r["epochs_to_target"]),
            format_time_to_train(run), format_duration(r["train_seconds"]), format_rate(r["images_per_s"]),
            format_rate(r["images_per_s_per_device"]),
        ))
    return Table(
        headers=("Run", "Top-1", "Top-5", "Target top-1", "Time to target", "MLPerf time to train", "Train time",
                 "Images/s", "Images/s per device"),
        rows=tuple(rows), numeric=(False,) + (True,) * 8,
    )


def format_share(seconds: float, total: float, detail: str = "") -> str:
    """``"32 s (8%; 16 × 2 s)"``: a part of the train time, its share, and what it was made of."""
    share = format_percent(seconds / total, 0) if total > 0 else "?"
    return f"{format_duration(seconds)} ({share}{'; ' + detail if detail else ''})"


def format_repeats(seconds: float, count: int) -> str:
    """``"16 × 2 s"``: how many times, and the mean of each."""
    return f"{count:,} × {format_duration(seconds / count)}" if count else "none"


def timing_row(run: RunResults) -> tuple[str, ...]:
    """Where one run's train time went; ``not measured`` for a run from before it was split."""
    r = summary_csv_row(run)
    total = r["train_seconds"]
    if r["step_seconds"] is None:
        return (r["run"], format_duration(total), *[NOT_MEASURED] * 4)
    jobs = r["job_segments"]
    return (
        r["run"], format_duration(total), format_share(r["step_seconds"], total),
        format_share(r["validation_seconds"], total, format_repeats(r["validation_seconds"], r["validations"])),
        format_share(r["checkpoint_seconds"], total, format_repeats(r["checkpoint_seconds"], r["checkpoints"])),
        format_share(r["startup_seconds"], total, f"{jobs} job{'s' if jobs != 1 else ''}"),
    )


def timing_table(runs: list[RunResults]) -> Table:
    """Where the train time went: training steps, validation, checkpoint writes, start-up."""
    return Table(headers=("Run", "Train time", "Training steps", "Validation", "Checkpoint writes", "Start-up"),
                 rows=tuple(timing_row(run) for run in runs), numeric=(False,) + (True,) * 5)


def format_epochs(epochs: float, stopped_at_epoch: int | None) -> str:
    """``"90"``, or ``"35 of 40 (stopped at target)"`` for a run that ended at its target."""
    if stopped_at_epoch is None:
        return format_count(epochs)
    return f"{format_count(stopped_at_epoch)} of {format_count(epochs)} (stopped at target)"


def recipe_table(runs: list[RunResults]) -> Table:
    """How each run trained: model, global batch, optimizer, precision, devices, epochs."""
    rows = []
    for run in runs:
        r = summary_csv_row(run)
        rows.append((
            r["run"], r["model"], format_count(r["global_batch"]), r["optimizer"].upper(), r["precision"],
            f"{r['nodes']} × {r['devices_per_node']}", r["device_name"], format_epochs(r["epochs"], r["stopped_at_target"]),
            format_division(run),
        ))
    return Table(
        headers=("Run", "Model", "Global batch", "Optimizer", "Precision", "Nodes × devices", "Device", "Epochs",
                 "MLPerf division"),
        rows=tuple(rows), numeric=(False, False, True, False, False, True, False, True, False),
    )


def software_table(runs: list[RunResults]) -> Table:
    """What each run ran on: library versions, git revision and when it finished."""
    rows = []
    for run in runs:
        versions = run.summary.get("versions") or {}
        revision = run.summary.get("git_revision") or "unknown"
        rows.append((
            run.name, *(str(versions.get(key, "?")) for key in ("python", "torch", "torchvision",
                                                                  "pytorch_lightning")),
            revision[:12], run.finished_at.strftime("%Y-%m-%d %H:%M UTC"),
        ))
    return Table(
        headers=("Run", "Python", "torch", "torchvision", "Lightning", "Git revision", "Finished"),
        rows=tuple(rows), numeric=(False,) * 7,
    )


def references_table() -> Table:
    """The published records; the accuracy column says whether it is reached or a target."""
    rows = tuple(
        (r.name, f"{r.devices:,} {r.device_name}", "" if r.batch_size is None else f"{r.batch_size:,}",
         format_published_duration(r.time_s),
         format_published_percent(r.top1) + (" target" if r.top1_is_target else ""), r.citation)
        for r in REFERENCES
    )
    return Table(headers=("Result", "Devices", "Global batch", "Time", "Top-1", "Source"), rows=rows,
                 numeric=(False, True, True, True, True, False))


UNFINISHED_NOTE = ("These runs have no results in this report; rerun the workflow to finish them (an "
                   "interrupted run resumes from its checkpoint).")


def unfinished_table(unfinished: list[UnfinishedRun]) -> Table:
    """The runs of the config without results, and why (failure.json, or the log to read)."""
    return Table(("Run", "Why it has no results"), tuple((run.name, run.reason) for run in unfinished), (False, False))


def figure_markdown() -> str:
    return "\n".join(f"![{title}]({name}.png)\n" for name, title in FIGURE_TITLES.items())


def summary_markdown(runs: list[RunResults], projections: list[proj.Projection], settings: proj.ProjectionSettings,
                     generated_at: datetime.datetime, unfinished: list[UnfinishedRun] = ()) -> str:
    """summary.md: runs (and the runs without results, with why), software, figures, published
    reference points and the projection."""
    missing = [f"### Runs without results ({len(unfinished)})\n", markdown_table(unfinished_table(unfinished)),
               UNFINISHED_NOTE + "\n"] if unfinished else []
    of_total = f" of {len(runs) + len(unfinished)}" if unfinished else ""
    parts = [
        "# flashnet report\n",
        f"Generated {generated_at:%Y-%m-%d %H:%M} UTC from {len(runs)}{of_total} run(s). Top-1/top-5 are from the final "
        "evaluation (eval.json: every validation image once); time to target is training time until the "
        "first validation (after each of the run's eval epochs) that reached its target top-1.\n",
        "## Runs\n", *missing, markdown_table(summary_table(runs)), TIME_TO_TRAIN_NOTE + "\n",
        "### Where the training time went\n", markdown_table(timing_table(runs)), TIMING_NOTE + "\n",
        "### Recipe and hardware\n", markdown_table(recipe_table(runs)),
        "### Software\n", markdown_table(software_table(runs)),
        f"### MLPerf reference convergence points ({COMPARABLE_ONLY})\n", RCP_NOTE + "\n",
        markdown_table(rcp_table(runs)),
        "## Figures\n", figure_markdown(),
        f"## Published reference points ({PUBLISHED_LABEL})\n",
        "Figures as the sources state them; none of these was run by this workflow.\n",
        markdown_table(references_table()),
        "## Projection (an estimate, not a measurement)\n",
        proj.projection_intro(settings) + "\n",
        "Assumptions:\n",
        "\n".join(f"- {line}" for line in proj.projection_assumptions(settings)) + "\n",
        markdown_table(proj.projection_table(projections)),
        "Beside Fujitsu's published 74.7 s:\n",
        "\n".join(f"- {line}" for line in proj.fujitsu_comparisons(projections)) + "\n",
    ]
    return "\n".join(parts)
