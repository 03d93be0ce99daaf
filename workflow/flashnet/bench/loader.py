"""Images/s of one loader worker: flashnet's shard pipeline vs torchvision's ImageFolder (the baseline).

    .venv/bin/python -m flashnet.bench.loader [--images N] [--size 224] [--workdir DIR] [--repeats R]
    flashnet bench loader [same options]

Both pipelines read the same JPEGs and produce the same thing, a uint8 batch of random-resized
crops (area 8–100 %, aspect 3/4–4/3) at ``--size``, flipped half the time:

  flashnet shards     flashnet.data.loader.train_loader from WebDataset shards written by
                      flashnet.data.shards (simplejpeg decode with DCT scaling, crop, antialiased
                      bilinear resize on uint8 channels_last, flip); uint8 NHWC
  torchvision folder  ImageFolder (PIL decode + convert("RGB")) with transforms.v2
                      RandomResizedCrop + RandomHorizontalFlip + ToImage, DataLoader(num_workers=0)
                      with its default collation; uint8 NCHW

One process and one torch thread measure what a single DataLoader worker delivers (torch itself
gives each worker one thread). The pipelines take turns within each repeat (alternating which goes
first), so slow phases of a shared machine fall on both; each is warmed up by one untimed pass, and
the figure reported is the median over repeats of images/s over a whole pass of ``--images``. For
reference, full-size decode-only rates of PIL, torchvision.io.decode_jpeg and simplejpeg on the
same bytes (from memory).

The images are generated, not photographs: flashnet.data.sample's procedural drawings (a shape on a
smooth colour field with grain) at 300–500 px a side, JPEG quality 90. They are about half the file
size of ImageNet's photographs of the same dimensions, so entropy decoding, the cost both pipelines
share, is a smaller part of the time than on the real data.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import statistics
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

from flashnet.data import loader, sample, shards, sources

SAMPLES_PER_SHARD = 100
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, the ImageNet recipe's


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
    shards: tuple[str, ...]
    jpegs: list[bytes]  # every image's bytes, for the decode-only rates


def sample_spec(args: argparse.Namespace) -> sample.SampleSpec:
    classes = 10
    return sample.SampleSpec(classes=classes, train_per_class=math.ceil(args.images / classes), val_per_class=1,
                             min_side=args.min_side, max_side=args.max_side, quality=90, odd_files=False, seed=0)


def prepare_data(args: argparse.Namespace, workdir: Path) -> BenchData:
    """The generated images as a class-folder tree, and the same bytes as shards (made by the
    project's own index → write-shards → manifest steps). Reused when ``workdir`` already holds them
    for the same settings."""
    spec = sample_spec(args)
    data_dir, shard_dir = workdir / "images", workdir / "shards"
    stamp = workdir / "settings.json"
    settings = json.dumps(dataclasses.asdict(spec), sort_keys=True)
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
        shards.build_manifest(index_path, [part], manifest_path, max_rejected=0)
        stamp.write_text(settings)
    manifest = json.loads(manifest_path.read_text())
    folder = data_dir / "train"
    jpegs = [path.read_bytes() for path in sorted(folder.glob("*/*.JPEG"))]
    return BenchData(folder, loader.shard_paths(manifest_path, manifest), jpegs)


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
    """The project's train pipeline, in the main process (one stream), a fresh epoch each pass."""
    steps = args.images // args.batch_size
    spec = loader.TrainStreamSpec(
        shards=data.shards, seed=0, epoch=epoch, rank=0, steps=steps, batch_size=args.batch_size,
        image_size=args.size, crop_scale=CROP_SCALE, shuffle_buffer=min(500, args.images), workers=1,
    )
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


PIPELINES: dict[str, Callable[[BenchData, argparse.Namespace, int], Iterable]] = {
    "flashnet shards": flashnet_batches,
    "torchvision folder": torchvision_batches,
}


def images_per_second(batches: Iterable, size: int) -> float:
    """Time one pass; check every batch is uint8 with ``size``-pixel images on the way."""
    count = 0
    start = time.perf_counter()
    for images, _labels in batches:
        assert images.dtype == torch.uint8 and images.shape[1:3] in ((size, size), (3, size)), images.shape
        count += len(images)
    return count / (time.perf_counter() - start)


def time_pipelines(data: BenchData, args: argparse.Namespace) -> dict[str, list[float]]:
    for name, make in PIPELINES.items():  # warm-up: page cache, allocator, lazy imports
        images_per_second(make(data, args, 0), args.size)
    samples: dict[str, list[float]] = {name: [] for name in PIPELINES}
    names = list(PIPELINES)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            samples[name].append(images_per_second(PIPELINES[name](data, args, repeat + 1), args.size))
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


def time_decoders(jpegs: list[bytes], repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in DECODERS}
    for decode in DECODERS.values():
        decode(jpegs[0])
    for _ in range(repeats):
        for name, decode in DECODERS.items():
            start = time.perf_counter()
            for jpeg in jpegs:
                decode(jpeg)
            samples[name].append(len(jpegs) / (time.perf_counter() - start))
    return samples


# --------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="flashnet-bench-loader-") as tmp:
        workdir = args.workdir or Path(tmp)
        data = prepare_data(args, workdir)
        pipelines = time_pipelines(data, args)
        decoders = time_decoders(data.jpegs, args.repeats)
        images = describe_images(data.jpegs)
    baseline = statistics.median(pipelines["torchvision folder"])
    ratios = [a / b for a, b in zip(pipelines["flashnet shards"], pipelines["torchvision folder"])]
    return {
        "benchmark": "loader",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores (1 process, {torch.get_num_threads()} torch thread)",
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pillow": PIL.__version__,
                     "simplejpeg": simplejpeg.__version__, "webdataset": webdataset.__version__,
                     "numpy": np.__version__},
        "images": images,
        "size": args.size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "pipelines": [
            {"pipeline": name, "images_per_s": statistics.median(values),
             "ratio_to_baseline": statistics.median(values) / baseline, "samples": values}
            for name, values in pipelines.items()
        ],
        "per_repeat_ratios": ratios,
        "decode_only": [
            {"decoder": name, "images_per_s": statistics.median(values), "samples": values}
            for name, values in decoders.items()
        ],
    }


def format_table(report: dict) -> str:
    images = report["images"]
    ratios = report["per_repeat_ratios"]
    lines = [
        f"machine: {report['machine']}",
        f"date {report['date']}  " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"images: {images['count']} generated JPEGs (procedural drawings with texture, not photographs), "
        f"mean {images['mean_width']:.0f}x{images['mean_height']:.0f} px, {images['mean_kib']:.0f} KiB",
        f"output: uint8 {report['size']}x{report['size']} random-resized crops + flips, batches of "
        f"{report['batch_size']}; median of {report['repeats']} interleaved passes",
        "",
        f"{'pipeline (one worker)':<34} {'images/s':>9} {'x baseline':>11}",
    ]
    for row in report["pipelines"]:
        lines.append(f"{row['pipeline']:<34} {row['images_per_s']:>9.0f} {row['ratio_to_baseline']:>11.2f}")
    lines.append(f"per-repeat ratios: {min(ratios):.2f}–{max(ratios):.2f} (median {statistics.median(ratios):.2f})")
    lines += ["", f"{'decode only, full size':<34} {'images/s':>9}"]
    for row in report["decode_only"]:
        lines.append(f"{row['decoder']:<34} {row['images_per_s']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
