"""Time one optimizer step on ResNet-50's parameters: torch SGD (the baseline) vs our LARS vs timm's.

    .venv/bin/python -m flashnet.bench.lars_step [--device cpu|cuda] [--steps N] [--repeats R] [--also REV]
    flashnet bench lars [same options]

Each optimizer gets its own copy of the model's parameters with the same random gradients
(the gradients stay fixed: only `optimizer.step()` is timed, not backward). Warm-up steps
(which also create the momentum buffers) are not timed; on CUDA the device is synchronised
before and after each timed block. The optimizers take turns within each repeat, so slow
phases of a shared machine fall on all of them, and the figure reported is the median over
repeats of the mean ms/step of a block of `--steps` steps ("best" is the fastest block,
a cross-check on a busy machine).

On CPU, glibc's malloc is first told to keep freed blocks (`reuse_freed_memory`): SGD
allocates a fresh 100 MB gradient+decay list every step, and whether that costs 25k page
faults or nothing otherwise depends on what ran before in the process (measured: 34 ms
alone vs 62 ms after LARS and timm had run). Reuse is what CUDA's caching allocator
gives on the GPU, and it makes the figures independent of order. `--keep-malloc` skips it.

Compared (hyperparameters of MLPerf's ResNet-50 LARS: momentum 0.9, weight decay 5e-5, η = 0.001):
  torch SGD foreach  torch.optim.SGD(foreach=True), weight decay on every tensor
  flashnet LARS      flashnet.train.lars.LARS with `lars_param_groups` (BN and biases excluded)
  timm Lars          timm.optim.Lars, a Python loop over tensors, same groups
  flashnet LARS (REV)  `--also REV`: train/lars.py of another git revision, timed in the same turns

`--also` loads the revision's `train/lars.py` alone, as a module of its own name (it imports nothing
from flashnet, only torch), so both LARS run in this process against the same parameters' copies and
machine load; the rest of the package stays the current one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from flashnet.bench import write_report
from flashnet.bench.revision import exported
from flashnet.train import lars
from flashnet.train.lars import LARS, lars_param_groups

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-5
LR = 0.1  # irrelevant to the timing; small enough that many steps stay finite


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashnet bench lars", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", default="resnet50", help="torchvision model whose parameters are stepped")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=7, help="repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--cpu-bucket-mib",
        type=int,
        default=None,
        help="override flashnet.train.lars.CPU_BUCKET_BYTES (MiB); 1024 turns CPU bucketing off",
    )
    parser.add_argument("--keep-malloc", action="store_true", help="leave glibc malloc's thresholds alone")
    parser.add_argument("--also", action="append", default=[], metavar="REV",
                        help="also time train/lars.py of this git revision (e.g. the commit before a change)")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def reuse_freed_memory() -> bool:
    """Pin glibc's mmap threshold at 32 MiB (its maximum) and trim threshold at 1 GiB, so
    freed tensors go back to the heap and are reused instead of being unmapped and
    faulted in again. Returns False where there is no glibc (the figures then include
    whatever the platform's allocator does)."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def model_with_gradients(model_name: str, device: torch.device) -> torch.nn.Module:
    """The model's parameters on `device`, each with a fixed random gradient (same seed for
    every copy, so every optimizer sees the same numbers)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    return model


def without_lars_flag(groups: list[dict]) -> list[dict]:
    """Param groups for optimizers that do not know the `lars` key."""
    return [{k: v for k, v in g.items() if k != "lars"} for g in groups]


def lars_at_revision(package_root: Path, revision: str) -> type:
    """The LARS class of ``package_root``'s train/lars.py, loaded as a module of its own name."""
    spec = importlib.util.spec_from_file_location(f"lars_at_{revision}", package_root / "flashnet/train/lars.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LARS


def optimizer_factories(revisions: dict[str, Path] | None = None
                        ) -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    from timm.optim import Lars as TimmLars  # a test dependency, not a runtime one

    factories = {
        "torch SGD foreach": lambda model: torch.optim.SGD(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True
        ),
        "flashnet LARS": lambda model: LARS(
            lars_param_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, eta=0.001
        ),
        "timm Lars": lambda model: TimmLars(
            without_lars_flag(lars_param_groups(model, WEIGHT_DECAY)), lr=LR, momentum=MOMENTUM, trust_coeff=0.001
        ),
    }
    for revision, root in (revisions or {}).items():
        other = lars_at_revision(root, revision)
        factories[f"flashnet LARS ({revision})"] = lambda model, other=other: other(
            lars_param_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, eta=0.001
        )
    return factories


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    """Mean wall-clock ms of one `optimizer.step()` over `steps` consecutive steps."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def machine_description(device: torch.device) -> str:
    """GPU name, or the CPU model with its core count and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def parameter_count(model_name: str) -> tuple[int, int]:
    """(parameters, tensors) of the model."""
    params = list(torchvision.models.get_model(model_name, weights=None).parameters())
    return sum(p.numel() for p in params), len(params)


def time_optimizers(args: argparse.Namespace, device: torch.device,
                    revisions: dict[str, Path] | None = None) -> dict[str, list[float]]:
    """ms/step samples per optimizer: warm-up, then `repeats` rounds in which every
    optimizer times one block of `steps` steps."""
    factories = optimizer_factories(revisions)
    optimizers = {}
    for name, make in factories.items():
        optimizers[name] = make(model_with_gradients(args.model, device))
        for _ in range(args.warmup):
            optimizers[name].step()
    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            samples[name].append(time_block(optimizer, args.steps, device))
    return samples


def run(args: argparse.Namespace) -> dict:
    """Time every optimizer, interleaved repeat by repeat; return the report as a dict."""
    device = resolve_device(args.device)
    malloc_pinned = device.type == "cpu" and not args.keep_malloc and reuse_freed_memory()
    default_bucket_bytes = lars.CPU_BUCKET_BYTES
    if args.cpu_bucket_mib is not None:
        lars.CPU_BUCKET_BYTES = args.cpu_bucket_mib << 20
    bucket_bytes = lars.CPU_BUCKET_BYTES
    try:
        with contextlib.ExitStack() as stack:
            revisions = {revision: stack.enter_context(exported(revision)) for revision in args.also}
            samples = time_optimizers(args, device, revisions)
    finally:
        lars.CPU_BUCKET_BYTES = default_bucket_bytes

    baseline = statistics.median(samples["torch SGD foreach"])
    n_params, n_tensors = parameter_count(args.model)
    return {
        "benchmark": "lars_step",
        "model": args.model,
        "parameters": n_params,
        "tensors": n_tensors,
        "device": device.type,
        "machine": machine_description(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "malloc_reuses_freed_memory": malloc_pinned,
        "cpu_bucket_bytes": bucket_bytes,
        "also": args.also,
        "results": [
            {
                "optimizer": name,
                "ms_per_step": statistics.median(values),
                "ratio_to_sgd": statistics.median(values) / baseline,
                "best_ms_per_step": min(values),
                "samples_ms": values,
            }
            for name, values in samples.items()
        ],
    }


def format_table(report: dict) -> str:
    lines = [
        f"machine: {report['machine']}",
        f"device: {report['device']}  torch {report['torch']}  date {report['date']}",
        f"model: {report['model']} ({report['parameters'] / 1e6:.1f} M parameters in {report['tensors']} tensors)  "
        f"median of {report['repeats']} repeats x {report['steps']} steps, {report['warmup']} warm-up steps",
    ]
    if report["device"] == "cpu":
        lines.append(
            f"malloc reuses freed memory: {report['malloc_reuses_freed_memory']}  "
            f"LARS CPU bucket: {report['cpu_bucket_bytes'] >> 20} MiB"
        )
    width = max(20, *(len(row["optimizer"]) for row in report["results"]))
    lines += ["", f"{'optimizer':<{width}} {'ms/step':>9} {'x SGD':>7} {'best':>9}"]
    for row in report["results"]:
        lines.append(
            f"{row['optimizer']:<{width}} {row['ms_per_step']:>9.2f} {row['ratio_to_sgd']:>7.2f}"
            f" {row['best_ms_per_step']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
