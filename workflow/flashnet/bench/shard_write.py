"""Shard conversion throughput against GNU tar archiving the same files.

    .venv/bin/python -m flashnet.bench.shard_write [--images 4000] [--jobs 1 2] [--repeats 3]
        [--workdir DIR] [--keep] [--also REV] [--profile] [--out results.json]
    flashnet bench shards [same options]

Inputs: ``--images`` JPEGs the size of ImageNet's photos (sides 300–500 px, quality 90), drawn by
the sample-data generator in the extracted layout (a file per image, as tar wants them) and without
the odd files, so every image passes the check and keeps its bytes (``max_side`` off): the case
in which conversion comes closest to a copy. They are indexed and shuffled as the pipeline does
(256 samples per shard unless ``--samples-per-shard``).

Measured, in the same run, the candidates taking turns within every repeat (so a busy spell on a
shared machine falls on all of them), with 1 and 2 parallel jobs (processes):

  tar -cf             GNU tar archiving the same files, in the same (shuffled) order, one archive
                      per job (the job's share of the samples)
  tar -cf + fsync     the same, plus an fsync of the archive afterwards (write_part fsyncs every
                      shard, tar does not)
  write_part          flashnet.data.shards.write_part: read, check (libjpeg-turbo strict decode at
                      1/8 scale), write the tar, sha256, fsync, journal
  write_part (check: header)   the same with ``shards.check: header``: JPEG header and
                      end-of-image marker only, no decode
  check only          prepare_image over the same samples, nothing written: the check's share
  write_part, no check   write_part with prepare_image replaced by a pass-through: what the writer
                      costs around the check (a diagnostic; the pipeline never skips the check)
  --also REV          write_part of another git revision (e.g. the commit before a change), whole
                      package, one process per job started with its imports done before the
                      clock starts, as the forks are (bench/revision.py)

The page cache is warm for all of them: every input file is read once before the first
measurement, and the inputs (~200 MB for 4000 images) fit in memory many times over. Conversion
processes are forked from this one with everything imported, and wait at a barrier, so interpreter
start-up and imports are not timed; tar is started as a process per job. Per process: its
samples / its own time; total: all samples / wall time until the last job ends. Figures are
medians over the repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import datetime
import io
import json
import math
import multiprocessing
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL
import simplejpeg
from PIL import features

from flashnet.bench import write_report
from flashnet.bench.revision import RevisionError, RevisionWorker, exported
from flashnet.data import sample, shards, sources
from flashnet.machine import cpu_model

INPUT_SIDES = (300, 500)
INPUT_QUALITY = 90
INPUT_CLASSES = 10
GOAL = 0.5  # conversion's per-process rate, as a fraction of tar's, with bytes kept


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashnet bench shards", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="input JPEGs (rounded up to a multiple of 10)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the inputs and outputs (default: a new temporary one); images left "
                             "there by an earlier --keep run with the same --images are reused")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="parallel jobs to time")
    parser.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the generated images and index for a later run")
    parser.add_argument("--also", action="append", default=[], metavar="REV",
                        help="time write_part of this git revision too, in processes of its own (repeatable)")
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip the 'check only' and 'no check' rows")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one write_part job")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- inputs


def input_spec(images: int) -> sample.SampleSpec:
    return sample.SampleSpec(classes=INPUT_CLASSES, train_per_class=math.ceil(images / INPUT_CLASSES),
                             val_per_class=1, min_side=INPUT_SIDES[0], max_side=INPUT_SIDES[1],
                             quality=INPUT_QUALITY, odd_files=False, seed=0)


def prepare_inputs(workdir: Path, images: int) -> Path:
    """The generated images (extracted layout) under ``workdir``, reused when a marker file says
    they were made with the same spec."""
    data_dir = workdir / "imagenet-like"
    marker = workdir / "imagenet-like.json"
    spec = asdict(input_spec(images))
    if marker.exists() and json.loads(marker.read_text()) == spec and data_dir.is_dir():
        return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    print(f"generating {spec['classes'] * spec['train_per_class']} images under {data_dir} …", file=sys.stderr)
    sample.write_sample_data(data_dir, input_spec(images), layouts=("extracted",))
    marker.write_text(json.dumps(spec))
    return data_dir


def read_all(data_dir: Path, index: sources.SplitIndex) -> int:
    """Read every input once, so the page cache is warm for every candidate; returns the bytes."""
    total = 0
    for name in index.files:
        total += len((data_dir / name).read_bytes())
    return total


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    what: str
    jobs: int
    seconds: list[float]  # each process's own time
    samples: list[int]  # each process's samples
    wall: float


def part_positions(plan: shards.ShardPlan, part: int, parts: int) -> list[int]:
    return [p for shard in plan.part_shards(part, parts) for p in plan.shard_positions(shard)]


def fresh_run_dir(workdir: Path, index_path: Path) -> tuple[Path, Path]:
    """An empty folder holding a copy of the index (shards are written next to their index)."""
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "parts").mkdir(parents=True)
    shutil.copy(index_path, run_dir / "index.json")
    return run_dir, run_dir / "index.json"


def _die_with_parent() -> None:
    """Linux: have the kernel end this forked worker when the benchmark itself is killed, rather
    than leave it writing shards (or waiting at the barrier) on its own."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(job: Callable[[int], int], part: int, barrier, results) -> None:
    _die_with_parent()
    # Silence the progress lines; an error comes back through the queue instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    barrier.wait()
    start = time.perf_counter()
    try:
        samples = job(part)
        results.put((part, time.perf_counter() - start, samples, None))
    except BaseException as error:  # noqa: BLE001 - reported by the parent
        results.put((part, 0.0, 0, f"{type(error).__name__}: {error}"))


