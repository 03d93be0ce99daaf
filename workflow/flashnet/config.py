"""Typed views of the validated configuration, derived from the schema.

``workflow/schemas/config.schema.yaml`` is the one place that declares a run or launcher key: its
type, allowed values, default and description. Snakemake validates the whole config against it
(filling in defaults) before any rule runs; the classes below take their fields and defaults from
the same file, and :meth:`RunConfig.from_dict` validates again, so a run built anywhere else (a
test, a benchmark, ``flashnet recipe``) is checked the same way. Adding a run key therefore touches
the schema, the code that uses it and its test.

Checks that need more than one key (batch size against world size, precision against device, the
LR schedule's horizon) live here too, so they run before any job is submitted.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

WORKFLOW_ROOT = Path(__file__).resolve().parents[2]  # holds the Snakefile and config/
SCHEMA_FILE = WORKFLOW_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration problem, with the key that causes it in the message."""


# --------------------------------------------------------------------------- the schema


@functools.cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def section(pointer: str) -> dict[str, Any]:
    """The sub-schema at ``pointer`` (``"$defs/run"``, ``"properties/launcher"``)."""
    node = schema()
    for part in filter(None, pointer.split("/")):
        node = node[part]
    return node


def defaults(pointer: str) -> dict[str, Any]:
    """Every key's default in the object schema at ``pointer`` (keys without one are left out)."""
    return {name: copy.deepcopy(spec["default"])
            for name, spec in section(pointer)["properties"].items() if "default" in spec}


def validate(values: dict[str, Any], pointer: str, where: str) -> None:
    """Validate ``values`` against the sub-schema, naming the first bad key as ``where.key``."""
    validator = jsonschema.Draft202012Validator(section(pointer))
    error = jsonschema.exceptions.best_match(validator.iter_errors(values))
    if error is None:
        return
    path = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties":
        unknown = sorted(set(values) - set(section(pointer)["properties"]))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    raise ConfigError(f"{where}.{path}: {error.message}" if path else f"{where}: {error.message}")


def _frozen(value: Any) -> Any:
    """Lists become tuples (hashable, immutable fields); mappings keep their keys."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_thawed(v) for v in value]
    if isinstance(value, dict):
        return {k: _thawed(v) for k, v in value.items()}
    return value


_PYTHON_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str, "array": tuple,
                 "object": dict, "null": type(None)}


def _python_type(spec: dict[str, Any]) -> Any:
    if "enum" in spec:
        return str
    kinds = spec.get("type", "string")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    types = [_PYTHON_TYPES[kind] for kind in kinds]
    return functools.reduce(lambda a, b: a | b, types)


def schema_fields(pointer: str) -> list[tuple[str, Any, Any]]:
    """(name, type, field) for ``dataclasses.make_dataclass``: one per key of the schema section."""
    fields = []
    for name, spec in section(pointer)["properties"].items():
        default = _frozen(spec.get("default"))
        fields.append((name, _python_type(spec), dataclasses.field(default=default)))
    return fields


def _build(cls, values: dict[str, Any], pointer: str, where: str):
    unknown = sorted(set(values) - set(section(pointer)["properties"]) - set(getattr(cls, "EXTRA_FIELDS", ())))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    filled = {**defaults(pointer), **values}
    validate({k: v for k, v in filled.items() if k in section(pointer)["properties"]}, pointer, where)
    return cls(**{k: _frozen(v) for k, v in filled.items()})


# --------------------------------------------------------------------------- presets


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


def merge_config(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Snakemake's merge of a --configfile over the config: nested mappings merge, the rest replaces."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge_config(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def load_workflow_config(directory: Path, configfiles: list[Path], replace: bool = False) -> dict[str, Any]:
    """The configuration Snakemake would run in ``directory``: its config/config.yaml (the workflow's
    own where it has none) unless replaced, the --configfile files over it, presets expanded and the
    schema's defaults filled in (Snakemake's own validation, naming the key)."""
    from snakemake.utils import validate as snakemake_validate

    base = Path(directory) / "config" / "config.yaml"
    if not base.exists():
        base = WORKFLOW_ROOT / "config" / "config.yaml"
    config: dict[str, Any] = {}
    for path in ([] if replace and configfiles else [base]) + list(configfiles):
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read it ({' '.join(str(error).split())})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        config = merge_config(config, loaded)
    config["runs"] = expand_presets(config.get("runs", {}), load_presets(WORKFLOW_ROOT / "config" / "presets.yaml"))
    for name, run in config["runs"].items():  # one line naming runs.<name>.<key>
        RunConfig.from_dict(run, name)
    try:
        snakemake_validate(config, str(SCHEMA_FILE))
    except Exception as error:  # snakemake's WorkflowError, naming the key
        raise ConfigError(" ".join(str(error).split())[:500]) from None
    return config


# --------------------------------------------------------------------------- runs

RUN = "$defs/run"


def device_problem(precision: str, decode_device: str, bn_groups: int, accelerator: str,
                   bf16_native: bool = True, gpu_name: str = "this GPU") -> str | None:
    """Why a run with these settings cannot train on ``accelerator`` (cpu | gpu), or None. The one
    place that knows what each device supports: checked from the config before submission and
    again on the node, where the GPU's own abilities are known."""
    if precision == "16-mixed" and accelerator == "cpu":
        return "precision: 16-mixed needs a GPU (this run is on the CPU); use bf16-mixed or 32-true"
    if precision == "bf16-mixed" and accelerator == "gpu" and not bf16_native:
        return f"precision: bf16-mixed is not supported by {gpu_name} (no bf16 Tensor Cores); use 16-mixed"
    if decode_device == "cuda" and accelerator == "cpu":
        return "decode_device: cuda needs a GPU (this run is on the CPU)"
    if bn_groups > 1 and accelerator == "cpu":
        return (f"bn_span: BatchNorm synchronised over groups of {bn_groups} devices needs GPUs (SyncBatchNorm); "
                "on the CPU bn_span must equal the per-device batch (or be null)")
    return None


