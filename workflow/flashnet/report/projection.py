"""An estimate, not a measurement: a measured run's recipe scaled out to a record-size cluster.

From a run's measured images/s per device, what would the same recipe (same model, precision and
per-device batch) need on P devices for E epochs of the full ImageNet-1k train set? The cost model is
deliberately simple, and the report states every assumption beside the numbers:

    step time  = compute + all-reduce            (no overlap of the two)
    compute    = b / r                           b: per-device batch, r: measured images/s per device
    all-reduce = 2·(P−1)/P · G / B + 2·(P−1) · α (ring all-reduce of the gradients)
    G          = parameters × bytes per gradient element (2 for bf16/fp16, 4 for fp32)
    steps      = ⌈E · N / (P · b)⌉               N = 1,281,167 ImageNet train images
    total      = steps × step time
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from ..config import ConfigError
from ..data.sources import IMAGENET_CLASSES, IMAGENET_COUNTS
from .references import FUJITSU
from .runs import RunResults
from .tables import Table, format_count, format_duration, format_published_duration, format_rate

IMAGENET_TRAIN_IMAGES = IMAGENET_COUNTS["train"]  # 1,281,167

# Bytes per gradient element on the wire: gradients are all-reduced in the training precision, as
# the published records did (fp16 all-reduce in Goyal's successors, Sony and Fujitsu).
GRADIENT_BYTES_PER_PARAMETER = {"bf16-mixed": 2, "16-mixed": 2, "32-true": 4}


@dataclasses.dataclass(frozen=True)
class ProjectionSettings:
    """The config's ``report`` section: the cluster the projection assumes."""

    devices: int
    epochs: float
    link_gbps: float  # per-device all-reduce bandwidth, Gbit/s
    link_latency_us: float  # per message, µs

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "ProjectionSettings":
        keys = ("projection_devices", "projection_epochs", "link_gbps", "link_latency_us")
        missing = [key for key in keys if key not in settings]
        if missing:
            raise ConfigError(f"report: missing key(s) {', '.join(missing)}")
        values = cls(int(settings["projection_devices"]), float(settings["projection_epochs"]),
                     float(settings["link_gbps"]), float(settings["link_latency_us"]))
        if values.devices < 1 or values.epochs <= 0 or values.link_gbps <= 0 or values.link_latency_us < 0:
            raise ConfigError(f"report: projection settings out of range: {settings}")
        return values

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8

    @property
    def latency_s(self) -> float:
        return self.link_latency_us * 1e-6


@functools.lru_cache(maxsize=None)
def parameter_count(model: str) -> int:
    """Trainable parameters of torchvision's ``model`` with ImageNet's 1,000 classes (resnet50: 25,557,032).

    Built on the meta device: shapes only, no memory and no weights.
    """
    import torch
    import torchvision

    with torch.device("meta"):
        network = torchvision.models.get_model(model, weights=None, num_classes=IMAGENET_CLASSES)
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def gradient_bytes(parameters: int, precision: str) -> int:
    """G = parameters × 2 for ``bf16-mixed``/``16-mixed``, × 4 for ``32-true``."""
    try:
        return parameters * GRADIENT_BYTES_PER_PARAMETER[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(GRADIENT_BYTES_PER_PARAMETER)}") from None


def compute_seconds_per_step(per_device_batch: float, images_per_s_per_device: float) -> float:
    """compute = b / r: one device's share of a step at the measured per-device rate."""
    if images_per_s_per_device <= 0:
        raise ValueError(f"measured images/s per device must be positive, got {images_per_s_per_device}")
    return per_device_batch / images_per_s_per_device


def ring_allreduce_bandwidth_seconds(message_bytes: float, devices: int, link_bytes_per_s: float) -> float:
    """2·(P−1)/P · G / B: each device sends and receives 2·(P−1)/P of the message (reduce-scatter + all-gather)."""
    return 2 * (devices - 1) / devices * message_bytes / link_bytes_per_s


def ring_allreduce_latency_seconds(devices: int, latency_s: float) -> float:
    """2·(P−1) · α: the ring's 2·(P−1) sequential message hops."""
    return 2 * (devices - 1) * latency_s


def ring_allreduce_seconds(message_bytes: float, devices: int, link_bytes_per_s: float, latency_s: float) -> float:
    """2·(P−1)/P · G / B + 2·(P−1) · α; zero for a single device."""
    return (ring_allreduce_bandwidth_seconds(message_bytes, devices, link_bytes_per_s)
            + ring_allreduce_latency_seconds(devices, latency_s))


