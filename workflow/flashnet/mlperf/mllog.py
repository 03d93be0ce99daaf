"""MLCommons' mllog lines, made by MLCommons' own logger (``mlperf_logging.mllog``, the
``mlperf-logging`` package submitters log with):

    :::MLLOG {"namespace": "", "time_ms": 1712345678901, "event_type": "POINT_IN_TIME",
              "key": "eval_accuracy", "value": 0.7601, "metadata": {"file": "...", "lineno": 123, ...}}

The library encodes each line and adds its caller's file and line; flashnet only decides where the
line goes (mlperf/log.py: rank 0's mllog.txt, buffered until the rank is known), so a new ruleset's
format is a version bump of the package, not a port.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from mlperf_logging.mllog import constants
from mlperf_logging.mllog.mllog import MLLogger

POINT_IN_TIME, INTERVAL_START, INTERVAL_END = constants.POINT_IN_TIME, constants.INTERVAL_START, constants.INTERVAL_END


class _LastLine(logging.Handler):
    """Keeps the line MLLogger just logged, for the caller to route."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.text: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(":::MLLOG "):  # not the library's own warnings ("Failed to encode", ...)
            self.text = message


def _make_logger() -> tuple[MLLogger, _LastLine]:
    handler = _LastLine()
    logger = logging.getLogger("flashnet.mlperf.mllog")
    logger.propagate = False  # the lines go to mllog.txt only, never to the job's log twice
    logger.setLevel(logging.INFO)
    logger.handlers[:] = [handler]
    return MLLogger(logger=logger, default_namespace=""), handler


_MLLOGGER, _LAST = _make_logger()
_EMITTERS = {POINT_IN_TIME: _MLLOGGER.event, INTERVAL_START: _MLLOGGER.start, INTERVAL_END: _MLLOGGER.end}


def line(key: str, value: Any = None, metadata: dict[str, Any] | None = None, event_type: str = POINT_IN_TIME,
         time_ms: int | None = None, caller_depth: int = 1) -> str:
    """One log line from ``mlperf_logging.mllog``; its metadata names the caller ``caller_depth``
    frames up (1: the caller of this function) as the file and line that logged it."""
    # MLLogger finds the call site 2 + stack_offset frames above its get_caller: its _log_helper, its
    # event/start/end, this function, then our callers.
    _LAST.text = None
    _EMITTERS[event_type](key=key, value=value, metadata=metadata, time_ms=time_ms, stack_offset=caller_depth + 1)
    if _LAST.text is None:
        raise ValueError(f"mlperf_logging could not encode {key}={value!r}")
    return _LAST.text


def hyperparameters(run, steps_per_epoch: int) -> list[tuple[str, Any]]:
    """The init-phase hyperparameter keys of a run's MLPerf log, with the names the closed ResNet
    rules check (``closed_resnet.yaml``, ``closed_resnet_lars.yaml`` / ``closed_resnet_sgd.yaml``)."""
    from ..train.schedule import schedule_for_run

    schedule = schedule_for_run(run, steps_per_epoch)
    events: list[tuple[str, Any]] = [
        ("global_batch_size", run.batch_size),
        ("gradient_accumulation_steps", 1),
        ("opt_name", run.optimizer),
    ]
    # MLCommons names the same hyperparameters lars_opt_* or sgd_opt_*; LARS adds its epsilon, and
    # the warmup key of SGD carries no optimizer prefix.
    prefix = f"{run.optimizer}_opt_"
    events += [
        (f"{prefix}base_learning_rate", run.lr),
        (f"{prefix}end_learning_rate", run.end_lr),
        (f"{prefix}learning_rate_decay_poly_power", run.lr_decay_power),
        (f"{prefix}learning_rate_decay_steps", schedule.decay_steps),
        (f"{prefix}momentum", run.momentum),
        (f"{prefix}weight_decay", run.weight_decay),
    ]
    if run.optimizer == "lars":
        events += [("lars_epsilon", run.lars_epsilon), ("lars_opt_learning_rate_warmup_epochs", run.warmup_epochs)]
    else:
        events.append(("opt_learning_rate_warmup_epochs", run.warmup_epochs))
    events.append(("model_bn_span", run.bn_span if run.bn_span is not None else run.per_device_batch))
    return [(key, _plain(value)) for key, value in events]


def _plain(value: Any) -> Any:
    """Whole floats as ints where the source writes them so (warmup epochs 2, not 2.0)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) >= 1:
        return int(value)
    return value
