"""report.html: one self-contained page (figures as data: URIs, inline CSS, no script, no requests).

The page shows the same tables as summary.md (built once, in :mod:`.summary` and :mod:`.projection`)
and every figure, so it can be mailed or archived as a single file.
"""

from __future__ import annotations

import base64
import datetime
from html import escape
from pathlib import Path

from . import projection as proj
from .plots import FIGURE_TITLES
from .references import PUBLISHED_LABEL, REFERENCES
from .runs import RunResults, UnfinishedRun
from .mlperf import COMPARABLE_ONLY, RCP_NOTE, TIME_TO_TRAIN_NOTE, rcp_table
from .summary import (TIMING_NOTE, UNFINISHED_NOTE, recipe_table, references_table, software_table, summary_table,
                      timing_table, unfinished_table)
from .tables import Table

# Sections in page order: (id, heading, figures shown in it).
SECTIONS = (
    ("runs", "Runs", ()),
    ("accuracy", "Accuracy", ("accuracy_vs_epoch", "accuracy_vs_time", "accuracy_vs_batch")),
    ("throughput", "Throughput", ("throughput",)),
    ("learning-rate", "Learning rate", ("lr_schedule",)),
    ("references", "Published reference points", ()),
    ("projection", "Projection", ()),
)

FIGURE_CAPTIONS = {
    "accuracy_vs_epoch": "Per-epoch validation top-1 (metrics.csv); dashed: the target top-1.",
    "accuracy_vs_time": "Per-epoch validation top-1 against training wall time (metrics.csv); "
                        "★ where each run first reached its target.",
    "accuracy_vs_batch": "Final top-1 (eval.json) of each run at its global batch size. Hollow diamonds: "
                         "published records with a stated batch size, not measured here.",
    "throughput": "Training images/s over all devices (steps.csv), validation and checkpoint writes left out; "
                  "dotted: each run's rate over its training steps (summary.json).",
    "lr_schedule": "Learning rate the optimizer used at each logged step (steps.csv).",
}

STYLE = """
:root { --ink: #1f2933; --muted: #5f6b7a; --line: #e3e7ec; --accent: #1f5fa8; --paper: #ffffff; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef1f5; color: var(--ink);
       font: 15px/1.55 "Inter", "Segoe UI", "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1160px; margin: 28px auto 48px; background: var(--paper); border-radius: 12px;
       box-shadow: 0 1px 3px rgba(15, 23, 42, 0.08), 0 8px 24px rgba(15, 23, 42, 0.06); overflow: hidden; }
header { padding: 32px 44px 22px; background: linear-gradient(120deg, #16325c, #1f5fa8); color: #fff; }
header h1 { margin: 0 0 6px; font-size: 30px; letter-spacing: -0.01em; }
header p { margin: 0; color: #dbe6f5; }
nav { margin-top: 16px; display: flex; flex-wrap: wrap; gap: 8px; }
nav a { color: #fff; text-decoration: none; font-size: 13px; padding: 3px 11px; border-radius: 999px;
        background: rgba(255, 255, 255, 0.14); }
section { padding: 10px 44px 22px; border-top: 1px solid var(--line); }
section:first-of-type { border-top: none; }
h2 { font-size: 22px; margin: 22px 0 10px; }
h3 { font-size: 16px; margin: 22px 0 8px; color: var(--muted); }
p { margin: 8px 0; }
.note { color: var(--muted); font-size: 13.5px; }
.badge { display: inline-block; font-size: 12px; font-weight: 600; letter-spacing: 0.03em; text-transform: uppercase;
         padding: 2px 10px; border-radius: 999px; margin: 0 0 8px; }
.badge.published { background: #fff4d6; color: #7a5200; border: 1px solid #f1d58a; }
.badge.estimate { background: #fde7e4; color: #8a2c1d; border: 1px solid #f2b8ae; }
.scroll { overflow-x: auto; margin: 8px 0 4px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { text-align: left; background: #f4f6f9; font-weight: 600; vertical-align: bottom; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num, td:first-child { white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td a { color: var(--accent); }
figure { margin: 14px 0 26px; }
figure img { display: block; width: 100%; max-width: 990px; height: auto; margin: 0 auto;
             border: 1px solid var(--line); border-radius: 8px; }
figcaption { max-width: 990px; margin: 6px auto 0; color: var(--muted); font-size: 13.5px; }
ul.assumptions { margin: 6px 0 12px; padding-left: 22px; }
ul.assumptions li { margin: 3px 0; }
.shares { margin: 14px 0 6px; }
.share { display: grid; grid-template-columns: 220px 1fr; gap: 12px; align-items: center; margin: 6px 0;
         font-size: 13.5px; }
.bar { display: flex; height: 22px; border-radius: 5px; overflow: hidden; background: var(--line); }
.bar span { display: block; color: #fff; font-size: 12px; line-height: 22px; padding: 0 6px; white-space: nowrap;
            overflow: hidden; }
.bar .compute { background: #2f7d4f; }
.bar .communication { background: #c2462e; }
.legend { font-size: 12.5px; color: var(--muted); }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin: 0 4px -1px 10px; }
footer { padding: 16px 44px 26px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line); }
"""


