"""Images/s of one loader worker: flashnet's shard pipeline vs torchvision's ImageFolder (the baseline).

    .venv/bin/python -m flashnet.bench.loader [--images N] [--size 224] [--workdir DIR] [--repeats R]
                                              [--also REV] [--out FILE.json]
    flashnet bench loader [same options]

Both pipelines read the same JPEGs and produce the same thing, a uint8 batch of random-resized
crops (area 8–100 %, aspect 3/4–4/3) at ``--size``, flipped half the time:

  flashnet shards     flashnet.data.loader.train_loader from WebDataset shards written by
                      flashnet.data.shards (real epochs: each sample read by its byte range;
                      simplejpeg decode, crop, antialiased bilinear resize on uint8 channels_last,
                      flip); uint8 NHWC. (Its DCT-scaled decodes need crops of
                      4x the output size, so at 224 from these images they never happen.)
  torchvision folder  ImageFolder (PIL decode + convert("RGB")) with transforms.v2
                      RandomResizedCrop + RandomHorizontalFlip + ToImage, DataLoader(num_workers=0)
                      with its default collation; uint8 NCHW

One process and one torch thread measure what a single DataLoader worker delivers (torch itself
gives each worker one thread). The pipelines take turns within each repeat (alternating which goes
first), so slow phases of a shared machine fall on both; each is warmed up by one untimed pass.
Reported: the medians over repeats of images per second of wall-clock time and per second of the
process's CPU time (a pass's images / its time). On a machine shared with other jobs the CPU-time
rate is the steadier measure of the cost per image; wall-clock is what an idle core would give.
For reference, full-size decode-only rates of PIL, torchvision.io.decode_jpeg and simplejpeg on
the same bytes (from memory).

The images are generated, not photographs: flashnet.data.sample's procedural drawings (a shape on a
smooth colour field with grain) at 300–500 px a side, JPEG quality 90. They are about half the file
size of ImageNet's photographs of the same dimensions, so entropy decoding, the cost both pipelines
share, is a smaller part of the time than on the real data; ``--quality 98`` gives about
ImageNet's bytes per pixel. Results and their discussion: docs/benchmarks/loader.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import PIL
import simplejpeg
import torch
import torchvision
import webdataset
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from flashnet.bench import write_report
from flashnet.bench.revision import RevisionError, RevisionWorker, exported
from flashnet.data import loader, sample, shards, sources
from flashnet.data.epochs import TrainSamples
from flashnet.data.manifest import MANIFEST_FORMAT, build_manifest, verify_manifest
from flashnet.data.transforms import Augmentation
from flashnet.machine import cpu_model

SAMPLES_PER_SHARD = 100
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, the ImageNet recipe's
GOAL = 2.0  # images/s per core, as a multiple of the baseline's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashnet bench loader", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="generated images (at least 1000)")
    parser.add_argument("--size", type=int, default=224, help="output crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline; the median is reported")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the images and shards go (reused when present); default: a temporary folder")
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--quality", type=int, default=90,
                        help="JPEG quality of the generated images (98 gives about ImageNet's bytes per pixel)")
    parser.add_argument("--dct-scales", action="store_true",
                        help="also time simplejpeg at each n/8 DCT scale (why the loader uses only 1/2, 1/4, 1/8)")
    parser.add_argument("--also", action="append", default=[], metavar="REV",
                        help="a git revision whose loader (with the rest of its package) is timed next to the "
                             "current one, in a process of its own (bench/revision.py); may be repeated")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.images < 1000:
        parser.error("--images must be at least 1000")
    if args.images < args.batch_size:
        parser.error("--images must be at least one batch")
    return args


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class BenchData:
    folder: Path  # ImageFolder root: <wnid>/<key>.JPEG
    samples: TrainSamples  # the shards and their samples' byte ranges
    jpegs: list[bytes]  # every image's bytes, for the decode-only rates


def sample_spec(args: argparse.Namespace) -> sample.SampleSpec:
    classes = 10
    return sample.SampleSpec(classes=classes, train_per_class=math.ceil(args.images / classes), val_per_class=1,
                             min_side=args.min_side, max_side=args.max_side, quality=args.quality, odd_files=False,
                             seed=0)


def prepare_data(args: argparse.Namespace, workdir: Path) -> BenchData:
    """The generated images as a class-folder tree, and the same bytes as shards (made by the
    project's own index → write-shards → manifest steps). Reused when ``workdir`` already holds them
    for the same settings."""
    spec = sample_spec(args)
    data_dir, shard_dir = workdir / "images", workdir / "shards"
    stamp = workdir / "settings.json"
    # The manifest format too: a workdir from before sample byte ranges is rebuilt.
    settings = json.dumps({**dataclasses.asdict(spec), "manifest": MANIFEST_FORMAT}, sort_keys=True)
    manifest_path = shard_dir / "manifest.json"
    if not (stamp.exists() and stamp.read_text() == settings and manifest_path.exists()):
        stamp.unlink(missing_ok=True)
        sample.write_sample_data(data_dir, spec, layouts=("extracted",))
        index = sources.index_split(data_dir, "train")
        shard_dir.mkdir(parents=True, exist_ok=True)
        index_path = shard_dir / "index.json"
        shards.save_index(shards.shuffled(index, spec.seed), data_dir, SAMPLES_PER_SHARD, spec.seed, index_path)
        part = shard_dir / "parts" / "0.json"
        part.parent.mkdir(exist_ok=True)
        shards.write_part(index_path, 0, 1, part, max_side=None, quality=spec.quality)
        build_manifest(index_path, [part], manifest_path, max_rejected=0)
        stamp.write_text(settings)
    manifest = verify_manifest(manifest_path)
    folder = data_dir / "train"
    jpegs = [path.read_bytes() for path in sorted(folder.glob("*/*.JPEG"))]
    return BenchData(folder, TrainSamples.from_manifest(manifest_path, manifest), jpegs)


def describe_images(jpegs: list[bytes]) -> dict:
    sizes = [simplejpeg.decode_jpeg_header(jpeg)[:2] for jpeg in jpegs]
    return {
        "count": len(jpegs),
        "mean_width": statistics.mean(w for _, w in sizes),
        "mean_height": statistics.mean(h for h, _ in sizes),
        "mean_kib": statistics.mean(len(jpeg) for jpeg in jpegs) / 1024,
    }


# --------------------------------------------------------------------------- pipelines


def flashnet_batches(data: BenchData, args: argparse.Namespace, epoch: int) -> Iterable:
    """The project's train pipeline, in the main process, a fresh epoch each pass."""
    spec = loader.TrainStreamSpec(samples=data.samples, world_size=1, seed=0, epoch=epoch, rank=0,
                                  steps=args.images // args.batch_size, batch_size=args.batch_size,
                                  image_size=args.size,
                                  augmentation=Augmentation(CROP_SCALE, (3 / 4, 4 / 3)))
    return loader.train_loader(spec, workers=0)


def torchvision_batches(data: BenchData, args: argparse.Namespace, epoch: int) -> Iterable:
    transform = v2.Compose([
        v2.RandomResizedCrop(args.size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
    ])
    dataset = torchvision.datasets.ImageFolder(str(data.folder), transform=transform)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0,
                      generator=torch.Generator().manual_seed(epoch))


CANDIDATE, BASELINE = "flashnet shards", "torchvision folder"


@dataclasses.dataclass(frozen=True)
class Rate:
    wall: float  # images per second of wall-clock time
    cpu: float  # images per second of this process's CPU time


TimedPass = Callable[[BenchData, argparse.Namespace, int], Rate]  # one timed pass of a pipeline (its epoch)


def check_batch(dtype: str, shape: tuple[int, ...], size: int) -> None:
    """A batch's images are uint8 and ``size`` pixels square (NHWC from flashnet, NCHW from torchvision)."""
    assert dtype == "torch.uint8" and size in shape[1:3] and shape[-2] == size, (dtype, shape)


def time_pass(batches: Iterable, size: int) -> Rate:
    """Time one pass; check every batch on the way."""
    count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        images = batch.images if hasattr(batch, "images") else batch[0]  # flashnet's Batch, or torchvision's tuple
        check_batch(str(images.dtype), tuple(images.shape), size)
        count += len(images)
    return Rate(count / (time.perf_counter() - wall), count / (time.process_time() - cpu))


def in_process(make: Callable[[BenchData, argparse.Namespace, int], Iterable]) -> TimedPass:
    return lambda data, args, epoch: time_pass(make(data, args, epoch), args.size)


def at_revision(worker: RevisionWorker) -> TimedPass:
    """A pass of another revision's loader, built and timed in its worker process (its wall-clock
    and CPU time of the pass alone, as time_pass measures here)."""
    def timed(data: BenchData, args: argparse.Namespace, epoch: int) -> Rate:
        answer = worker.ask({"epoch": epoch})
        for dtype, image_shape in answer["batches"]:
            check_batch(dtype, (args.batch_size, *image_shape), args.size)
        return Rate(answer["images"] / answer["wall_seconds"], answer["images"] / answer["cpu_seconds"])
    return timed


def pipelines(args: argparse.Namespace, data: BenchData, stack: contextlib.ExitStack) -> dict[str, TimedPass]:
    """The timed passes to compare: the project's loader, torchvision's, and each ``--also`` revision's
    in a worker process that lives as long as ``stack``."""
    found = {CANDIDATE: in_process(flashnet_batches), BASELINE: in_process(torchvision_batches)}
    setup = {"shards": list(data.samples.shards), "images": args.images, "batch_size": args.batch_size,
             "size": args.size, "crop_scale": CROP_SCALE}
    for revision in args.also:
        worker = RevisionWorker("loader_pass.py", stack.enter_context(exported(revision)), setup)
        stack.callback(worker.close)
        found[f"{CANDIDATE} ({revision})"] = at_revision(worker)
    return found


def time_calls(function: Callable[[bytes], object], jpegs: list[bytes]) -> Rate:
    wall, cpu = time.perf_counter(), time.process_time()
    for jpeg in jpegs:
        function(jpeg)
    return Rate(len(jpegs) / (time.perf_counter() - wall), len(jpegs) / (time.process_time() - cpu))


def time_pipelines(data: BenchData, args: argparse.Namespace) -> dict[str, list[Rate]]:
    with contextlib.ExitStack() as stack:
        candidates = pipelines(args, data, stack)
        return time_in_turns(candidates, data, args)


def time_in_turns(candidates: dict[str, TimedPass], data: BenchData, args: argparse.Namespace) -> dict[str, list[Rate]]:
    for timed_pass in candidates.values():  # warm-up: page cache, allocator, lazy imports
        timed_pass(data, args, 0)
    samples: dict[str, list[Rate]] = {name: [] for name in candidates}
    names = list(candidates)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            samples[name].append(candidates[name](data, args, repeat + 1))
    return samples


# --------------------------------------------------------------------------- decode only


DECODERS: dict[str, Callable[[bytes], object]] = {
    "PIL open+convert RGB": lambda jpeg: Image.open(io.BytesIO(jpeg)).convert("RGB"),
    "torchvision.io.decode_jpeg": lambda jpeg: torchvision.io.decode_jpeg(
        torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=torchvision.io.ImageReadMode.RGB),
    "simplejpeg": lambda jpeg: simplejpeg.decode_jpeg(jpeg, colorspace="RGB"),
    "simplejpeg fastdct+fastupsample": lambda jpeg: simplejpeg.decode_jpeg(
        jpeg, colorspace="RGB", fastdct=True, fastupsample=True),
}


def scaled_decoder(eighths: int) -> Callable[[bytes], object]:
    """simplejpeg with the loader's flags at ``eighths``/8 scale (it picks the smallest scale
    whose output is at least the size asked for)."""
    def decode(jpeg: bytes):
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
                                      min_width=-(-width * eighths // 8), min_height=-(-height * eighths // 8))
    return decode


def time_decoders(jpegs: list[bytes], repeats: int, dct_scales: bool) -> dict[str, list[Rate]]:
    decoders = dict(DECODERS)
    if dct_scales:
        decoders.update({f"simplejpeg fast, {n}/8 scale": scaled_decoder(n) for n in range(8, 0, -1)})
    samples: dict[str, list[Rate]] = {name: [] for name in decoders}
    for decode in decoders.values():
        decode(jpegs[0])
    names = list(decoders)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            samples[name].append(time_calls(decoders[name], jpegs))
    return samples


# --------------------------------------------------------------------------- report


def summarize(rates: list[Rate], baseline: list[Rate] | None = None) -> dict:
    """Medians over repeats; with ``baseline``, also the median of the per-repeat ratios (a pass
    and the baseline's pass of the same repeat ran back to back, under the same load)."""
    summary = {
        "images_per_s": statistics.median(r.wall for r in rates),
        "images_per_cpu_s": statistics.median(r.cpu for r in rates),
        "samples": [dataclasses.asdict(r) for r in rates],
    }
    if baseline is not None:
        summary["ratios"] = [a.wall / b.wall for a, b in zip(rates, baseline)]
        summary["ratios_cpu"] = [a.cpu / b.cpu for a, b in zip(rates, baseline)]
        summary["ratio"] = statistics.median(summary["ratios"])
        summary["ratio_cpu"] = statistics.median(summary["ratios_cpu"])
    return summary


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="flashnet-bench-loader-") as tmp:
        workdir = args.workdir or Path(tmp)
        data = prepare_data(args, workdir)
        pipelines = time_pipelines(data, args)
        decoders = time_decoders(data.jpegs, args.repeats, args.dct_scales)
        images = describe_images(data.jpegs)
    baseline = pipelines[BASELINE]
    return {
        "benchmark": "loader",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores (1 process, {torch.get_num_threads()} torch thread)",
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                     "simplejpeg": simplejpeg.__version__, "webdataset": webdataset.__version__,
                     "numpy": np.__version__},
        "images": images,
        "quality": args.quality,
        "size": args.size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "pipelines": {name: summarize(rates, baseline) for name, rates in pipelines.items()},
        "decode_only": {name: summarize(rates) for name, rates in decoders.items()},
    }


