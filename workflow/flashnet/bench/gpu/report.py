"""What a run's rows add up to: issue 6's goals, Lightning's overhead, and the printed table."""

from __future__ import annotations

from typing import Any

from flashnet.bench.gpu.configs import RUN_ORDER, SYNTHETIC_COMPILED

# Goals of issue 6 (docs/benchmarks/gpu.md explains them).
GOAL_PROJECT_OVER_REFERENCE = 1.3
GOAL_SHARDS_OVER_SYNTHETIC = 0.95
GOAL_MOONSHOT_IMAGES_PER_S = 7000


def goal_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6's goals against the measured rows (a goal whose rows are missing is left out):

    * the project's best synthetic step through Trainer.fit over the plain reference 5 (≥ 1.3×);
    * each shard pipeline over the synthetic step with the same compile mode in the same loop
      (≥ 95%): through Trainer.fit, or by hand where fit failed (the hand-written loop shows what
      the pipeline does once fit works);
    * the best end-to-end rate, either loop, against MLPerf's level (≥ 7,000 images/s)."""
    ok = {(r["config"], r["loop"]): r for r in rows if r["status"] == "ok"}
    goals = []

    def synthetic(loop: str) -> list[dict[str, Any]]:
        return [ok[(c, loop)] for c in SYNTHETIC_COMPILED + ("2e", "1") if (c, loop) in ok]

    reference, fitted = ok.get(("5", "manual")), synthetic("fit")
    if reference and fitted:
        best = max(fitted, key=lambda r: r["images_per_s"])
        goals.append(goal(f"project step ({best['config']}, fit) / plain reference (5)",
                          best["images_per_s"] / reference["images_per_s"], GOAL_PROJECT_OVER_REFERENCE))
    for pipeline in ("3", "4"):
        loop = next((loop for loop in ("fit", "manual") if (pipeline, loop) in ok), None)
        if loop is None:
            continue
        row = ok[(pipeline, loop)]
        same_mode = [r for r in synthetic(loop) if r["settings"].get("compile") == row["settings"].get("compile")]
        if same_mode:
            goals.append(goal(f"shards ({pipeline}, {loop}) / synthetic ({same_mode[0]['config']}, {loop})",
                              row["images_per_s"] / same_mode[0]["images_per_s"], GOAL_SHARDS_OVER_SYNTHETIC))
    end_to_end = [r for (config, _), r in ok.items() if config in ("3", "4")]
    if end_to_end:
        best = max(end_to_end, key=lambda r: r["images_per_s"])
        goals.append(goal(f"best end-to-end images/s ({best['config']}, {best['loop']})", best["images_per_s"],
                          GOAL_MOONSHOT_IMAGES_PER_S))
    return goals


def goal(name: str, value: float, target: float) -> dict[str, Any]:
    return {"goal": name, "value": value, "target": target, "met": value >= target}


