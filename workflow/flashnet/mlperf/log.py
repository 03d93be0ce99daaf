"""A run's MLPerf log, ``results/runs/<run>/mllog.txt``, in MLCommons' ``:::MLLOG`` format.

What it says, in order (keys of the training 4.0.0 compliance checker's rule files):

- when the job starts, before the data is verified and the model built: ``cache_clear``,
  ``init_start``, the ``submission_*`` keys and ``seed``; then the hyperparameters
  (:func:`.mllog.hyperparameters`), ``train_samples`` and ``eval_samples``;
- just before the first training step (Lightning's ``on_train_start``): ``init_stop`` and
  ``run_start``, so MLPerf's time to train (``run_start`` → ``run_stop``) leaves initialisation out;
  the warm-up of :mod:`flashnet.train.warmup` (compilation, cuDNN autotuning on synthetic batches)
  runs before it, at ``on_fit_start``, and so belongs to initialisation, as the rules allow;
- ``block_start``/``block_stop`` around the epochs between two validations, then ``eval_start``,
  ``eval_accuracy`` (a fraction) and ``eval_stop`` at each validation the eval cadence asks for;
- ``run_stop`` with status ``success`` at the first validation that reaches the target (with
  ``stop_at_target`` training ends there), or ``aborted`` when the run ends without reaching it or
  fails. Nothing is logged after ``run_stop``.

``epoch_num`` and ``first_epoch_num`` count the run's epochs, whole numbers from 1 (``epoch_num`` of a
validation is the number of epochs trained before it), as NVIDIA's logs do and as the eval cadence
("every 4 epochs") is stated, an epoch counted as the run's ``epoch_steps`` says (a preset's as its
source's code counted it, train/schedule.py): under ``floor`` up to one batch short of a pass over
all N images, so a logged ``epoch_num`` is never fewer epochs than the images seen and MLCommons'
RCP checker, which reads it as epochs to converge, errs against the run; under ``ceil_per_rank`` at
least a pass, as NVIDIA's logs the RCPs came from. The exact figure, samples seen / N, goes into
summary.json and the report's RCP comparison. A closed run's last epoch is one that validates
(mlperf/rules.py), so no evaluation is logged off the cadence.

The lines are made by ``mlperf_logging.mllog`` (:mod:`.mllog`). ``cache_clear`` is logged as false:
NVIDIA's ``run.sub`` drops the page cache as root and logs true; flashnet's job does not drop it. A job resumed from a checkpoint after a requeue appends ``flashnet_resumed`` (a key the
checker ignores) instead of a second ``init_start``/``run_start``; its time to train then spans job
segments and the time queued between them, and the summary marks it not valid. Only rank 0 writes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from . import mllog
from .rules import closed_division_breaks
from ..train.callbacks import Preempted

LOG_FILE = "mllog.txt"
BENCHMARK = "resnet"


def platform_name(world_size: int, device_name: str) -> str:
    """``2xAMD_EPYC_7B13``, ``8xNVIDIA_H100_80GB_HBM3``: submission_platform's default."""
    return f"{world_size}x" + re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_")


def division_of(run, setting: str) -> tuple[str, list[str]]:
    """(division, closed rules the run breaks): ``auto`` is closed when it breaks none."""
    breaks = closed_division_breaks(run)
    if setting == "auto":
        return ("open" if breaks else "closed"), breaks
    return setting, breaks


