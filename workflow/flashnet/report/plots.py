"""The report's figures: accuracy against epoch, time and batch size; throughput; the LR schedule.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing depends on a display
or on global pyplot state. Each run keeps one colour in every figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from .references import REFERENCES
from .runs import RunResults
from .tables import format_rate

FIGURE_SIZE_IN = (9.0, 5.4)
DPI = 110
STYLE = {
    "font.size": 11,
    "axes.titlesize": 14,
    "axes.titleweight": "bold",
    "axes.labelsize": 11.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dde1e6",
    "grid.linewidth": 0.8,
    "legend.fontsize": 9.5,
    "legend.frameon": False,
}
# name (the PNG's stem, as in flashnet.pipeline.REPORT_FIGURES) -> title, in the order the report shows them.
FIGURE_TITLES = {
    "accuracy_vs_epoch": "Validation top-1 against epoch",
    "accuracy_vs_time": "Validation top-1 against training time",
    "accuracy_vs_batch": "Final top-1 against global batch size",
    "throughput": "Training throughput",
    "lr_schedule": "Learning-rate schedule (as used)",
}
TARGET_COLOUR = "#6b7280"
REFERENCE_COLOUR = "#374151"


def run_colours(runs: list[RunResults]) -> dict[str, str]:
    """One colour per run, the same in every figure (matplotlib's tab10, in run order)."""
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    return {run.name: palette[i % len(palette)] for i, run in enumerate(runs)}


def run_label(run: RunResults) -> str:
    return f"{run.name} ({run.config['model']}, batch {run.global_batch:,}, {run.summary['world_size']} × " \
           f"{run.summary['accelerator']})"


def time_axis(max_seconds: float) -> tuple[float, str]:
    """(divisor, unit) that keeps a time axis readable: seconds up to 2 min, minutes up to 2 h, then hours."""
    if max_seconds <= 120:
        return 1.0, "s"
    if max_seconds <= 7200:
        return 60.0, "min"
    return 3600.0, "h"


# Tick positions of a logarithmic time axis, in seconds: durations people say.
NICE_DURATIONS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 4 * 3600, 12 * 3600, 86400,
                    2 * 86400, 4 * 86400, 7 * 86400)
WIDE_RANGE = 30  # a quantity spanning more than this factor across runs goes on a log axis


def spans_wide_range(values: list[float]) -> bool:
    """True when the positive ``values`` differ by more than WIDE_RANGE× (e.g. a CPU run beside a GPU run)."""
    positive = [v for v in values if v > 0 and np.isfinite(v)]
    return bool(positive) and max(positive) / min(positive) > WIDE_RANGE


def short_duration(seconds: float) -> str:
    """Tick label: ``"30 s"``, ``"5 min"``, ``"2 h"``, ``"1 d"``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def set_time_axis(axes: Axes, longest_s: list[float], xlabel: str) -> float:
    """Scale the x axis for wall times: linear in s/min/h, or logarithmic in seconds with duration ticks
    when the runs' lengths differ widely. Returns the divisor to apply to seconds."""
    if spans_wide_range(longest_s):
        axes.set_xscale("log")
        axes.set_xlabel(f"{xlabel} (log scale)")
        axes.xaxis.set_major_locator(FixedLocator(NICE_DURATIONS_S))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: short_duration(value)))
        axes.xaxis.set_minor_locator(NullLocator())
        return 1.0
    divisor, unit = time_axis(max(longest_s))
    axes.set_xlabel(f"{xlabel} ({unit})")
    return divisor


def start_at_zero(axes: Axes) -> None:
    """A linear x axis starts at 0 (call after plotting: fixing a limit stops autoscaling)."""
    if axes.get_xscale() == "linear":
        axes.set_xlim(left=0)


def new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title, loc="left")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    return figure, axes


def place_legend(figure: Figure, axes: Axes) -> None:
    """The legend below the plot, outside the axes, so it never hides a curve however many runs there are."""
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", ncols=2)


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return path


def percent_axis(axes: Axes, highest_fraction: float) -> None:
    """y in percent, from 0 to a little above the highest value shown (at most 100%)."""
    axes.set_ylim(0, min(100.0, 100 * highest_fraction + 8))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0f}%"))


