"""``flashnet bench gpu``: its options, the device it runs on, and the run over the chosen configurations
(the package's docstring, flashnet/bench/gpu/__init__.py, says what each measures and how)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from flashnet.bench import gpu, write_report
from flashnet.bench.gpu.configs import (DEFAULT_BATCH_SIZES, DEFAULT_CONFIGS, RUN_ORDER, Scale, parse_batch_sizes,
                                        select_configs, smoke_batch_size)
from flashnet.bench.gpu.inputs import resolve_shards
from flashnet.bench.gpu.report import format_markdown, format_table, goal_summary, lightning_overhead, rows_of_batch
from flashnet.bench.gpu.runners import (Context, compile_modes_needed, failed_row, loops_of, release_memory,
                                        run_config)
from flashnet.bench.measure import (FLOP_PER_MAC, TRAIN_PASSES, describe_machine, forward_gmacs, measure_matmul,
                                    training_flops_per_image)

IMAGENET_CLASSES = 1000


def output_paths(out: Path) -> tuple[Path, Path]:
    """(JSON, markdown) for ``--out``: a folder gets gpu.json and gpu.md; a .json path its .md beside it."""
    if out.suffix == ".json":
        return out, out.with_suffix(".md")
    return out / "gpu.json", out / "gpu.md"


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """The JSON and the markdown table, rewritten after every configuration: a run stopped by a time
    limit keeps everything it measured."""
    json_path, markdown_path = output_paths(out)
    write_report(report, json_path)
    markdown_path.write_text(format_markdown(report))


def planned_rows(configs, batch_sizes) -> list[tuple[str, int, str]]:
    """(configuration, batch size, loop) of every row the run will write, in order."""
    return [(config.id, batch, loop) for batch in batch_sizes for config in configs for loop in loops_of(config)]


def run_benchmark(args: argparse.Namespace, scale: Scale, device: torch.device) -> dict[str, Any]:
    configs = select_configs(args.configs)
    batch_sizes = [smoke_batch_size(b) if scale.smoke else b for b in args.batch_sizes]
    flops = training_flops_per_image(scale.model, scale.image_size)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "gpu_throughput",
        "smoke": scale.smoke,
        "machine": describe_machine(device),
        "scale": dataclasses.asdict(scale),
        "batch_sizes": batch_sizes,
        "batch_sizes_asked": list(args.batch_sizes),
        "flop_per_image": flops,
        "flop_per_image_source": (f"{TRAIN_PASSES} passes x {FLOP_PER_MAC} FLOP/MAC x {forward_gmacs(scale.model)} GMAC "
                                  f"(torchvision {scale.model} weights meta '_ops') x ({scale.image_size}/224)^2"),
        "configs": [c.id for c in configs],
        "planned": [list(row) for row in planned_rows(configs, batch_sizes)],
        "time_budget_s": args.time_budget,
        "results": [],
        "complete": False,
    }
    with tempfile.TemporaryDirectory(prefix="flashnet-bench-gpu-") as tmp:
        shards = resolve_shards(args, scale, configs, Path(tmp))
        report["shards"] = str(Path(shards[0]).parent) if shards else None
        report["matmul_dtype"] = str(scale.matmul_dtype).removeprefix("torch.")
        report["matmul_tflops_start"] = measure_matmul(scale.matmul_size, device, scale.matmul_dtype)
        for batch in batch_sizes:
            batch_scale = dataclasses.replace(scale, batch_size=batch)
            ctx = Context(batch_scale, device, args.workers, shards, args.pipeline_compile_mode, flops,
                          report["matmul_tflops_start"], Path(tmp) / f"batch-{batch}", args.cold_read)
            for position, config in enumerate(configs):
                if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                    report["results"].extend(failed_row(config, loop, "skipped", f"time budget of {args.time_budget} s "
                                                        "spent", batch) for loop in loops_of(config))
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] batch {batch}, configuration {config.id}: {config.title}",
                      file=sys.stderr, flush=True)
                report["results"].extend(run_config(config, ctx, report["results"]))
                write_outputs(report, args.out)
                release_memory(ctx, compile_modes_needed(configs[position + 1:], args.pipeline_compile_mode,
                                                         report["results"], scale.smoke))
            release_memory(ctx, set())
        report["matmul_tflops_end"] = measure_matmul(scale.matmul_size, device, scale.matmul_dtype)
    report["matmul_tflops"] = report["matmul_tflops_start"]
    report["lightning_overhead"] = {str(batch): lightning_overhead(rows_of_batch(report["results"], batch))
                                    for batch in batch_sizes}
    report["goals"] = [{**goal, "batch_size": batch} for batch in batch_sizes
                       for goal in goal_summary(rows_of_batch(report["results"], batch))]
    report["complete"] = True
    report["seconds"] = round(time.monotonic() - started, 1)
    write_outputs(report, args.out)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashnet bench gpu", description=gpu.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default",
                        help=f"comma-separated ids ({','.join(RUN_ORDER)}), default ({','.join(DEFAULT_CONFIGS)}: "
                             "what a run can select) or all")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="per-device batch sizes, each measured over every configuration (--smoke: a sixteenth)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them (compile, autotuning)")
    parser.add_argument("--shards", type=Path, default=None, help="PATH/manifest.json of train shards")
    parser.add_argument("--make-shards", type=int, default=0, metavar="N",
                        help="first write N ImageNet-sized sample images as shards at --shards (reused if there)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="loader worker processes (default: all cores but two)")
    parser.add_argument("--pipeline-compile-mode", default="default",
                        choices=["auto", "none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="compile mode of configurations 3 and 4 (default: what `compile: true` does; none: "
                             "`compile: false`; auto: the fastest of 2/2r/2m measured)")
    parser.add_argument("--cold-read", default="auto", choices=["auto", "fadvise", "off"],
                        help="evict the shards from the page cache before each data configuration (auto: "
                             "drop_caches as root, else posix_fadvise per file; --smoke: fadvise)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no configuration after this many seconds (the rest are written as skipped)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu.json and gpu.md (or a .json path), rewritten after every "
                             "configuration (default: $OUT if set, else bench-gpu/)")
    parser.add_argument("--smoke", action="store_true",
                        help="ResNet-18, 32 px, each batch size a sixteenth, 2 steps, on the CPU: exercises every code path (CI)")
    args = parser.parse_args(argv)
    try:
        select_configs(args.configs)
        args.batch_sizes = parse_batch_sizes(args.batch_sizes)
    except ValueError as error:
        parser.error(str(error))
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("bench-gpu")
    if args.smoke and args.cold_read == "auto":
        args.cold_read = "fadvise"  # never drop a shared CI machine's whole page cache
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the timed window starts after a warm-up step)")
    if args.make_shards and args.shards is None:
        parser.error("--make-shards needs --shards PATH/manifest.json (where to write them)")
    return args


def scale_for(args: argparse.Namespace) -> Scale:
    """The model and problem size; ``batch_size`` is the first of --batch-sizes (each gets its own)."""
    if args.smoke:
        return Scale(model="resnet18", image_size=32, batch_size=smoke_batch_size(args.batch_sizes[0]), steps=2,
                     warmup=1, matmul_size=256, num_classes=10, smoke=True)
    return Scale(model="resnet50", image_size=224, batch_size=args.batch_sizes[0], steps=args.steps, warmup=args.warmup,
                 matmul_size=args.matmul_size, num_classes=IMAGENET_CLASSES, smoke=False)


@contextlib.contextmanager
def quiet_lightning():
    """Keep Lightning's banners and tips out of the table's log, and restore its loggers and the
    warning filters afterwards (``main`` also runs inside pytest). Lightning is imported first:
    its ``__init__`` sets its loggers to INFO."""
    import pytorch_lightning  # noqa: F401

    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pytorch_lightning.*")
        warnings.filterwarnings("ignore", module="lightning_fabric.*")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@contextlib.contextmanager
def own_process_group():
    """The world-size-1 process group the fit loops' DDP starts (Lightning keeps it until the process
    exits, and leaves its address and this process's ranks in MASTER_ADDR/MASTER_PORT, LOCAL_RANK,
    NODE_RANK, WORLD_SIZE...) ends with the run, and the environment is put back as it was: a later
    run or a test in the same process, or a child it starts (a submitit job refuses to export a
    LOCAL_RANK already set), would otherwise find the port taken or the ranks set."""
    import torch.distributed as dist

    before = dist.is_available() and dist.is_initialized()
    saved = dict(os.environ)
    try:
        yield
    finally:
        if not before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def torch_threads(count: int | None):
    """``torch.set_num_threads(count)`` for the block (no change for None)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = None
    if args.smoke:
        device = torch.device("cpu")
        args.workers = 1
        threads = 1  # on a shared 2-core CI machine, OpenMP's spinning threads slowed a step tenfold
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("flashnet bench gpu: no CUDA device here. This benchmark measures GPU training throughput; run it on a "
              "GPU machine (docs/benchmarks/gpu.md), or pass --smoke to exercise its code on the CPU.", file=sys.stderr)
        return 2
    with quiet_lightning(), torch_threads(threads), own_process_group():
        report = run_benchmark(args, scale_for(args), device)
    print(format_table(report))
    # A skipped configuration (no shards given) is the caller's choice; a failed one is an error.
    return 1 if any(row["status"] == "failed" for row in report["results"]) else 0