def data_uri(png: Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def html_table(table: Table, links: dict[tuple[int, int], str] | None = None) -> str:
    """A Table as HTML; ``links[(row, column)]`` turns that cell into a link."""
    links = links or {}

    def css(i: int) -> str:
        return ' class="num"' if table.numeric[i] else ""

    head = "".join(f"<th{css(i)}>{escape(h)}</th>" for i, h in enumerate(table.headers))
    body = []
    for r, row in enumerate(table.rows):
        cells = []
        for c, text in enumerate(row):
            content = escape(text)
            if (r, c) in links:
                content = f'<a href="{escape(links[(r, c)])}">{content}</a>'
            cells.append(f"<td{css(c)}>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def figure_html(name: str, png: Path) -> str:
    return (f'<figure id="figure-{name}"><img src="{data_uri(png)}" alt="{escape(FIGURE_TITLES[name])}">'
            f"<figcaption>{escape(FIGURE_CAPTIONS[name])}</figcaption></figure>")


def unfinished_html(unfinished: list[UnfinishedRun]) -> str:
    if not unfinished:
        return ""
    return (f'<h3 id="unfinished">Runs without results ({len(unfinished)})</h3>' + html_table(unfinished_table(unfinished))
            + f'<p class="note">{escape(UNFINISHED_NOTE)}</p>')


def runs_section_body(runs: list[RunResults], unfinished: list[UnfinishedRun] = ()) -> str:
    return (
        unfinished_html(unfinished)
        + html_table(summary_table(runs))
        + '<p class="note">Top-1 and top-5: final evaluation of the last checkpoint on every validation image '
          "exactly once (eval.json). Time to target: training time until the first validation (after each of the "
          "run's eval epochs) that reached the run's target, on the train time's clock; images/s is over training "
          "steps only (see below). "
        + escape(TIME_TO_TRAIN_NOTE) + "</p>"
        + '<h3 id="timing">Where the training time went</h3>' + html_table(timing_table(runs))
        + f'<p class="note">{escape(TIMING_NOTE)}</p>'
        + "<h3>Recipe and hardware</h3>" + html_table(recipe_table(runs))
        + "<h3>Software</h3>" + html_table(software_table(runs))
        + f'<h3 id="rcp">MLPerf reference convergence points</h3><p class="badge published">{escape(COMPARABLE_ONLY)}'
          f'</p><p class="note">{escape(RCP_NOTE)}</p>' + html_table(rcp_table(runs))
    )


def references_section_body() -> str:
    table = references_table()
    source = table.headers.index("Source")
    links = {(i, source): ref.url for i, ref in enumerate(REFERENCES)}
    return (f'<p class="badge published">{escape(PUBLISHED_LABEL)}</p>'
            "<p>Large-batch ResNet-50 records on ImageNet-1k, as their sources state them. None of them was run by "
            "this workflow; they set the scale our runs are compared with.</p>" + html_table(table, links))


def bar_segment(kind: str, label: str, percent: float) -> str:
    """One coloured part of a share bar; the label is written inside only where it fits."""
    text = f"{label} {percent:.0f}%" if percent >= 12 else ""
    return (f'<span class="{kind}" style="width:{percent:.2f}%" title="{label} {percent:.1f}%">'
            f"{escape(text)}</span>")


def share_bars(projections: list[proj.Projection]) -> str:
    """Compute and communication share of a projected step, as CSS bars (no script needed)."""
    rows = []
    for p in projections:
        compute, communication = 100 * p.compute_share, 100 * p.communication_share
        rows.append(
            f'<div class="share"><span>{escape(p.run)}: {compute:.0f}% : {communication:.0f}%</span>'
            f'<div class="bar" role="img" aria-label="compute {compute:.0f}%, all-reduce {communication:.0f}%">'
            + bar_segment("compute", "compute", compute) + bar_segment("communication", "all-reduce", communication)
            + "</div></div>"
        )
    legend = ('<div class="legend">Share of each projected step:<i style="background:#2f7d4f"></i>compute'
              '<i style="background:#c2462e"></i>gradient all-reduce</div>')
    return f'<div class="shares">{legend}{"".join(rows)}</div>'


def projection_section_body(projections: list[proj.Projection], settings: proj.ProjectionSettings) -> str:
    assumptions = "".join(f"<li>{escape(line)}</li>" for line in proj.projection_assumptions(settings))
    comparisons = "".join(f"<li>{escape(line)}</li>" for line in proj.fujitsu_comparisons(projections))
    return (
        '<p class="badge estimate">estimate, not a measurement</p>'
        f"<p>{escape(proj.projection_intro(settings))}</p>"
        f'<h3>Assumptions</h3><ul class="assumptions">{assumptions}</ul>'
        + html_table(proj.projection_table(projections)) + share_bars(projections)
        + f'<h3>Beside Fujitsu\'s published 74.7 s</h3><ul class="assumptions">{comparisons}</ul>'
    )


def render_report(runs: list[RunResults], projections: list[proj.Projection], settings: proj.ProjectionSettings,
                  figures: dict[str, Path], generated_at: datetime.datetime,
                  unfinished: list[UnfinishedRun] = ()) -> str:
    """The whole page as a string."""
    bodies = {
        "runs": runs_section_body(runs, unfinished),
        "references": references_section_body(),
        "projection": projection_section_body(projections, settings),
    }
    sections = []
    for section_id, heading, names in SECTIONS:
        body = bodies.get(section_id, "") + "".join(figure_html(name, figures[name]) for name in names)
        sections.append(f'<section id="{section_id}"><h2>{escape(heading)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{section_id}">{escape(heading)}</a>' for section_id, heading, _ in SECTIONS)
    hardware = sorted({f"{run.summary['device_name']} ({run.summary['accelerator']})" for run in runs})
    of_total = f" of {len(runs) + len(unfinished)}" if unfinished else ""
    subtitle = (f"{len(runs)}{of_total} run{'s' if len(runs) + len(unfinished) != 1 else ''} on {', '.join(hardware)} · "
                f"generated {generated_at:%Y-%m-%d %H:%M} UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>flashnet report</title><style>{STYLE}</style></head><body><main>"
        f"<header><h1>flashnet report</h1><p>{escape(subtitle)}</p><nav>{nav}</nav></header>"
        + "".join(sections)
        + "<footer>ResNet training on ImageNet shards (WebDataset) with LARS, mixed precision and DDP, "
          "written by the flashnet workflow. Tables as CSV beside this page: summary.csv, references.csv, "
          "projection.csv.</footer></main></body></html>\n"
    )