def draw_targets(axes: Axes, runs: list[RunResults]) -> None:
    """One dashed line per distinct target top-1, labelled with the runs that aim at it."""
    targets: dict[float, list[str]] = {}
    for run in runs:
        targets.setdefault(float(run.summary["target_top1"]), []).append(run.name)
    dashes = [(6, 3), (2, 2), (8, 3, 2, 3)]
    for i, (target, names) in enumerate(sorted(targets.items())):
        who = "" if len(targets) == 1 else f" ({', '.join(names)})"
        axes.axhline(100 * target, color=TARGET_COLOUR, linestyle=(0, dashes[i % len(dashes)]), linewidth=1.2,
                     label=f"target {100 * target:g}%{who}")


def highest_accuracy(runs: list[RunResults]) -> float:
    values = [float(np.nanmax(run.metrics["val_top1"])) for run in runs if np.isfinite(run.metrics["val_top1"]).any()]
    values += [float(run.summary["target_top1"]) for run in runs]
    return max(values)


def finish_accuracy_figure(figure, axes, runs: list[RunResults], path: Path) -> Path:
    """The target line(s), a percent axis from 0 to just above the best accuracy, the legend; saved."""
    draw_targets(axes, runs)
    percent_axis(axes, highest_accuracy(runs))
    start_at_zero(axes)
    place_legend(figure, axes)
    return save(figure, path)


def plot_accuracy_vs_epoch(runs: list[RunResults], path: Path) -> Path:
    """Per-epoch validation top-1 (metrics.csv) against completed epochs, with the target line(s)."""
    colours = run_colours(runs)
    with rc_context(STYLE):
        figure, axes = new_axes(FIGURE_TITLES["accuracy_vs_epoch"], "epoch (completed)", "validation top-1 (%)")
        for run in runs:
            m = run.metrics
            axes.plot(m["epoch"], 100 * m["val_top1"], marker="o", markersize=3.5, linewidth=2,
                      color=colours[run.name], label=run_label(run))
        return finish_accuracy_figure(figure, axes, runs, path)


def plot_accuracy_vs_time(runs: list[RunResults], path: Path) -> Path:
    """Per-epoch validation top-1 against training wall time; a star where each run reached its target."""
    colours = run_colours(runs)
    with rc_context(STYLE):
        figure, axes = new_axes(FIGURE_TITLES["accuracy_vs_time"], "", "validation top-1 (%)")
        divisor = set_time_axis(axes, [float(np.nanmax(run.metrics["wall_s"])) for run in runs], "training time")
        for run in runs:
            m = run.metrics
            colour = colours[run.name]
            axes.plot(m["wall_s"] / divisor, 100 * m["val_top1"], marker="o", markersize=3.5, linewidth=2,
                      color=colour, label=run_label(run))
            reached = run.summary["time_to_target_s"]
            if reached is not None:
                axes.plot([reached / divisor], [100 * run.summary["target_top1"]], marker="*", markersize=15,
                          color=colour, markeredgecolor="black", markeredgewidth=0.6, linestyle="none",
                          label=f"{run.name} reached target")
        return finish_accuracy_figure(figure, axes, runs, path)


