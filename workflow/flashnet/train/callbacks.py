"""Lightning callbacks: the per-epoch and per-step records (timed by :class:`.clock.TrainClock`),
resume checkpoints, and plain progress lines for job logs.

Every record lives in the callbacks' checkpointed state, and the CSV files are rewritten from that
state, so a run resumed from an earlier checkpoint never lists an epoch twice.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl

from ..files import atomic_path
from ..progress import format_duration
from ..runfolder import METRICS_COLUMNS, METRICS_FILE, STEPS_COLUMNS, STEPS_FILE
from .checkpoints import SETTINGS_KEY, BackgroundWriter, host_copy
from .clock import CHECKPOINT, VALIDATION, TrainClock
from .module import average_batchnorm_statistics


class Preempted(Exception):
    """Raised once a requested stop has been checkpointed: the launcher requeues the job."""


class NonFiniteLoss(FloatingPointError):
    pass


@dataclasses.dataclass
class StopRequest:
    """Set from a signal handler (time limit or preemption); acted on at the next check, when every
    rank agrees, at a batch boundary."""

    requested: bool = False
    reason: str = ""

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, reason


def write_csv(path: Path, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def logged_loss(pl_module, outputs) -> float:
    """A log step's train loss: the mean over all ranks since the last log step, as RunHealth agreed
    it at this batch end; this rank's last loss where no agreement was taken (no RunHealth)."""
    agreed = getattr(pl_module, "agreement", None)
    if agreed is not None and agreed.mean_loss is not None:
        return agreed.mean_loss
    return float(outputs["loss"] if isinstance(outputs, dict) else outputs)