def steps_for_epochs(epochs: float, train_images: int, global_batch: float) -> int:
    """steps = ⌈E · N / global batch⌉ (the last, partial batch counts as a step)."""
    # Rounded first so that float noise (220.0000000001) does not add a step.
    return math.ceil(round(epochs * train_images / global_batch, 9))


@dataclasses.dataclass(frozen=True)
class Projection:
    """One run's recipe projected to ``devices`` devices; times in seconds."""

    run: str
    model: str
    precision: str
    measured_on: str  # e.g. "2 × NVIDIA H100 80GB HBM3"
    measured_images_per_s_per_device: float
    devices: int
    per_device_batch: float
    epochs: float
    train_images: int
    parameters: int
    gradient_bytes: int
    link_gbps: float
    link_latency_us: float
    compute_s: float  # per step
    allreduce_bandwidth_s: float  # per step
    allreduce_latency_s: float  # per step

    @property
    def global_batch(self) -> float:
        return self.devices * self.per_device_batch

    @property
    def allreduce_s(self) -> float:
        return self.allreduce_bandwidth_s + self.allreduce_latency_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.allreduce_s  # no overlap

    @property
    def steps(self) -> int:
        return steps_for_epochs(self.epochs, self.train_images, self.global_batch)

    @property
    def total_s(self) -> float:
        return self.steps * self.step_s

    @property
    def compute_share(self) -> float:
        return self.compute_s / self.step_s

    @property
    def communication_share(self) -> float:
        return self.allreduce_s / self.step_s

    @property
    def images_per_s(self) -> float:
        return self.global_batch / self.step_s

    @property
    def ratio_to_fujitsu(self) -> float:
        """Projected time ÷ Fujitsu's 74.7 s (below 1: faster than the record)."""
        return self.total_s / FUJITSU.time_s


def project(run: str, model: str, precision: str, measured_on: str, per_device_batch: float,
            images_per_s_per_device: float, settings: ProjectionSettings, parameters: int | None = None,
            train_images: int = IMAGENET_TRAIN_IMAGES) -> Projection:
    """The cost model of this module's docstring for one recipe (``parameters`` defaults to torchvision's count)."""
    parameters = parameter_count(model) if parameters is None else parameters
    message = gradient_bytes(parameters, precision)
    return Projection(
        run=run, model=model, precision=precision, measured_on=measured_on,
        measured_images_per_s_per_device=images_per_s_per_device, devices=settings.devices,
        per_device_batch=per_device_batch, epochs=settings.epochs, train_images=train_images,
        parameters=parameters, gradient_bytes=message, link_gbps=settings.link_gbps,
        link_latency_us=settings.link_latency_us,
        compute_s=compute_seconds_per_step(per_device_batch, images_per_s_per_device),
        allreduce_bandwidth_s=ring_allreduce_bandwidth_seconds(message, settings.devices, settings.link_bytes_per_s),
        allreduce_latency_s=ring_allreduce_latency_seconds(settings.devices, settings.latency_s),
    )


def project_run(run: RunResults, settings: ProjectionSettings) -> Projection:
    """Projection of one measured run: its model, precision, per-device batch and images/s per device."""
    s = run.summary
    return project(
        run=run.name, model=run.config["model"], precision=s["precision"],
        measured_on=f"{s['world_size']} × {s['device_name']}", per_device_batch=run.per_device_batch,
        images_per_s_per_device=float(s.get("steady_images_per_s_per_device") or s["images_per_s_per_device"]),
        settings=settings,
    )


PROJECTION_CSV_COLUMNS = (
    "run", "model", "precision", "measured_on", "measured_images_per_s_per_device", "devices", "per_device_batch",
    "global_batch", "epochs", "train_images", "steps", "parameters", "gradient_bytes", "link_gbps",
    "link_latency_us", "compute_s_per_step", "allreduce_bandwidth_s_per_step", "allreduce_latency_s_per_step",
    "allreduce_s_per_step", "step_s", "total_s", "compute_share", "communication_share", "images_per_s",
    "fujitsu_time_s", "ratio_to_fujitsu", "kind",
)