def time_processes(what: str, jobs: int, job: Callable[[int], int]) -> Timing:
    """Run ``job(part)`` for every part in its own forked process, all released together."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(jobs + 1), context.Queue()
    processes = [context.Process(target=_worker, args=(job, part, barrier, results)) for part in range(jobs)]
    for process in processes:
        process.start()
    barrier.wait()
    start = time.perf_counter()
    reports = sorted(results.get() for _ in processes)
    wall = time.perf_counter() - start
    for process in processes:
        process.join()
    errors = [error for *_, error in reports if error]
    if errors:
        raise RuntimeError(f"{what}: {errors[0]}")
    return Timing(what, jobs, [r[1] for r in reports], [r[2] for r in reports], wall)


def time_write_part(what: str, workdir: Path, index_path: Path, jobs: int,
                    check: str | None = "decode") -> Timing:
    """``check`` None replaces prepare_image by a pass-through (a diagnostic)."""
    run_dir, run_index = fresh_run_dir(workdir, index_path)

    def job(part: int) -> int:
        options = {}
        if check is None:
            # this forked child's module only: the benchmark's own stays as it is
            shards.prepare_image = lambda data, max_side, quality, check="decode": (data, None, False)
        elif check != "decode":
            options["check"] = check
        result = shards.write_part(run_index, part, jobs, run_dir / "parts" / f"{part}.json", None, INPUT_QUALITY,
                                   **options)
        return sum(record["samples"] for record in result["shards"])

    try:
        return time_processes(what, jobs, job)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def time_write_part_at(what: str, package_root: Path, workdir: Path, index_path: Path, jobs: int) -> Timing:
    """write_part of another revision (exported at ``package_root``): a worker process per part,
    each with its imports done before the clock starts, all released together, as time_processes
    releases its forks."""
    run_dir, run_index = fresh_run_dir(workdir, index_path)
    workers = [RevisionWorker("write_part.py", package_root, {
        "index": str(run_index), "part": part, "parts": jobs, "journal": str(run_dir / "parts" / f"{part}.json"),
        "quality": INPUT_QUALITY}, quiet=True) for part in range(jobs)]
    try:
        for worker in workers:
            worker.answer()  # ready
        start = time.perf_counter()
        for worker in workers:
            worker.send({"start": True})
        reports = [worker.answer() for worker in workers]
        wall = time.perf_counter() - start
    finally:
        for worker in workers:
            worker.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return Timing(what, jobs, [r["seconds"] for r in reports], [r["samples"] for r in reports], wall)


def time_check_only(plan: shards.ShardPlan, jobs: int) -> Timing:
    def job(part: int) -> int:
        reader = shards.SampleReader(plan)
        positions = part_positions(plan, part, jobs)
        for position in positions:
            shards.prepare_image(reader.read(position), None, INPUT_QUALITY)
        reader.close()
        return len(positions)

    return time_processes("check only (prepare_image)", jobs, job)


def time_tar(workdir: Path, plan: shards.ShardPlan, jobs: int) -> tuple[Timing, Timing]:
    """GNU tar of each job's files (one process per job), then an fsync of each archive: returns
    the timings without and with the fsync, from the same runs."""
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    index = plan.index
    tar_s, sync_s, counts = [0.0] * jobs, [0.0] * jobs, [0] * jobs
    errors = []

    def job(part: int) -> None:
        positions = part_positions(plan, part, jobs)
        listing = run_dir / f"part-{part}.txt"
        listing.write_text("".join(f"{index.files[index.file_ids[p]]}\n" for p in positions))
        archive = run_dir / f"part-{part}.tar"
        start = time.perf_counter()
        result = subprocess.run(["tar", "-cf", str(archive), "-C", str(plan.data_dir), "-T", str(listing)],
                                capture_output=True, text=True)
        tar_s[part] = time.perf_counter() - start
        fd = os.open(archive, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sync_s[part] = time.perf_counter() - start
        counts[part] = len(positions)
        if result.returncode:
            errors.append(result.stderr)

    threads = [threading.Thread(target=job, args=(part,)) for part in range(jobs)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    if errors:
        raise RuntimeError(f"tar failed: {errors[0]}")
    return (Timing("tar -cf", jobs, tar_s, counts, max(tar_s)),
            Timing("tar -cf + fsync", jobs, sync_s, counts, wall))


# --------------------------------------------------------------------------- report


def per_process_rate(timing: Timing) -> float:
    return statistics.mean(n / s for n, s in zip(timing.samples, timing.seconds))


def paired_ratio(runs: list[Timing], baseline: list[Timing]) -> float:
    """Median over repeats of (rate ÷ baseline's rate in the same repeat): the load of a shared
    machine drifts between repeats, far less within one."""
    return statistics.median(per_process_rate(a) / per_process_rate(b) for a, b in zip(runs, baseline))


def summarise(timings: list[Timing], mean_bytes: float) -> list[dict[str, Any]]:
    """Medians over repeats for each (what, jobs), and ratios to tar and to write_part taken
    within each repeat (timings of one (what, jobs) are in repeat order)."""
    rows: dict[tuple[str, int], list[Timing]] = {}
    for t in timings:
        rows.setdefault((t.what, t.jobs), []).append(t)
    summary = []
    for (what, jobs), runs in rows.items():
        rate = statistics.median(per_process_rate(t) for t in runs)
        summary.append({
            "what": what, "jobs": jobs, "repeats": len(runs), "samples_per_s_per_process": rate,
            "mb_per_s_per_process": rate * mean_bytes / 1e6,
            "samples_per_s_total": statistics.median(sum(t.samples) / t.wall for t in runs),
            "vs_tar": paired_ratio(runs, rows[("tar -cf", jobs)]),
            "vs_tar_fsync": paired_ratio(runs, rows[("tar -cf + fsync", jobs)]),
            "vs_write_part": paired_ratio(runs, rows[("write_part", jobs)]),
        })
    return summary


def scaling(summary: list[dict[str, Any]], jobs: list[int]) -> dict[str, float]:
    """Total rate with the most jobs over the total rate with one, per candidate."""
    if 1 not in jobs or max(jobs) == 1:
        return {}
    top = max(jobs)
    by = {(r["what"], r["jobs"]): r["samples_per_s_total"] for r in summary}
    return {what: by[(what, top)] / by[(what, 1)] for what, j in by if j == 1 and (what, top) in by}


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or '?'."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def gnu_tar_version() -> str:
    try:
        return subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"


def environment(workdir: Path) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "kernel": platform.release(),
        "filesystem": filesystem_of(workdir),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
        "simplejpeg": simplejpeg.__version__,
        "tar": gnu_tar_version(),
    }


def format_report(report: dict[str, Any]) -> str:
    env, inputs = report["environment"], report["inputs"]
    lines = [
        f"shard conversion vs GNU tar — {inputs['images']} JPEGs, mean {inputs['mean_bytes'] / 1e3:.1f} kB "
        f"({INPUT_SIDES[0]}–{INPUT_SIDES[1]} px, quality {INPUT_QUALITY}), {inputs['shards']} shards of "
        f"{inputs['samples_per_shard']}, page cache warm, medians of {report['repeats']} interleaved repeats",
        f"machine: {env['cpu']}, {env['cores']} cores ({env['usable_cores']} usable), Linux {env['kernel']}, "
        f"{env['filesystem']}; load average {env['load_average'][0]:.1f} at the start, "
        f"{report['load_average_end'][0]:.1f} at the end",
        f"{env['date']}; Python {env['python']}, numpy {env['numpy']}, Pillow {env['pillow']} (libjpeg-turbo "
        f"{env['pillow_libjpeg_turbo']}), simplejpeg {env['simplejpeg']}, {env['tar']}",
        "",
        f"{'what':<32} {'jobs':>4} {'samples/s/proc':>15} {'MB/s/proc':>10} {'samples/s total':>16} "
        f"{'÷ tar':>7} {'÷ tar+fsync':>12} {'÷ write_part':>13}",
    ]
    for row in report["summary"]:
        lines.append(
            f"{row['what']:<32} {row['jobs']:>4} {row['samples_per_s_per_process']:>15.0f} "
            f"{row['mb_per_s_per_process']:>10.1f} {row['samples_per_s_total']:>16.0f} "
            f"{row['vs_tar']:>7.2f} {row['vs_tar_fsync']:>12.2f} {row['vs_write_part']:>13.2f}"
        )
    lines += ["(rates: medians over repeats; ratios: medians of the ratios within each repeat)"]
    if report["scaling"]:
        top = max(report["jobs"])
        shown = ", ".join(f"{what} ×{factor:.2f}" for what, factor in report["scaling"].items())
        lines += ["", f"scaling, total rate with {top} jobs ÷ with 1: {shown}"]
    verdicts = [f"{row['jobs']} job(s): {row['vs_tar']:.2f} × tar"
                for row in report["summary"] if row["what"] == "write_part"]
    lines += [f"goal: write_part ≥ {GOAL} × tar's per-process rate with bytes kept — " + "; ".join(verdicts)]
    return "\n".join(lines)


def profile_write_part(workdir: Path, index_path: Path) -> str:
    run_dir, run_index = fresh_run_dir(workdir, index_path)
    profiler = cProfile.Profile()
    profiler.enable()
    shards.write_part(run_index, 0, 1, run_dir / "parts" / "0.json", None, INPUT_QUALITY)
    profiler.disable()
    shutil.rmtree(run_dir, ignore_errors=True)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        revisions = {f"write_part ({revision})": stack.enter_context(exported(revision)) for revision in args.also}
        return run_candidates(args, workdir, revisions)


def run_candidates(args: argparse.Namespace, workdir: Path, revisions: dict[str, Path]) -> dict[str, Any]:
    data_dir = prepare_inputs(workdir, args.images)
    index_path = workdir / "index.json"
    index = sources.index_split(data_dir, "train")
    shards.save_index(shards.shuffled(index, 0), data_dir, args.samples_per_shard, 0, index_path)
    plan = shards.load_plan(index_path)
    env = environment(workdir)
    total_bytes = read_all(data_dir, index)
    # Warm-up, untimed: imports, code paths and the page cache of everything the writer touches.
    reader = shards.SampleReader(plan)
    for position in range(min(50, len(index))):
        shards.prepare_image(reader.read(position), None, INPUT_QUALITY)
    reader.close()

    candidates: list[tuple[str, Callable[[int], list[Timing]]]] = [
        ("tar", lambda jobs: list(time_tar(workdir, plan, jobs))),
        ("write_part", lambda jobs: [time_write_part("write_part", workdir, index_path, jobs)]),
        ("write_part, check header", lambda jobs: [time_write_part("write_part (check: header)", workdir,
                                                                   index_path, jobs, check="header")]),
    ]
    for what, package_root in revisions.items():
        candidates.append((what, lambda jobs, w=what, r=package_root: [time_write_part_at(w, r, workdir, index_path,
                                                                                          jobs)]))
    if not args.no_diagnostics:
        candidates += [
            ("check only", lambda jobs: [time_check_only(plan, jobs)]),
            ("no check", lambda jobs: [time_write_part("write_part, no check", workdir, index_path, jobs,
                                                       check=None)]),
        ]
    timings: list[Timing] = []
    for repeat in range(args.repeats):
        # Alternate the order from repeat to repeat, so no candidate always follows the same one.
        order = candidates if repeat % 2 == 0 else candidates[::-1]
        for jobs in args.jobs:
            for name, measure in order:
                print(f"repeat {repeat + 1}/{args.repeats}, {jobs} job(s): {name}", file=sys.stderr)
                timings += measure(jobs)

    order = ["tar -cf", "tar -cf + fsync", "write_part", "write_part (check: header)", *revisions,
             "check only (prepare_image)", "write_part, no check"]
    timings.sort(key=lambda t: (t.jobs, order.index(t.what)))
    summary = summarise(timings, total_bytes / len(index))
    report = {
        "benchmark": "shard_write",
        "environment": env,
        "load_average_end": os.getloadavg(),
        "inputs": {"images": len(index), "mean_bytes": total_bytes / len(index), "bytes": total_bytes,
                   "shards": plan.shard_count, "samples_per_shard": args.samples_per_shard},
        "jobs": args.jobs,
        "repeats": args.repeats,
        "summary": summary,
        "scaling": scaling(summary, args.jobs),
        "timings": [asdict(t) for t in timings],
    }
    if args.profile:
        report["profile"] = profile_write_part(workdir, index_path)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flashnet-bench-shards-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, workdir)
    except RevisionError as error:
        print(f"flashnet bench shards: {error}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                for name in ("imagenet-like", "imagenet-like.json", "index.json", "run"):
                    path = workdir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    print(format_report(report))
    if args.profile:
        print("\ncProfile of one write_part job (1 process), by own time:\n" + report["profile"])
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