def plot_accuracy_vs_batch(runs: list[RunResults], path: Path) -> Path:
    """Final top-1 (eval.json) against global batch size: our runs filled, published records hollow."""
    colours = run_colours(runs)
    with rc_context(STYLE):
        figure, axes = new_axes(FIGURE_TITLES["accuracy_vs_batch"], "global batch size (images, log scale)",
                                "top-1 (%)")
        for run in runs:
            top1 = 100 * float(run.evaluation["top1"])
            axes.plot([run.global_batch], [top1], marker="o", markersize=10, linestyle="none",
                      color=colours[run.name], label=f"{run.name} (measured)")
            axes.annotate(run.name, (run.global_batch, top1), xytext=(8, -4), textcoords="offset points")
        published = [r for r in REFERENCES if r.batch_size is not None]
        for i, ref in enumerate(published):
            axes.plot([ref.batch_size], [100 * ref.top1], marker="D", markersize=9, linestyle="none",
                      markerfacecolor="none", markeredgecolor=REFERENCE_COLOUR, markeredgewidth=1.6,
                      label="published, not measured here" if i == 0 else None)
            axes.annotate(f"{ref.name} ({ref.devices:,} {ref.device_name})", (ref.batch_size, 100 * ref.top1),
                          xytext=(-8, 8), textcoords="offset points", ha="right", color=REFERENCE_COLOUR,
                          fontsize=9.5)
        draw_targets(axes, runs)
        batches = [run.global_batch for run in runs] + [r.batch_size for r in published]
        axes.set_xscale("log", base=2)
        axes.set_xlim(min(batches) / 2, max(batches) * 2)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        tops = [float(run.evaluation["top1"]) for run in runs] + [r.top1 for r in published]
        percent_axis(axes, max(tops + [float(run.summary["target_top1"]) for run in runs]))
        place_legend(figure, axes)
        return save(figure, path)


def plot_throughput(runs: list[RunResults], path: Path) -> Path:
    """Training images/s over all devices (steps.csv) against wall time; dotted: each run's rate over its
    training steps (summary.json's images_per_s).

    Rates or lengths that differ widely across runs (CPU beside GPU) go on log axes."""
    colours = run_colours(runs)
    with rc_context(STYLE):
        figure, axes = new_axes(FIGURE_TITLES["throughput"], "", "images/s (all devices)")
        # Steps logged at time 0 cannot sit on a log axis; they carry no rate worth showing anyway.
        divisor = set_time_axis(axes, [float(np.nanmax(run.steps["wall_s"], initial=0.0)) or
                                       float(run.summary["train_seconds"]) for run in runs], "training time")
        for run in runs:
            s = run.steps
            colour = colours[run.name]
            shown = s["wall_s"] > 0
            axes.plot(s["wall_s"][shown] / divisor, s["images_per_s"][shown], linewidth=1.6, color=colour,
                      label=run_label(run))
            mean = float(run.summary["images_per_s"])
            axes.axhline(mean, color=colour, linestyle=":", linewidth=1.4,
                         label=f"{run.name} over training steps: {format_rate(mean)} images/s")
        start_at_zero(axes)
        if spans_wide_range([float(run.summary["images_per_s"]) for run in runs]):
            axes.set_yscale("log")
            axes.set_ylabel("images/s (all devices, log scale)")
        else:
            axes.set_ylim(bottom=0)
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
        place_legend(figure, axes)
        return save(figure, path)


def steps_per_epoch(run: RunResults) -> float:
    # summary.json's own count: steps ÷ epochs would be wrong for a run that stopped at its target.
    return float(run.summary["steps_per_epoch"])


def plot_lr_schedule(runs: list[RunResults], path: Path) -> Path:
    """The learning rate the optimizer actually used (steps.csv), against epochs so that runs with
    different batch sizes line up (epoch = step ÷ the run's steps per epoch)."""
    colours = run_colours(runs)
    with rc_context(STYLE):
        figure, axes = new_axes(FIGURE_TITLES["lr_schedule"], "epoch (optimizer step ÷ steps per epoch)",
                                "learning rate")
        for run in runs:
            s = run.steps
            axes.plot(s["step"] / steps_per_epoch(run), s["lr"], linewidth=2, color=colours[run.name],
                      label=f"{run_label(run)}, {run.config['optimizer'].upper()}")
        start_at_zero(axes)
        axes.set_ylim(bottom=0)
        place_legend(figure, axes)
        return save(figure, path)


FIGURE_WRITERS = {
    "accuracy_vs_epoch": plot_accuracy_vs_epoch,
    "accuracy_vs_time": plot_accuracy_vs_time,
    "accuracy_vs_batch": plot_accuracy_vs_batch,
    "throughput": plot_throughput,
    "lr_schedule": plot_lr_schedule,
}


def write_figures(runs: list[RunResults], out_dir: Path) -> dict[str, Path]:
    """Every figure as ``out_dir/<name>.png``; returns name → path."""
    return {name: writer(runs, Path(out_dir) / f"{name}.png") for name, writer in FIGURE_WRITERS.items()}