class _RunMethods:
    """Derived quantities and cross-key checks of a run; its fields are the schema's run keys."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], name: str = "run") -> "RunConfig":
        """A run from its settings: schema defaults for keys left out, validated, cross-checked."""
        run = _build(cls, values, RUN, f"runs.{name}")
        run.check(name)
        return run

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def result_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the result-neutral keys: what decides the run's result."""
        return {name: value for name, value in self.to_dict().items() if name not in RESULT_NEUTRAL_KEYS}

    def replace(self, **changes) -> "RunConfig":
        return type(self).from_dict({**self.to_dict(), **changes}, "run")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def per_device_batch(self) -> int:
        return self.batch_size // self.world_size

    @property
    def bn_group_size(self) -> int:
        """Devices whose BatchNorm statistics are pooled (1: per device)."""
        return 1 if self.bn_span is None else self.bn_span // self.per_device_batch

    @property
    def eval_resize(self) -> int:
        """Eval resizes the short side to 256/224 of the train crop, then centre-crops (ResNet convention)."""
        return round(self.image_size * 256 / 224)

    def is_eval_epoch(self, epoch: int) -> bool:
        """Whether validation runs after (1-based) ``epoch``: every ``eval_every_epochs`` epochs
        from ``eval_offset``, as NVIDIA's MLPerf runs (``epoch % eval_period == eval_offset`` with
        0-based epochs), and always after the last one, so every run ends with a measured top-1."""
        last = math.ceil(self.epochs)
        return epoch >= last or (epoch - 1) % self.eval_every_epochs == self.eval_offset

    def loader_processes(self, cpus_per_task: int) -> int:
        """Loader worker processes per device: ``loader_workers``, or for ``auto`` every CPU of the
        task but the one its training process runs on, and at least one, so that loading overlaps
        the step (never more than ``cpus_per_task``, which a run is refused for)."""
        return max(cpus_per_task - 1, 1) if self.loader_workers == "auto" else self.loader_workers

    def augments(self, epoch: int) -> bool:
        """Whether (0-based) ``epoch`` crops at random and flips (else: the validation transform)."""
        return self.no_augment_from_epoch is None or epoch + 1 < self.no_augment_from_epoch

    def check(self, name: str = "run") -> None:
        where = f"runs.{name}"
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"{where}.batch_size: {self.batch_size} does not divide by the world size "
                f"{self.world_size} (nodes {self.nodes} × devices_per_node {self.devices_per_node})"
            )
        for key in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, key)
            if not low <= high:
                raise ConfigError(f"{where}.{key}: lower bound {low} exceeds upper bound {high}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"{where}.warmup_epochs: {self.warmup_epochs} must be below epochs {self.epochs}")
        if self.lr_decay_steps is not None and self.lr_decay_epochs is not None:
            raise ConfigError(f"{where}.lr_decay_steps: set lr_decay_steps or lr_decay_epochs, not both")
        if self.eval_offset >= self.eval_every_epochs:
            raise ConfigError(f"{where}.eval_offset: {self.eval_offset} must be below eval_every_epochs "
                              f"{self.eval_every_epochs}")
        self._check_bn_span(where)
        accelerator = self.accelerator if self.accelerator != "auto" else "gpu"
        problem = device_problem(self.precision, self.decode_device, self.bn_group_size, accelerator)
        if problem and self.accelerator != "auto":
            raise ConfigError(f"{where}.{problem}")

    def _check_bn_span(self, where: str) -> None:
        if self.bn_span is None:
            return
        per_device = self.per_device_batch
        if self.bn_span % per_device:
            raise ConfigError(
                f"{where}.bn_span: {self.bn_span} samples cannot be covered by whole devices of {per_device} "
                f"samples each (batch_size {self.batch_size} over {self.world_size} devices); choose a world size "
                f"whose per-device batch divides {self.bn_span}")
        group = self.bn_span // per_device
        if self.world_size % group:
            raise ConfigError(
                f"{where}.bn_span: groups of {group} devices ({self.bn_span} / {per_device} per device) do not "
                f"divide the world size {self.world_size}")


def result_neutral_keys(pointer: str) -> frozenset[str]:
    """The keys of a schema section marked ``x-result-neutral: true``: they change how a run is
    logged, fed or checkpointed, never the numbers it computes (the schema is the one list)."""
    return frozenset(name for name, spec in section(pointer)["properties"].items() if spec.get("x-result-neutral"))


# Run keys whose change neither retrains a finished run (the train rule leaves them out of the
# params Snakemake compares) nor discards an interrupted run's checkpoint.
RESULT_NEUTRAL_KEYS = result_neutral_keys(RUN)


RunConfig = dataclasses.make_dataclass("RunConfig", schema_fields(RUN), bases=(_RunMethods,), frozen=True)
RunConfig.__module__ = __name__  # picklable by name (make_dataclass takes `module=` only from Python 3.12)
RunConfig.__doc__ = "One training run, as ``runs.<name>`` of the config: one field per key of the schema's run."


# --------------------------------------------------------------------------- launcher

LAUNCHER = "properties/launcher"


class _LauncherMethods:
    # Not config keys: the rule fills them from the Snakemake resources and the run.
    EXTRA_FIELDS = ("slurm_partition", "slurm_account", "slurm_extra", "gpus_per_node")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LauncherConfig":
        launcher = _build(cls, values, LAUNCHER, "launcher")
        if launcher.cluster not in ("local", "slurm"):
            raise ConfigError(f"launcher.cluster: expected local or slurm, got {launcher.cluster!r}")
        return launcher


LauncherConfig = dataclasses.make_dataclass(
    "LauncherConfig",
    schema_fields(LAUNCHER) + [
        ("slurm_partition", str | None, dataclasses.field(default=None)),
        ("slurm_account", str | None, dataclasses.field(default=None)),
        ("slurm_extra", dict, dataclasses.field(default_factory=dict)),
        ("gpus_per_node", int, dataclasses.field(default=0)),
    ],
    bases=(_LauncherMethods,), frozen=True,
)
LauncherConfig.__module__ = __name__
LauncherConfig.__doc__ = ("Where and how submitit starts a job: ``launcher:`` of the config (cluster resolved) "
                          "plus the rule's resources.")


# --------------------------------------------------------------------------- MLPerf log

MLPERF = "properties/mlperf"


class _MlperfMethods:
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MlperfConfig":
        return _build(cls, values, MLPERF, "mlperf")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MlperfConfig = dataclasses.make_dataclass("MlperfConfig", schema_fields(MLPERF), bases=(_MlperfMethods,), frozen=True)
MlperfConfig.__module__ = __name__
MlperfConfig.__doc__ = "What each run's MLPerf log says about the submission: ``mlperf:`` of the config."
