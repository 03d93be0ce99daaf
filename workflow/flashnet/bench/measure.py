"""What the GPU benchmark measures with: operation counts, device-synchronised timers, and the
machine every figure is taken on (flashnet.bench.gpu's docstring says how they are used)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

from flashnet.machine import cpu_model

REFERENCE_SIZE = 224  # the resolution torchvision's operation counts are given at
FLOP_PER_MAC = 2
TRAIN_PASSES = 3  # forward + backward (input gradients) + backward (weight gradients)


# --------------------------------------------------------------------------- arithmetic


def forward_gmacs(model: str) -> float:
    """Multiply-adds of one forward pass at 224 px, in G, from torchvision's weights metadata
    (``_ops``, published as "GFLOPS" in its model table; fvcore counts a multiply-add as one)."""
    return float(torchvision.models.get_model_weights(model).DEFAULT.meta["_ops"])


def training_flops_per_image(model: str, image_size: int) -> float:
    """FLOP of one training step per image: 3 passes × 2 FLOP per multiply-add × forward MACs,
    scaled by the pixel count (exact at 224; convolution cost is proportional to output pixels)."""
    return TRAIN_PASSES * FLOP_PER_MAC * forward_gmacs(model) * 1e9 * (image_size / REFERENCE_SIZE) ** 2


def achieved_tflops(images_per_s: float, flops_per_image: float) -> float:
    return images_per_s * flops_per_image / 1e12


def matmul_tflops(n: int, seconds: float) -> float:
    """Rate of one n×n by n×n matrix product: n³ multiply-adds, 2n³ FLOP."""
    return FLOP_PER_MAC * n ** 3 / seconds / 1e12


def images_per_second(steps: int, batch_size: int, seconds: float) -> float:
    return steps * batch_size / seconds


# --------------------------------------------------------------------------- timing primitives


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RegionTimer:
    """Device time spent inside repeated regions (e.g. every ``optimizer.step()``).

    On CUDA, an event pair per region, read after the loop's final synchronisation, so timing
    never stalls the queue; the span includes any gap in which the GPU waited for the host to
    launch the region's kernels, which is part of what the region costs. On CPU the host clock
    (the CPU runs the region synchronously)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host_seconds = 0.0
        self.enabled = True

    @contextlib.contextmanager
    def region(self):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_seconds += time.perf_counter() - t0

    def total_ms(self) -> float:
        """Sum over regions; call after synchronising the device."""
        return self._host_seconds * 1e3 + sum(start.elapsed_time(end) for start, end in self._events)

    def reset(self) -> None:
        self._events.clear()
        self._host_seconds = 0.0


@dataclasses.dataclass
class Timing:
    """What one timed window measured."""

    steps: int
    seconds: float
    optimizer_ms: float | None = None  # device time in optimizer.step(), summed over the window
    data_wait_ms: float | None = None  # host time waiting for the loader, summed over the window
    host_syncs_per_step: int | None = None
    sync_sites: list[str] | None = None
    loss_finite: bool | None = None


def time_steps(step: Callable[[int], None], warmup: int, steps: int, device: torch.device,
               before_timing: Callable[[], None] = lambda: None) -> tuple[float, int]:
    """Run ``warmup`` untimed steps, then ``steps`` steps between two device synchronisations;
    return (seconds, steps). ``before_timing`` runs after the warm-up (reset counters there)."""
    for i in range(warmup):
        step(i)
    before_timing()
    synchronize(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    return time.perf_counter() - start, steps


def count_host_syncs(step: Callable[[], None], device: torch.device) -> tuple[int | None, list[str] | None]:
    """Host-device synchronisations in one call of ``step``, from PyTorch's sync debug mode, with
    the source lines that caused them. Each one stops the host from queueing work ahead of the GPU.
    None on CPU (no device to wait for). Not timed: warnings are slow."""
    if device.type != "cuda":
        return None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        synchronize(device)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return len(syncs), sites


# --------------------------------------------------------------------------- the machine


def describe_machine(device: torch.device) -> dict[str, Any]:
    """The hardware and software every figure was taken on."""
    import pytorch_lightning as pl

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "host_cpu": cpu_model(),
        "host_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": props.name,
            "gpu_multiprocessors": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": nvidia_smi_field("driver_version"),
            "gpu_power_limit_w": nvidia_smi_field("power.limit"),
            "gpu_max_sm_clock_mhz": nvidia_smi_field("clocks.max.sm"),
            "tf32_convolutions": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        })
    else:
        info["torch_threads"] = torch.get_num_threads()
    return info


def nvidia_smi_field(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def measure_matmul(n: int, device: torch.device, dtype: torch.dtype, repeats: int = 20, warmup: int = 3) -> float:
    """TFLOP/s of an n×n×n matrix product on random normal operands (zeros run faster than real
    data on these GPUs), median of ``repeats`` products after ``warmup`` untimed ones."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(warmup):
        a @ b
    seconds = []
    for _ in range(repeats):
        timer = RegionTimer(device)
        with timer.region():
            a @ b
        synchronize(device)
        seconds.append(timer.total_ms() / 1e3)
    seconds.sort()
    return matmul_tflops(n, seconds[len(seconds) // 2])
