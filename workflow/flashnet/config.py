"""Typed views of the validated configuration.

Snakemake validates the whole config against ``workflow/schemas/config.schema.yaml`` (filling in
defaults) before any rule runs; rules hand the relevant section to the command line as JSON, and
the code below turns it into frozen dataclasses. Checks that need more than one key (batch size
against world size, precision against device) live here, so they run before any job is submitted.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the key that causes it in the message."""


def load_presets(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    with path.open() as f:
        presets = yaml.safe_load(f) or {}
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise ConfigError(f"{path}: expected a mapping of preset name to run settings")
    return presets


def expand_presets(runs: Any, presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return ``runs`` with each ``preset:`` replaced by the preset's keys (the run's own keys win)."""
    if not isinstance(runs, dict):
        raise ConfigError(f"runs: expected a mapping of run name to settings, got {type(runs).__name__}")
    expanded = {}
    for name, run in runs.items():
        if run is None:
            run = {}
        if not isinstance(run, dict):
            raise ConfigError(f"runs.{name}: expected a mapping of settings, got {type(run).__name__}")
        preset_name = run.get("preset")
        if preset_name is None:
            expanded[name] = dict(run)
            continue
        if preset_name not in presets:
            raise ConfigError(
                f"runs.{name}.preset: unknown preset {preset_name!r}; known: {', '.join(sorted(presets))}"
            )
        expanded[name] = {**presets[preset_name], **run}
    return expanded


def _from_dict(cls, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(
        f.name for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**values)


# The values the schema allows, checked again here for runs built outside Snakemake.
CHOICES = {
    "model": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    "optimizer": ("lars", "sgd"),
    "precision": ("bf16-mixed", "16-mixed", "32-true"),
    "accelerator": ("auto", "cpu", "gpu"),
    "decode_device": ("cpu", "cuda"),
    "wandb_mode": ("offline", "online", "disabled"),
}
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run, as in ``runs.<name>`` of the config (see the schema for each key)."""

    model: str
    image_size: int
    epochs: float
    batch_size: int
    optimizer: str
    lr: float
    warmup_epochs: float
    lr_decay_power: float
    end_lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    lars_eta: float
    lars_trust_clip: bool
    lars_exclude_bn_bias: bool
    zero_init_residual: bool
    precision: str
    accelerator: str
    nodes: int
    devices_per_node: int
    compile: bool
    loader_workers: int
    decode_device: str
    crop_scale: tuple[float, float]
    shuffle_buffer: int
    target_top1: float
    seed: int
    checkpoint_every_steps: int
    log_every_steps: int
    preset: str | None = None
    loggers: tuple[str, ...] = ("csv",)
    mlflow_tracking_uri: str | None = None
    wandb_mode: str = "offline"

    @classmethod
    def from_dict(cls, values: dict[str, Any], name: str = "run") -> "RunConfig":
        values = dict(values)
        if "crop_scale" in values:
            values["crop_scale"] = tuple(values["crop_scale"])
        if "loggers" in values:
            values["loggers"] = tuple(values["loggers"])
        run = _from_dict(cls, values, f"runs.{name}")
        run.check(name)
        return run

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def per_device_batch(self) -> int:
        return self.batch_size // self.world_size

    @property
    def eval_resize(self) -> int:
        """Eval resizes the short side to 256/224 of the train crop, then centre-crops (ResNet convention)."""
        return round(self.image_size * 256 / 224)

    def check(self, name: str = "run") -> None:
        where = f"runs.{name}"
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{where}.{key}: unknown {key} {getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"{where}.batch_size: {self.batch_size} does not divide by the world size "
                f"{self.world_size} (nodes {self.nodes} × devices_per_node {self.devices_per_node})"
            )
        if self.precision == "16-mixed" and self.accelerator == "cpu":
            raise ConfigError(f"{where}.precision: 16-mixed needs a GPU (accelerator is cpu); use bf16-mixed or 32-true")
        if self.decode_device == "cuda" and self.accelerator == "cpu":
            raise ConfigError(f"{where}.decode_device: cuda needs a GPU (accelerator is cpu)")
        unknown = [logger for logger in self.loggers if logger not in LOGGERS]
        if unknown:
            raise ConfigError(f"{where}.loggers: unknown logger(s) {', '.join(map(repr, unknown))}; "
                              f"expected some of {', '.join(LOGGERS)}")
        low, high = self.crop_scale
        if not low <= high:
            raise ConfigError(f"{where}.crop_scale: lower bound {low} exceeds upper bound {high}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"{where}.warmup_epochs: {self.warmup_epochs} must be below epochs {self.epochs}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["crop_scale"] = list(self.crop_scale)
        values["loggers"] = list(self.loggers)
        return values


@dataclasses.dataclass(frozen=True)
class LauncherConfig:
    """Where and how submitit starts a job: ``launcher:`` of the config plus the rule's resources."""

    cluster: str  # local | slurm (auto is resolved by the workflow before this is built)
    timeout_min: int
    signal_delay_s: int
    max_num_timeout: int
    cpus_per_task: int
    mem_gb_per_node: float | None
    setup: tuple[str, ...]
    slurm_extra: dict[str, Any]
    ddp_timeout_s: int
    poll_s: float
    slurm_partition: str | None = None
    slurm_account: str | None = None
    gpus_per_node: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LauncherConfig":
        values = dict(values)
        values["setup"] = tuple(values.get("setup", ()))
        launcher = _from_dict(cls, values, "launcher")
        if launcher.cluster not in ("local", "slurm"):
            raise ConfigError(f"launcher.cluster: expected local or slurm, got {launcher.cluster!r}")
        return launcher


def loads_json_arg(text: str, what: str) -> dict[str, Any]:
    """Parse a JSON object given on the command line, naming the option on failure."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a JSON object")
    return value
