"""MLPerf's figures in the report: time to train (run_start → run_stop of each run's mllog.txt, from
summary.json) and, for each LARS run, its epochs to target beside the record MLCommons' RCP checker
holds its batch size against (:mod:`flashnet.mlperf.rcp`: the checker's own mean, and the least
olympic mean of a submission's 5 runs its t-test accepts). One run is not a submission: the table
shows where a run falls, the checker's verdict needs 5 (:func:`flashnet.mlperf.rcp.hold_runs`).

Epochs here are samples seen / train images (MLPerf counts epochs over the whole set). The RCPs are
ImageNet-1k runs of ResNet-50: the comparison means something only for a run on ImageNet-1k, and the
table says so for every other run.
"""

from __future__ import annotations

from ..mlperf.rcp import RCP_SOURCE, rcp_mean
from ..resolve import IMAGENET_TRAIN_IMAGES
from .runs import RunResults
from .tables import NOT_REACHED, Table, format_count, format_duration

COMPARABLE_ONLY = "comparable only on ImageNet-1k"
MLPERF_CSV_COLUMNS = ("mlperf_division", "mlperf_time_to_train_s", "mlperf_valid", "mlperf_epochs_to_target")
RCP_NOTE = (f"Epochs to target as samples seen / train images, beside the record MLCommons' RCP checker "
            f"(mlperf-logging, {RCP_SOURCE}) holds this global batch against: its mean epochs to converge (a row's "
            "olympic mean, or interpolated between pruned rows) and the least olympic mean of a submission's 5 runs "
            "its t-test accepts. The checker judges 5 runs, not one: a single run below the least accepted mean "
            "only says a submission like it would need a closer look. The references are ResNet-50 on "
            f"ImageNet-1k: {COMPARABLE_ONLY}. Ratio above 1: the run needed more epochs than the reference mean "
            "(given for ImageNet-1k runs only).")
TIME_TO_TRAIN_NOTE = ("MLPerf time to train: run_start to run_stop of the run's mllog.txt (initialisation "
                      "excluded; evaluation included), valid only for a run that reached its target in one job "
                      "segment.")


def mlperf_figures(run: RunResults) -> dict:
    """summary.json's ``mlperf`` section ({} for a run trained before flashnet wrote MLPerf logs)."""
    return run.summary.get("mlperf") or {}


def mlperf_csv_fields(run: RunResults) -> dict[str, object]:
    m = mlperf_figures(run)
    return {"mlperf_division": m.get("division"), "mlperf_time_to_train_s": m.get("time_to_train_s"),
            "mlperf_valid": m.get("valid"), "mlperf_epochs_to_target": epochs_to_target(run)}


def format_time_to_train(run: RunResults) -> str:
    """``"52.3 s"``, ``"1 min 02 s (not valid: resumed)"``, ``"not reached"``, or ``"–"`` without a log."""
    m = mlperf_figures(run)
    if not m:
        return "–"
    if m.get("time_to_train_s") is None:
        return NOT_REACHED
    text = format_duration(m["time_to_train_s"])
    return text if m.get("valid") else f"{text} (not valid: resumed)"


def format_division(run: RunResults) -> str:
    """``"open"``, ``"closed"``, ``"closed (forced; breaks 3 closed rules)"``, or ``"–"`` without a log."""
    m = mlperf_figures(run)
    if not m:
        return "–"
    broken = m.get("closed_rules_broken") or []
    if m["division"] == "closed" and broken:
        return f"closed (forced; breaks {len(broken)} closed rule{'s' if len(broken) > 1 else ''})"
    return m["division"]


def epochs_to_target(run: RunResults) -> float | None:
    """Samples seen until the target was reached / train images; None if not reached or not known."""
    m = mlperf_figures(run)
    if m.get("epochs_to_target") is not None:
        return float(m["epochs_to_target"])
    s = run.summary
    if all(s.get(key) is not None for key in ("epochs_to_target", "steps_per_epoch", "train_samples")):
        return s["epochs_to_target"] * s["steps_per_epoch"] * run.global_batch / s["train_samples"]
    return None


def data_label(run: RunResults) -> str:
    samples = run.summary.get("train_samples")
    if samples == IMAGENET_TRAIN_IMAGES:
        return "ImageNet-1k"
    if samples is None:
        return "unknown: not comparable"
    return f"{samples:,} images: not comparable"


def rcp_rows(runs: list[RunResults]) -> list[dict[str, object]]:
    """One row per LARS run: its epochs to target, the RCP mean for its batch and how it was found."""
    rows = []
    for run in runs:
        if run.config["optimizer"] != "lars":
            continue
        rcp, epochs = rcp_mean(run.global_batch), epochs_to_target(run)
        comparable = run.summary.get("train_samples") == IMAGENET_TRAIN_IMAGES
        # A ratio on other data would read as a result; the row still shows both figures.
        ratio = epochs / rcp.mean if comparable and epochs is not None and rcp.mean is not None else None
        rows.append({"run": run.name, "global_batch": run.global_batch, "epochs_to_target": epochs,
                     "rcp_mean_epochs": rcp.mean, "rcp_min_epochs": rcp.min_epochs, "rcp_how": rcp.how,
                     "ratio": ratio, "data": data_label(run)})
    return rows


def rcp_table(runs: list[RunResults]) -> Table:
    rows = tuple(
        (r["run"], format_count(r["global_batch"]),
         NOT_REACHED if r["epochs_to_target"] is None else f"{r['epochs_to_target']:.2f}",
         "–" if r["rcp_mean_epochs"] is None else f"{r['rcp_mean_epochs']:.2f}",
         "–" if r["rcp_min_epochs"] is None else f"{r['rcp_min_epochs']:.2f}", r["rcp_how"],
         "–" if r["ratio"] is None else f"{r['ratio']:.2f}", r["data"])
        for r in rcp_rows(runs)
    )
    return Table(headers=("Run", "Global batch", "Epochs to target", "RCP mean epochs",
                          "Least accepted mean (5 runs)", "RCP for this batch", "Ratio", "Data"),
                 rows=rows, numeric=(False, True, True, True, True, False, True, False))
