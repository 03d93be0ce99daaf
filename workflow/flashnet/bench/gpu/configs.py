"""The benchmark's configurations (what each measures, in which order) and its problem size."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One measured configuration. ``kind``: reference (plain loop), project (the LightningModule,
    through Trainer.fit and a manual loop) or loader (data pipeline only, no model)."""

    id: str
    kind: str
    title: str
    precision: str = "bf16-mixed"
    compile_mode: str | None = None  # None: eager; "pipeline": whatever --pipeline-compile-mode picks
    channels_last: bool = True
    data: str = "synthetic"  # synthetic | shards-cpu | shards-gpu


CONFIGS = {c.id: c for c in (
    BenchConfig("5", "reference", "plain reference: torchvision NCHW, autocast bf16, SGD, eager",
                channels_last=False),
    BenchConfig("5c", "reference", "plain reference, channels_last"),
    BenchConfig("1", "project", "project step, synthetic, 32-true (TF32 convs), eager", precision="32-true"),
    BenchConfig("2e", "project", "project step, synthetic, bf16-mixed, eager"),
    BenchConfig("2", "project", "project step, synthetic, bf16-mixed, compile", compile_mode="default"),
    BenchConfig("2h", "project", "project step, synthetic, 16-mixed (fp16, GradScaler), compile", precision="16-mixed",
                compile_mode="default"),
    # Not selectable by a run (`compile: true` is mode default): how much a run leaves behind.
    BenchConfig("2r", "project", "project step, synthetic, bf16-mixed, compile reduce-overhead (no run does this)",
                compile_mode="reduce-overhead"),
    BenchConfig("2m", "project", "project step, synthetic, bf16-mixed, compile max-autotune-no-cudagraphs "
                "(no run does this)", compile_mode="max-autotune-no-cudagraphs"),
    BenchConfig("3d", "loader", "data only: shards, CPU decode in workers, copy to GPU", data="shards-cpu"),
    BenchConfig("3", "project", "pipeline: shards, CPU decode, bf16-mixed, compile", compile_mode="pipeline",
                data="shards-cpu"),
    BenchConfig("4d", "loader", "data only: shards, nvJPEG decode + GPU crop/flip", data="shards-gpu"),
    BenchConfig("4", "project", "pipeline: shards, nvJPEG decode, bf16-mixed, compile", compile_mode="pipeline",
                data="shards-gpu"),
)}
RUN_ORDER = tuple(CONFIGS)  # reference first: a baseline survives even if a later config fails
SYNTHETIC_COMPILED = ("2", "2r", "2m")
# What `flashnet bench gpu` measures unless told otherwise: every configuration a run can select
# (2r and 2m are compile modes no run setting selects).
DEFAULT_CONFIGS = ("5", "5c", "1", "2e", "2", "2h", "3d", "3", "4d", "4")
# Per-device batch sizes of the presets (config/presets.yaml: records run 32-64 per device, where
# host overhead decides a step of a few ms) up to the single-GPU references' 256.
DEFAULT_BATCH_SIZES = (32, 64, 128, 256)


def select_configs(text: str) -> list[BenchConfig]:
    """The configurations named in ``--configs`` (comma-separated ids, or ``all``), in RUN_ORDER."""
    text = ",".join(DEFAULT_CONFIGS) if text.strip() == "default" else text
    wanted = set(RUN_ORDER) if text.strip() == "all" else {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(wanted - set(CONFIGS))
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(RUN_ORDER)}, all")
    return [CONFIGS[c] for c in RUN_ORDER if c in wanted]


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model and problem size: ResNet-50 at 224 px on a GPU, ResNet-18 at 32 px for --smoke."""

    model: str
    image_size: int
    batch_size: int
    steps: int
    warmup: int
    matmul_size: int
    num_classes: int
    smoke: bool

    @property
    def matmul_dtype(self) -> torch.dtype:
        """bf16, the training precision; float32 in the smoke run, which trains in 32-true."""
        return torch.float32 if self.smoke else torch.bfloat16


def smoke_batch_size(batch_size: int) -> int:
    """The CPU dry run's stand-in for a GPU batch size: a sixteenth, at least 2 (BatchNorm in
    training needs two values a channel at ResNet's 1×1 last stage). 32, 64, 128, 256 -> 2, 4, 8, 16."""
    return max(2, batch_size // 16)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch-sizes``: comma-separated positive integers, measured in the order given."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {text!r}: expected at least one positive integer")
    return sizes


def data_steps(warmup: int, steps: int, workers: int) -> tuple[int, int]:
    """(warm-up, timed) steps for configurations fed by the loader. Its workers prefetch up to
    4 batches each (train_loader's ``prefetch_factor``), and roughly one batch per worker is in flight at any time
    once the loop runs at the loader's pace: 2 per worker of warm-up gets past the start-up wave,
    10 per worker of timed steps keeps the leftover backlog under ~10% of the window."""
    workers = max(workers, 1)
    return max(warmup, 2 * workers), max(steps, 10 * workers)