def format_table(report: dict) -> str:
    images = report["images"]
    lines = [
        f"machine: {report['machine']}",
        f"date {report['date']}  " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"images: {images['count']} generated JPEGs (procedural drawings with texture, not photographs), "
        f"mean {images['mean_width']:.0f}x{images['mean_height']:.0f} px, {images['mean_kib']:.0f} KiB, "
        f"quality {report['quality']}",
        f"output: uint8 {report['size']}x{report['size']} random-resized crops (scale 0.08-1) + flips, batches of "
        f"{report['batch_size']}; medians of {report['repeats']} interleaved passes",
        "",
        f"{'pipeline (one worker)':<42} {'images/s':>9} {'x base':>7} {'img/CPU-s':>10} {'x base':>7}",
    ]
    for name, row in report["pipelines"].items():
        lines.append(f"{name:<42} {row['images_per_s']:>9.0f} {row['ratio']:>7.2f} "
                     f"{row['images_per_cpu_s']:>10.0f} {row['ratio_cpu']:>7.2f}")
    candidate = report["pipelines"][CANDIDATE]
    lines.append(f"x base = median of the per-repeat ratios; wall: {' '.join(f'{r:.2f}' for r in candidate['ratios'])};"
                 f" CPU: {' '.join(f'{r:.2f}' for r in candidate['ratios_cpu'])}")
    met = min(candidate["ratio"], candidate["ratio_cpu"]) >= GOAL
    lines.append(f"goal: {CANDIDATE} >= {GOAL:g}x {BASELINE} per core: {'met' if met else 'NOT met'}")
    lines += ["", f"{'decode only (full size, or n/8 scale)':<42} {'images/s':>9} {'':>7} {'img/CPU-s':>10}"]
    for name, row in report["decode_only"].items():
        lines.append(f"{name:<42} {row['images_per_s']:>9.0f} {'':>7} {row['images_per_cpu_s']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except RevisionError as error:
        print(f"flashnet bench loader: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
