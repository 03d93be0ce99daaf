"""``flashnet recipe``: a run or preset resolved as a person checks it before spending GPU-hours.

It reads the configuration the way the workflow does (``config/config.yaml``, then each
``--configfile`` merged over it, presets expanded, every key validated: ``config.load_workflow_config``), and shows what the training
job will do with it: batches, steps, the LR schedule's points, the validation epochs, and the MLPerf
division whose rules it meets. ``--mllog`` prints instead the init-phase hyperparameters the run's
MLPerf log carries, as ``:::MLLOG`` lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


from . import config as cfg
from .data.sources import IMAGENET_COUNTS
from .mlperf.rules import closed_division_breaks
from .train.schedule import WarmupPolySchedule, run_steps_per_epoch, schedule_for_run, total_steps

WORKFLOW_ROOT = cfg.WORKFLOW_ROOT
IMAGENET_TRAIN_IMAGES = IMAGENET_COUNTS["train"]  # 1,281,167


def resolve_run(name: str, configfiles: list[Path], root: Path = WORKFLOW_ROOT) -> tuple[cfg.RunConfig, str]:
    """(the run, where it came from): a run of the merged configuration, else a preset."""
    run, origin, _ = resolve_with_manifest(name, configfiles, root)
    return run, origin


def resolve_with_manifest(name: str, configfiles: list[Path], root: Path = WORKFLOW_ROOT
                          ) -> tuple[cfg.RunConfig, str, Path | None]:
    """As :func:`resolve_run`, with the configuration's train manifest for a run of it (None for a
    preset, or before the data stage has written one)."""
    presets = cfg.load_presets(root / "config" / "presets.yaml")
    config = cfg.load_workflow_config(Path("."), configfiles)
    runs = config["runs"]
    if name in runs:
        manifest = Path(config.get("results_dir", "results")) / "shards" / "train" / "manifest.json"
        return cfg.RunConfig.from_dict(runs[name], name), "run of the configuration", \
            manifest if manifest.exists() else None
    if name in presets:
        return cfg.RunConfig.from_dict({**presets[name], "preset": name}, name), "preset", None
    raise cfg.ConfigError(f"{name}: neither a run of the configuration ({', '.join(sorted(runs)) or 'none'}) "
                          f"nor a preset ({', '.join(sorted(presets))})")


def train_samples_from(manifest: Path | None) -> tuple[int, str]:
    if manifest is None:
        return IMAGENET_TRAIN_IMAGES, "ImageNet-1k's train set; --manifest for another"
    try:
        samples = json.loads(Path(manifest).read_text())["samples"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise cfg.ConfigError(f"{manifest}: not a shard manifest ({error})") from None
    return int(samples), str(manifest)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What the training job does with a run on ``train_samples`` images."""

    run: cfg.RunConfig
    train_samples: int
    steps_per_epoch: int
    total_steps: int
    schedule: WarmupPolySchedule

    @classmethod
    def of(cls, run: cfg.RunConfig, train_samples: int) -> "Resolved":
        spe = run_steps_per_epoch(run, train_samples)
        return cls(run, train_samples, spe, total_steps(run.epochs, spe), schedule_for_run(run, spe))

    @property
    def eval_epochs(self) -> list[int]:
        return [e for e in range(1, math.ceil(self.run.epochs) + 1) if self.run.is_eval_epoch(e)]

    @property
    def eval_steps(self) -> list[int]:
        """Optimizer steps after which validation runs (the last step of each validated epoch)."""
        return [min(e * self.steps_per_epoch, self.total_steps) for e in self.eval_epochs]

    def lr_points(self) -> list[tuple[int, float]]:
        """(step, lr) at the run's landmarks: first step, warmup's end, a quarter, half and three
        quarters of the decay, its end (if the run gets there) and the last step."""
        s, last = self.schedule, self.total_steps - 1
        decay = [s.warmup_steps + round(f * s.decay_steps) - 1 for f in (0.25, 0.5, 0.75, 1.0)]
        steps = sorted({0, max(s.warmup_steps - 1, 0), *[d for d in decay if d <= last], last})
        return [(step, s(step)) for step in steps]


