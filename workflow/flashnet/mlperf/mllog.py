"""MLCommons' mllog line format, written by hand (mlcommons/logging, ``mlperf_logging/mllog``):

    :::MLLOG {"namespace": "", "time_ms": 1712345678901, "event_type": "POINT_IN_TIME",
              "key": "eval_accuracy", "value": 0.7601, "metadata": {"file": "...", "lineno": 123, ...}}

one JSON object per line behind the ``:::MLLOG `` prefix; ``event_type`` is INTERVAL_START,
INTERVAL_END or POINT_IN_TIME. MLCommons' parser reads ``time_ms``, ``key``, ``value`` and
``metadata``; the compliance checker then checks the keys against its rule files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

PREFIX = ":::MLLOG "
POINT_IN_TIME, INTERVAL_START, INTERVAL_END = "POINT_IN_TIME", "INTERVAL_START", "INTERVAL_END"


def line(key: str, value: Any = None, metadata: dict[str, Any] | None = None, event_type: str = POINT_IN_TIME,
         time_ms: int | None = None, caller_depth: int = 1) -> str:
    """One log line; ``metadata`` gets the caller's file and line, as mllog adds them."""
    frame = sys._getframe(caller_depth)
    record = {
        "namespace": "",
        "time_ms": int(time.time() * 1000) if time_ms is None else time_ms,
        "event_type": event_type,
        "key": key,
        "value": value,
        "metadata": {"file": Path(frame.f_code.co_filename).name, "lineno": frame.f_lineno, **(metadata or {})},
    }
    return PREFIX + json.dumps(record)


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