class RunRecords(pl.Callback):
    """Per-epoch rows (metrics.csv) and per-log-interval rows (steps.csv), written by rank 0.

    ``wall_s`` is the fit's wall clock (validation and checkpoints included: time to target counts
    them); ``images_per_s`` is over the training time of its stretch, validation and checkpoint
    writes left out (a job's start-up stays in its first stretch); ``validation_s`` is how long that
    row's validation took."""

    def __init__(self, out_dir: Path, clock: TrainClock, global_batch: int, steps_per_epoch: int,
                 log_every_steps: int, target_top1: float):
        self.out_dir = out_dir
        self.clock = clock
        self.global_batch = global_batch
        self.steps_per_epoch = steps_per_epoch
        self.log_every_steps = log_every_steps
        self.target_top1 = target_top1
        self.epochs: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self._mark = None  # (wall_s, step) at the start of the current measured stretch
        self._epoch_mark = None

    def _point(self, trainer) -> tuple[float, int]:
        return self.clock.training_elapsed(trainer), trainer.global_step

    def _rate(self, trainer, mark: tuple[float, int]) -> float:
        seconds, step = self._point(trainer)
        return (step - mark[1]) * self.global_batch / max(seconds - mark[0], 1e-9)

    # measured stretches start after a synchronisation, and only at batch boundaries
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_mark = self._mark = self._point(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.log_every_steps or not trainer.is_global_zero:
            return
        rate = self._rate(trainer, self._mark)
        self._mark = self._point(trainer)
        loss = logged_loss(pl_module, outputs)
        self.steps.append({
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "wall_s": round(self.clock.elapsed(trainer), 3),
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),  # LARS: a device tensor
            "train_loss": round(loss, 5),
            "images_per_s": round(rate, 1),
        })

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._epoch_images_per_s = self._rate(trainer, self._epoch_mark)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        train_loss = pl_module.take_mean_train_loss()  # a collective: every rank calls it
        metrics = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch + 1,
            "step": trainer.global_step,
            "wall_s": round(self.clock.elapsed(trainer), 3),
            "train_loss": round(train_loss, 5),
            "val_top1": round(float(metrics["val_top1"]), 6),
            "val_top5": round(float(metrics["val_top5"]), 6),
            "images_per_s": round(self._epoch_images_per_s, 1),
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),  # LARS: a device tensor
            "validation_s": round(self.clock.last[VALIDATION], 3),  # the clock callback runs first
        }
        self.epochs = [r for r in self.epochs if r["epoch"] < row["epoch"]] + [row]
        self.write(trainer)

    def write(self, trainer) -> None:
        if trainer.is_global_zero:
            write_csv(self.out_dir / METRICS_FILE, METRICS_COLUMNS, self.epochs)
            write_csv(self.out_dir / STEPS_FILE, STEPS_COLUMNS, self.steps)

    def time_to_target(self) -> tuple[float | None, float | None]:
        """(seconds, epochs) at the first validation that reached the target top-1."""
        for row in self.epochs:
            if row["val_top1"] >= self.target_top1:
                return row["wall_s"], row["epoch"]
        return None, None

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run forgets rows logged after its checkpoint (they will be logged again), and
        # measures from here: a mid-epoch resume gets no on_train_epoch_start.
        self.steps = [r for r in self.steps if r["step"] <= trainer.global_step]
        self.epochs = [r for r in self.epochs if r["step"] <= trainer.global_step]
        self.write(trainer)
        self._epoch_mark = self._mark = self._point(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs, self.steps = state["epochs"], state["steps"]


class EvalSchedule(pl.Callback):
    """Validation after the run's eval epochs only (``RunConfig.is_eval_epoch``), and, with
    ``stop_at_target``, the end of training at the first validation that reaches the target.

    Lightning validates after epoch e (1-based) when e % ``check_val_every_n_epoch`` == 0, a fixed
    period without an offset; setting it before each epoch to 1 (validate) or to e + 1 (skip)
    gives MLPerf's cadence with an offset. All ranks compute the same top-1 (torchmetrics syncs
    it), so all decide to stop together.
    """

    def __init__(self, validates: Callable[[int], bool], target_top1: float, stop_at_target: bool):
        self.validates, self.target_top1, self.stop_at_target = validates, target_top1, stop_at_target
        self.stopped_at_epoch: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Resumed from the checkpoint written after the validation that reached the target.
        if self.stopped_at_epoch is not None:
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        trainer.check_val_every_n_epoch = 1 if self.validates(epoch) else epoch + 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.stop_at_target:
            return
        if float(trainer.callback_metrics["val_top1"]) >= self.target_top1:
            self.stopped_at_epoch = trainer.current_epoch + 1
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"stopped_at_epoch": self.stopped_at_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopped_at_epoch = state["stopped_at_epoch"]


class PlainProgress(pl.Callback):
    """``epoch 3/16 step 120/256 loss 1.234 lr 0.512 1234 img/s ETA 1 min 20 s`` every few steps, for
    job logs (a terminal gets Lightning's live bar instead)."""

    def __init__(self, clock: TrainClock, total_steps: int, steps_per_epoch: int, epochs: float, global_batch: int,
                 every_steps: int, stream=None):
        self.clock, self.total_steps, self.steps_per_epoch = clock, total_steps, steps_per_epoch
        self.epochs, self.global_batch, self.every_steps = epochs, global_batch, every_steps
        self.stream = stream or sys.stdout
        self._mark = None

    def _point(self, trainer) -> tuple[float, float, int]:
        return self.clock.elapsed(trainer), self.clock.training_elapsed(trainer), trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark = self._point(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_steps or not trainer.is_global_zero:
            return
        (last_wall, last_trained, last_step), self._mark = self._mark, self._point(trainer)
        wall, trained, _ = self._mark
        # img/s over training time; the ETA at the wall-clock pace, validations and checkpoints included
        rate = (step - last_step) * self.global_batch / max(trained - last_trained, 1e-9)
        eta = (self.total_steps - step) * (wall - last_wall) / (step - last_step) if step > last_step else math.inf
        loss = logged_loss(pl_module, outputs)
        print(f"epoch {trainer.current_epoch + 1}/{math.ceil(self.epochs)} step {step}/{self.total_steps} "
              f"loss {loss:.4f} lr {float(trainer.optimizers[0].param_groups[0]['lr']):.4g} "
              f"{rate:.0f} img/s ETA {format_duration(eta) if math.isfinite(eta) else '?'}",
              file=self.stream, flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        print(f"epoch {trainer.current_epoch + 1} val top-1 {float(metrics['val_top1']):.4f} "
              f"top-5 {float(metrics['val_top5']):.4f} at {format_duration(self.clock.elapsed(trainer))}",
              file=self.stream, flush=True)


def layout_of(run: dict[str, Any]) -> dict[str, int]:
    """How a run's global batch is split over devices, and the samples each BatchNorm normalises over
    (``bn_span``, else one device's batch)."""
    world = run["nodes"] * run["devices_per_node"]
    return {"nodes": run["nodes"], "devices_per_node": run["devices_per_node"],
            "per_device_batch": run["batch_size"] // world,
            "bn_span": run.get("bn_span") or run["batch_size"] // world}


def layout_change(old: dict[str, int], new: dict[str, int]) -> dict[str, str]:
    """``{key: "old → new"}`` for each layout figure that differs (empty: the same layout)."""
    return {key: f"{old[key]} → {new[key]}" for key in new if old.get(key) != new[key]}


class ResumeCheckpoints(pl.callbacks.Checkpoint):
    """Resume checkpoints by time and by signal (issue 20), at batch boundaries: every
    ``every_minutes`` (rank 0's clock), when a stop is requested (preemption, time limit), and after
    the last validation (the end of training, or the one that reached the target, so a resumed run
    knows it stopped). Written in the background from a host copy (:class:`.checkpoints.BackgroundWriter`);
    the stop and end checkpoints wait until they are on disk.

    Every ``check_every`` steps the ranks agree in one all-reduce (MAX) on three flags: a stop
    requested on any rank, the first non-finite loss step seen on any, and whether rank 0's clock
    says a checkpoint is due; no other collective runs on the step path. A checkpoint due at the
    last step of an epoch that validates is written after the validation (a checkpoint there
    would resume into the validation already run). ``settings`` (:func:`.checkpoints.run_settings`)
    are written into every checkpoint; the checkpoint's state also records the device layout, so a
    run resumed on another layout says so (:attr:`layout_changes`, in summary.json).
    """

    def __init__(self, path: Path, every_minutes: float, check_every: int, steps_per_epoch: int, stop: StopRequest,
                 settings: dict[str, Any], scaler_watch: bool = False,
                 validates: Callable[[int], bool] = lambda epoch: True, clock: TrainClock | None = None):
        self.path = path
        self.clock = clock  # times what training waits for (the host copy; the final waits)
        self.every_s = every_minutes * 60
        self.check_every = check_every
        self.steps_per_epoch = steps_per_epoch
        self.stop = stop
        self.settings = settings
        self.layout = layout_of(settings["run"])
        self.layout_changes: list[dict[str, Any]] = []  # carried through the checkpoints
        self.validates = validates  # validates(1-based epoch): whether validation follows that epoch
        self.scaler_watch = scaler_watch
        self.writer = BackgroundWriter(path)
        self._deferred = (False, False)  # (stop, due) agreed at an epoch's last step, acted on after validation
        self._last_scale = None
        self._last_written = time.monotonic()

    def _snapshot(self, trainer) -> dict[str, Any]:
        # The dict Trainer.save_checkpoint writes; built on rank 0 alone (no hook of this run's
        # callbacks or module takes part in a collective; DDP's optimizer state is not sharded).
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        state[SETTINGS_KEY] = self.settings
        return host_copy(state)

    def save(self, trainer: pl.Trainer, wait: bool) -> None:
        """Checkpoint now: rank 0 copies the state to the host and writes it in the background;
        ``wait`` (stop, end): until it is on disk, all ranks leaving together. Without ``wait`` a
        write still in flight makes this one skipped, and it is due again at the next check
        (:class:`.checkpoints.BackgroundWriter` says why)."""
        # Every rank's BN running statistics go into the checkpoint as their mean, not rank 0's alone
        # (without DDP's buffer broadcast each rank keeps its own), so a resumed run evaluates with the
        # mean an uninterrupted one would: the statistics never feed back into training, and their mean
        # at evaluation is the same whenever it is also taken in between. A collective: every rank
        # takes part before rank 0 decides whether it writes.
        average_batchnorm_statistics(trainer.lightning_module.model)
        trainer.lightning_module.share_epoch_loss()  # likewise the epoch's running train loss
        writes = trainer.is_global_zero and (wait or not self.writer.busy)  # else skipped: due again next check
        if not (writes or wait):
            return  # nothing here for training to wait for (nor to time)
        with self.clock.timed(CHECKPOINT, trainer) if self.clock else contextlib.nullcontext():
            if writes:
                self.writer.start(self._snapshot(trainer))
                self._last_written = time.monotonic()
            if wait:
                if trainer.is_global_zero:
                    self.writer.wait()
                trainer.strategy.barrier("resume-checkpoint")

    def _due(self, trainer) -> bool:
        return trainer.is_global_zero and time.monotonic() - self._last_written >= self.every_s

    def agreement_flags(self, trainer) -> dict[str, bool]:
        """What every rank must agree on at a check (any rank's true wins); RunHealth asks the same.
        ``due``: rank 0's clock says a periodic checkpoint is due (the other ranks say no)."""
        return {"stop": self.stop.requested, "due": self._due(trainer)}

    def _agree(self, trainer, pl_module) -> tuple[bool, int, bool]:
        # The module's one all-reduce per batch end, shared with RunHealth (which takes it first at
        # log steps, so the logged loss is over all ranks).
        agreed = pl_module.agree_across_ranks(self.agreement_flags(trainer))
        return agreed.stop, agreed.nonfinite_step, agreed.flags.get("due", False)

    def _agree_and_check(self, trainer, pl_module) -> tuple[bool, bool]:
        """Agree across ranks on (stop, checkpoint due); fail on a non-finite loss seen since the
        start, naming its step."""
        stop, nonfinite_step, due = self._agree(trainer, pl_module)
        if nonfinite_step >= 0:
            self.writer.wait()  # a write in flight is of an earlier, finite state: let it finish
            raise NonFiniteLoss(f"loss became NaN or infinite at step {nonfinite_step}; stopping (the last resume "
                                f"checkpoint, if any, is {self.path})")
        self._watch_scaler(trainer)
        return stop, due

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.check_every:
            return
        stop, due = self._agree_and_check(trainer, pl_module)
        if step % self.steps_per_epoch == 0 and self.validates(trainer.current_epoch + 1):
            self._deferred = (stop, due)  # this epoch's checkpoint follows its validation
            return
        if due or stop:
            self.save(trainer, wait=stop)
        if stop:
            raise Preempted(f"stopped at step {step} ({self.stop.reason}); checkpoint {self.path}")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # Checked before saving: a run that went non-finite since the last check (or in the last
        # steps of training) fails here, and its last good checkpoint is kept.
        stop, due = self._agree_and_check(trainer, pl_module)
        stop, due = stop or self._deferred[0], due or self._deferred[1]
        self._deferred = (False, False)
        # the end of training, or the validation that reached the target (EvalSchedule runs first)
        final = trainer.should_stop or trainer.global_step >= trainer.max_steps
        if stop or due or final:
            self.save(trainer, wait=stop or final)
        if stop:
            raise Preempted(f"stopped at the end of epoch {trainer.current_epoch + 1} ({self.stop.reason}); "
                            f"checkpoint {self.path}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Whatever stops the run, a write in flight completes before the process goes.
        with contextlib.suppress(OSError):
            self.writer.wait()

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "layout_changes": self.layout_changes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layout_changes = list(state["layout_changes"])
        change = layout_change(state["layout"], self.layout)
        if change:
            self.layout_changes.append({"at_step": None, **change})  # the step is set on_train_start

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_written = time.monotonic()  # the period counts from this job segment's start
        if self.layout_changes and self.layout_changes[-1]["at_step"] is None:
            self.layout_changes[-1]["at_step"] = trainer.global_step
            if trainer.is_global_zero:
                said = ", ".join(f"{k} {v}" for k, v in self.layout_changes[-1].items() if k != "at_step")
                print(f"resumed on another layout at step {trainer.global_step}: {said}", flush=True)

    def _watch_scaler(self, trainer) -> None:
        """fp16: a falling loss scale means the scaler skipped steps on inf/NaN gradients; say so."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not self.scaler_watch or scaler is None or not trainer.is_global_zero:
            return
        scale = scaler.get_scale()
        if self._last_scale is not None and scale < self._last_scale:
            skipped = round(math.log2(self._last_scale / scale))
            print(f"fp16 loss scale fell from {self._last_scale:g} to {scale:g} by step {trainer.global_step}: "
                  f"at least {skipped} optimizer step(s) skipped on inf/NaN gradients", flush=True)
        self._last_scale = scale