def lightning_overhead(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per project configuration: 1 − (Trainer.fit images/s) / (manual loop images/s)."""
    ok = {(r["config"], r["loop"]): r for r in rows if r["status"] == "ok"}
    return {config: 1 - ok[(config, "fit")]["images_per_s"] / ok[(config, "manual")]["images_per_s"]
            for config in RUN_ORDER if (config, "fit") in ok and (config, "manual") in ok}


def _number(value: float | None, spec: str, scale: float = 1.0) -> str:
    """``value × scale`` formatted by ``spec`` (e.g. "8.1f"), or a dash of the same width."""
    if value is None:
        return "-".rjust(int(spec.split(".")[0].rstrip("df")))
    return format(value * scale if scale != 1.0 else value, spec)


def rows_of_batch(rows: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """The rows measured at one per-device batch size (goals and overheads compare within one)."""
    return [row for row in rows if row.get("batch_size") == batch_size]


def header_lines(report: dict[str, Any]) -> list[str]:
    """Machine, versions, date, problem size and the matmul ceiling: what every figure depends on."""
    machine, scale = report["machine"], report["scale"]
    lines = []
    if report["smoke"]:
        lines.append("SMOKE RUN (CPU, tiny model, bf16/fp16 configurations in 32-true, batch sizes a sixteenth): "
                     "checks the code paths; these numbers are NOT performance figures.")
    if machine["device"] == "cuda":
        lines.append(f"GPU: {machine['gpu']} ({machine['gpu_multiprocessors']} SMs, {machine['gpu_memory_gib']} GiB), "
                     f"driver {machine['driver']}, power limit {machine['gpu_power_limit_w']} W, CUDA {machine['cuda']}, "
                     f"cuDNN {machine['cudnn']}")
    lines.append(f"host: {machine['host_cpu']}, {machine['host_cores']} cores; torch {machine['torch']}, "
                 f"torchvision {machine['torchvision']}, pytorch-lightning {machine['pytorch_lightning']}; "
                 f"{machine['date']}")
    lines.append(f"{scale['model']} at {scale['image_size']} px, per-device batch "
                 f"{', '.join(map(str, report['batch_sizes']))}, {scale['steps']} timed steps after {scale['warmup']} "
                 "warm-up (data configs: see 'warmup' in the JSON)")
    end = report.get("matmul_tflops_end")
    lines.append(f"{report['matmul_dtype']} matmul {scale['matmul_size']}^3: {report['matmul_tflops_start']:.4g} TFLOP/s "
                 f"at the start, " + (f"{end:.4g} at the end" if end is not None else "run not finished"))
    lines.append(f"FLOP per image: {report['flop_per_image'] / 1e9:.2f} G = {report['flop_per_image_source']}")
    return lines


def format_table(report: dict[str, Any]) -> str:
    lines = header_lines(report)
    lines.append("")
    header = (f"{'cfg':<4}{'batch':>6} {'loop':<8}{'images/s':>10}{'ms/step':>9}{'TFLOP/s':>9}{'%matmul':>8}{'optim%':>8}"
              f"{'wait%':>7}{'syncs':>6}{'GiB':>6}  what")
    lines.append(header)
    for row in report["results"]:
        batch = row.get("batch_size")
        if row["status"] != "ok":
            lines.append(f"{row['config']:<4}{batch or '-':>6} {row['loop']:<8}{row['status'].upper():>10}  "
                         f"{row['title']}: {row['error']}")
            continue
        lines.append(
            f"{row['config']:<4}{batch:>6} {row['loop']:<8}{row['images_per_s']:>10.1f}{row['ms_per_step']:>9.2f}"
            f"{_number(row['tflops'], '9.2f')}{_number(row['fraction_of_matmul'], '8.1f', 100)}"
            f"{_number(row['optimizer_share'], '8.1f', 100)}{_number(row['data_wait_share'], '7.1f', 100)}"
            f"{_number(row['host_syncs_per_step'], '6d')}{_number(row['peak_memory_gib'], '6.1f')}  {row['title']}"
            + ("" if row["loss_finite"] in (None, True) else "  [loss went non-finite]")
        )
    for batch, overhead in (report.get("lightning_overhead") or {}).items():
        if overhead:
            lines.append("")
            lines.append(f"batch {batch}: Lightning overhead (1 - fit/manual; fit adds DDP and the run's callbacks): "
                         + ", ".join(f"{config}: {share * 100:+.1f}%" for config, share in overhead.items()))
    sites = sorted({site for row in report["results"] if row.get("sync_sites") for site in row["sync_sites"]})
    if sites:
        lines.append("host-device syncs per step come from: " + ", ".join(sites))
    if report.get("goals"):
        lines.append("")
        if report["smoke"]:
            lines.append("(smoke run: the goals are evaluated to exercise the code; these lines say nothing about them)")
        for goal in report["goals"]:
            value = f"{goal['value']:.0f}" if goal["target"] > 100 else f"{goal['value']:.2f}"
            lines.append(f"goal (batch {goal['batch_size']}): {goal['goal']} = {value} (target {goal['target']}): "
                         f"{'MET' if goal['met'] else 'not met'}")
    return "\n".join(lines)


def _cell(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def format_markdown(report: dict[str, Any]) -> str:
    """The table as markdown, for docs/benchmarks/gpu.md: written after every configuration, so a
    run cut short shows what it measured (and says it was cut short)."""
    lines = ["# flashnet bench gpu", ""]
    lines += [f"- {line}" for line in header_lines(report)]
    if not report.get("complete"):
        done = len(report["results"])
        lines.append(f"- **partial**: {done} of {len(report.get('planned', []))} planned rows written so far")
    lines += ["", "| cfg | batch | loop | precision | compile | data | page cache | images/s | ms/step | TFLOP/s "
                  "| % matmul | optim % | wait % | syncs | GiB | status |",
              "| --- | ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in report["results"]:
        settings = row.get("settings", {})
        cells = [row["config"], str(row.get("batch_size") or ""), row["loop"], str(settings.get("precision", "")),
                 str(settings.get("compile") or ("eager" if settings else "")), str(settings.get("data", "synthetic"
                 if settings else "")), str(settings.get("page_cache") or "")]
        if row["status"] == "ok":
            cells += [_cell(row["images_per_s"], ".1f"), _cell(row["ms_per_step"], ".2f"), _cell(row["tflops"], ".2f"),
                      _cell(row["fraction_of_matmul"], ".1f", 100), _cell(row["optimizer_share"], ".1f", 100),
                      _cell(row["data_wait_share"], ".1f", 100), _cell(row["host_syncs_per_step"], "d"),
                      _cell(row["peak_memory_gib"], ".1f"), "ok"]
        else:
            cells += [""] * 8 + [f"{row['status']}: {row['error']}".replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