class MLPerfLog(pl.Callback):
    """Writes mllog.txt (rank 0) and keeps, in the resume checkpoint, what the summary needs."""

    def __init__(self, out_dir: Path, run, settings: dict[str, Any], platform: str, resumed: bool):
        self.path = Path(out_dir) / LOG_FILE
        self.run = run
        self.division_setting = settings["division"]
        self.division, self.closed_breaks = division_of(run, self.division_setting)
        self.resumed = resumed  # this job segment starts from a checkpoint
        self._pending: list[str] | None = []  # lines logged before the rank is known
        self._writes: bool | None = None
        self.train_samples = 0
        # checkpointed: what earlier job segments logged
        self.run_start_ms: int | None = None
        self.run_stop_ms: int | None = None
        self.status: str | None = None
        self.stop_epoch: int | None = None
        self.epochs_to_target: float | None = None
        self.resumes = 0
        self.block_open = False
        if resumed:
            return
        self._log("cache_clear", False, {"note": "flashnet does not drop the page cache"})
        self._log("init_start", None, event_type=mllog.INTERVAL_START)
        for key, value in (("submission_benchmark", BENCHMARK), ("submission_org", settings["org"]),
                           ("submission_division", self.division),
                           ("submission_platform", settings["platform"] or platform),
                           ("submission_status", settings["status"]), ("seed", run.seed)):
            self._log(key, value)

    def describe_data(self, train_samples: int, eval_samples: int, steps_per_epoch: int) -> None:
        """The hyperparameters and data set sizes, once the manifests are verified."""
        self.train_samples = train_samples
        if self.resumed:
            return
        for key, value in mllog.hyperparameters(self.run, steps_per_epoch):
            self._log(key, value)
        self._log("train_samples", train_samples)
        self._log("eval_samples", eval_samples)

    # ------------------------------------------------------------------ writing

    def _log(self, key: str, value: Any = None, metadata: dict[str, Any] | None = None,
             event_type: str = mllog.POINT_IN_TIME) -> int:
        now_ms = int(time.time() * 1000)
        text = mllog.line(key, value, metadata, event_type, time_ms=now_ms, caller_depth=2)
        if self._pending is not None:
            self._pending.append(text)
        elif self._writes:
            with self.path.open("a") as f:
                f.write(text + "\n")
        return now_ms

    def setup(self, trainer, pl_module, stage: str) -> None:
        """The rank is known: rank 0 starts the file (a fresh run) or appends to it (a resumed one)."""
        if self._pending is None:
            return
        self._writes = trainer.is_global_zero
        if self._writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a" if self.resumed else "w") as f:
                f.writelines(text + "\n" for text in self._pending)
        self._pending = None

    # ------------------------------------------------------------------ the run

    def on_train_start(self, trainer, pl_module) -> None:
        if self.status is not None:
            return  # resumed after run_stop: the time to train was measured in one segment
        if self.resumed:
            self.resumes += 1
            self._log("flashnet_resumed", {"global_step": trainer.global_step, "resumes": self.resumes},
                      {"note": "resumed from a checkpoint after a requeue: not a valid MLPerf time to train"})
        elif self.run_start_ms is None:
            self._log("init_stop", None, event_type=mllog.INTERVAL_END)
            self.run_start_ms = self._log("run_start", None, event_type=mllog.INTERVAL_START)

    def _epochs_until_validation(self, epoch: int) -> int:
        last = epoch
        while not self.run.is_eval_epoch(last):  # the last epoch is always validated
            last += 1
        return last - epoch + 1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.status is not None or self.block_open:
            return
        epoch = trainer.current_epoch + 1
        self._log("block_start", None, {"first_epoch_num": epoch, "epoch_count": self._epochs_until_validation(epoch)},
                  mllog.INTERVAL_START)
        self.block_open = True

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.status is not None:
            return
        epoch = trainer.current_epoch + 1
        if self.block_open:
            first = epoch - self._epochs_before(epoch) + 1
            self._log("block_stop", None, {"first_epoch_num": first}, mllog.INTERVAL_END)
            self.block_open = False
        self._log("eval_start", None, {"epoch_num": epoch}, mllog.INTERVAL_START)

    def _epochs_before(self, epoch: int) -> int:
        """Epochs in the block that ends with (validated) ``epoch``."""
        first = epoch
        while first > 1 and not self.run.is_eval_epoch(first - 1):
            first -= 1
        return epoch - first + 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.status is not None:
            return
        epoch = trainer.current_epoch + 1
        top1 = float(trainer.callback_metrics["val_top1"])
        self._log("eval_accuracy", round(top1, 6), {"epoch_num": epoch})
        self._log("eval_stop", None, {"epoch_num": epoch}, mllog.INTERVAL_END)
        if top1 >= self.run.target_top1:
            self.stop_epoch = epoch
            self.epochs_to_target = trainer.global_step * self.run.batch_size / self.train_samples
            self._stop("success", {"epoch_num": epoch})

    def _stop(self, status: str, metadata: dict[str, Any]) -> None:
        self.status = status
        self.run_stop_ms = self._log("run_stop", None, {"status": status, **metadata}, mllog.INTERVAL_END)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.status is None:
            self._stop("aborted", {"reason": "target not reached"})

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.status is None and not isinstance(exception, Preempted):  # a requeued job goes on
            self._stop("aborted", {"reason": f"{type(exception).__name__}: {exception}"})

    # ------------------------------------------------------------------ figures

    def summary(self) -> dict[str, Any]:
        """The MLPerf figures of summary.json."""
        reached = self.status == "success"
        why_not = None
        if not reached:
            why_not = "the run did not reach its target"
        elif self.resumes:
            why_not = f"resumed {self.resumes} time(s) after a requeue: run_start to run_stop spans job segments"
        return {
            "log": LOG_FILE,
            "division": self.division,
            "division_setting": self.division_setting,
            "closed_rules_broken": self.closed_breaks,
            "status": self.status,
            "time_to_train_s": round((self.run_stop_ms - self.run_start_ms) / 1000, 3) if reached else None,
            "valid": why_not is None,
            "not_valid_because": why_not,
            "resumes": self.resumes,
            "epoch_num_at_target": self.stop_epoch,
            "epochs_to_target": None if self.epochs_to_target is None else round(self.epochs_to_target, 4),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"run_start_ms": self.run_start_ms, "run_stop_ms": self.run_stop_ms, "status": self.status,
                "stop_epoch": self.stop_epoch, "epochs_to_target": self.epochs_to_target,
                "resumes": self.resumes, "block_open": self.block_open}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