def describe(resolved: Resolved, name: str, origin: str, samples_origin: str) -> str:
    run, s, spe = resolved.run, resolved.schedule, resolved.steps_per_epoch
    bn = (f"{run.bn_span} samples = {run.bn_group_size} device(s) × {run.per_device_batch}"
          + (" (SyncBatchNorm)" if run.bn_group_size > 1 else "") if run.bn_span else
          f"per device ({run.per_device_batch} samples)")
    floor_step = s.horizon_steps
    horizon = (f"reaches end_lr {run.end_lr:g} at step {floor_step:,} (epoch {floor_step / spe:.1f})"
               if floor_step <= resolved.total_steps else
               f"still {s(resolved.total_steps - 1):.4g} at the last step: the horizon of {floor_step:,} steps "
               f"outlasts the run's {resolved.total_steps:,}")
    stop = (f"stops at the first validation ≥ {run.target_top1:.1%} top-1" if run.stop_at_target
            else f"time to target {run.target_top1:.1%} read off; trains every epoch")
    evals_text = _shortened(resolved.eval_epochs)
    optimizer = (f"LARS  momentum {run.momentum:g}  weight decay {run.weight_decay:g}  η {run.lars_eta:g}  "
                 f"ε {run.lars_epsilon:g}"
                 + ("" if run.lars_trust_weight_decay is None else f"  trust-ratio λ {run.lars_trust_weight_decay:g}")
                 if run.optimizer == "lars" else
                 f"SGD  momentum {run.momentum:g}  weight decay {run.weight_decay:g}")
    breaks = closed_division_breaks(run)
    crop = (f"scale {list(run.crop_scale)}  ratio [{run.crop_ratio[0]:.4g}, {run.crop_ratio[1]:.4g}]"
            + (f"; val transform from epoch {run.no_augment_from_epoch}" if run.no_augment_from_epoch else ""))
    rows = [
        ("train images", f"{resolved.train_samples:,} ({samples_origin})"),
        ("model", f"{run.model} at {run.image_size} px, {run.precision} on {run.accelerator}"
                  f"{', zero-init last BN γ' if run.zero_init_residual else ''}"),
        ("global batch", f"{run.batch_size:,} = {run.nodes} node(s) × {run.devices_per_node} device(s) × "
                         f"{run.per_device_batch} per device"),
        ("BatchNorm span", bn),
        ("steps per epoch", epoch_text(resolved)),
        ("warmup", f"{_epochs(run.warmup_epochs)} = {s.warmup_steps:,} steps, linear to lr {run.lr:g}"),
        ("decay", f"{s.decay_steps:,} steps, power {run.lr_decay_power:g}; {horizon}"),
        ("length", f"at most {_epochs(run.epochs)} = {resolved.total_steps:,} steps; {stop}"),
        ("validation", f"after epochs {evals_text} (every {run.eval_every_epochs}, offset {run.eval_offset}); "
                       f"after steps {_shortened(resolved.eval_steps)}"),
        ("LR at step", "  ".join(f"{step:,}: {lr:.4g}" for step, lr in resolved.lr_points())),
        ("optimizer", f"{optimizer}  label smoothing {run.label_smoothing:g}"
                      + ("  fc bias decayed" if run.fc_bias_weight_decay else "")),
        ("crop", crop),
        ("MLPerf division", "closed (meets the closed ResNet-50 rules of training 4.0.0)" if not breaks else
                            "open; the closed rules it breaks:"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{name}  ({origin})"]
    lines += [f"  {label:<{width}}  {text}" for label, text in rows]
    lines += [f"  {'':<{width}}    - {why}" for why in breaks]
    return "\n".join(lines)


def epoch_text(resolved: Resolved) -> str:
    """How an epoch is counted, and how much of a pass over the data it is."""
    run, n, spe = resolved.run, resolved.train_samples, resolved.steps_per_epoch
    if run.epoch_steps == "floor":
        how = f"floor({n:,} / {run.batch_size:,})"
    else:
        how = f"ceil(floor({n:,} / {run.world_size:,} ranks) / {run.per_device_batch:,}) (ceil_per_rank)"
    return (f"{spe:,} = {how}: {spe * run.batch_size:,} samples, {spe * run.batch_size / n:.4f} of a pass "
            f"over the {n:,} (the samples are one stream of passes)")


def _shortened(numbers: list[int]) -> str:
    text = [f"{n:,}" for n in numbers]
    return ", ".join(text) if len(text) <= 12 else f"{', '.join(text[:6])}, …, {', '.join(text[-3:])}"


def _epochs(count: float) -> str:
    return f"{count:g} epoch" + ("" if count == 1 else "s")


def mllog_lines(resolved: Resolved) -> list[str]:
    from .mlperf import mllog  # mlperf-logging: the train extra's

    # train_samples is N, the data set's size, as NVIDIA's dali.py logs num_examples (not steps × B)
    events = [*mllog.hyperparameters(resolved.run, resolved.steps_per_epoch), ("train_samples", resolved.train_samples)]
    return [mllog.line(key, value, caller_depth=2) for key, value in events]


def recipe_from_cli(args) -> None:
    run, origin, own_manifest = resolve_with_manifest(args.name, args.configfile or [])
    samples, samples_origin = train_samples_from(args.manifest or own_manifest)
    resolved = Resolved.of(run, samples)
    if args.mllog:
        print("\n".join(mllog_lines(resolved)))
    else:
        print(describe(resolved, args.name, origin, samples_origin))