def projection_csv_rows(projections: list[Projection]) -> list[dict[str, object]]:
    """projection.csv: every input and result of the cost model, raw (seconds, bytes, fractions)."""
    return [
        {
            "run": p.run, "model": p.model, "precision": p.precision, "measured_on": p.measured_on,
            "measured_images_per_s_per_device": p.measured_images_per_s_per_device, "devices": p.devices,
            "per_device_batch": p.per_device_batch, "global_batch": p.global_batch, "epochs": p.epochs,
            "train_images": p.train_images, "steps": p.steps, "parameters": p.parameters,
            "gradient_bytes": p.gradient_bytes, "link_gbps": p.link_gbps, "link_latency_us": p.link_latency_us,
            "compute_s_per_step": p.compute_s, "allreduce_bandwidth_s_per_step": p.allreduce_bandwidth_s,
            "allreduce_latency_s_per_step": p.allreduce_latency_s, "allreduce_s_per_step": p.allreduce_s,
            "step_s": p.step_s, "total_s": p.total_s, "compute_share": p.compute_share,
            "communication_share": p.communication_share, "images_per_s": p.images_per_s,
            "fujitsu_time_s": FUJITSU.time_s, "ratio_to_fujitsu": p.ratio_to_fujitsu, "kind": "estimate",
        }
        for p in projections
    ]


def format_milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def projection_table(projections: list[Projection]) -> Table:
    """The projection table of summary.md and report.html (the hardware measured on is in the recipe table)."""
    rows = tuple(
        (p.run, format_rate(p.measured_images_per_s_per_device), f"{p.devices:,}", format_count(p.global_batch),
         f"{p.steps:,}", format_milliseconds(p.compute_s), format_milliseconds(p.allreduce_s),
         f"{100 * p.compute_share:.0f}% : {100 * p.communication_share:.0f}%", format_duration(p.total_s),
         f"{p.ratio_to_fujitsu:.2f}×")
        for p in projections
    )
    return Table(
        headers=("Run", "Measured images/s per device", "Devices", "Global batch", "Steps", "Compute per step",
                 "All-reduce per step", "Compute : all-reduce", "Projected time",
                 f"÷ Fujitsu's {format_published_duration(FUJITSU.time_s)}"),
        rows=rows, numeric=(False,) + (True,) * 9,
    )


def projection_intro(settings: ProjectionSettings) -> str:
    return (f"The time each run's recipe would need on {settings.devices:,} devices "
            f"of the kind it was measured on, for {format_count(settings.epochs)} epochs of the full ImageNet-1k "
            f"train set, under a simple cost model.")


def projection_assumptions(settings: ProjectionSettings) -> list[str]:
    """The cost model's assumptions, in words, for the report."""
    P = f"{settings.devices:,}"
    return [
        f"Same recipe at P = {P} devices: same model, precision and per-device batch as measured, so the global "
        "batch is P × the per-device batch. Whether that batch still reaches the target accuracy is not estimated.",
        f"{format_count(settings.epochs)} epochs of {IMAGENET_TRAIN_IMAGES:,} images: "
        "steps = ⌈epochs × images ÷ global batch⌉.",
        "Compute per step = per-device batch ÷ measured images/s per device (after the first epoch when the run "
        "had more than one). The measured rate already includes the run's own data loading and all-reduce, so "
        "this part errs on the slow side.",
        f"All-reduce per step: ring algorithm, 2·(P−1)/P × gradient bytes ÷ bandwidth + 2·(P−1) × latency, at "
        f"{format_count(settings.link_gbps)} Gbit/s and {format_count(settings.link_latency_us)} µs per device.",
        "Gradient bytes = parameters (torchvision, 1,000 classes) × 2 for bf16/fp16 runs, × 4 for 32-true: "
        "gradients sent in the training precision, as the records did and as flashnet's GPU training does "
        "(DDP's bf16/fp16 compression hook).",
        "No overlap of compute and communication (step time = compute + all-reduce); real DDP overlaps them "
        "during the backward pass, and the records used hierarchical or 2D-torus all-reduce.",
        "Start-up, evaluation, checkpoints and data staging are not counted.",
    ]


def fujitsu_comparisons(projections: list[Projection]) -> list[str]:
    """One sentence per projection comparing it with Fujitsu's published 74.7 s."""
    lines = []
    for p in projections:
        relation = "faster than" if p.total_s < FUJITSU.time_s else "slower than"
        lines.append(
            f"{p.run}: projected {format_duration(p.total_s)} on {p.devices:,} devices (global batch "
            f"{format_count(p.global_batch)}; {100 * p.communication_share:.0f}% of each step in all-reduce), "
            f"{p.ratio_to_fujitsu:.2f}× the time of Fujitsu's {format_duration(FUJITSU.time_s)} on "
            f"{FUJITSU.devices:,} {FUJITSU.device_name} (batch {FUJITSU.batch_size:,}, published), i.e. "
            f"{relation} it."
        )
    return lines
