"""Experiment trackers through Lightning's own loggers: TensorBoard, MLflow, Weights & Biases.

A run's ``loggers`` key names them; ``csv`` is flashnet's own ``metrics.csv`` and ``steps.csv``,
which :class:`~flashnet.train.callbacks.RunRecords` always writes (the report reads them). The
trackers get the same rows, forwarded by :class:`ForwardRecords` as RunRecords makes them, and the
resolved run config as hyperparameters. Lightning's loggers write on global rank 0 only.

Where each one writes (``<run>`` is the run folder, results/runs/<name>):

- tensorboard: event files in ``<run>/tensorboard/`` (``tensorboard --logdir results/runs``);
- mlflow: a run named after the flashnet run in experiment ``flashnet``, in the file store
  ``results/mlruns`` unless the run's ``mlflow_tracking_uri`` names another (MLflow 3 reads a file
  store only with ``MLFLOW_ALLOW_FILE_STORE=true``, which is set here for it);
- wandb: project ``flashnet``, in ``<run>/wandb/``, offline unless the run's ``wandb_mode`` says
  ``online`` (then ``wandb sync`` is not needed, and W&B's own login and settings apply).

The tracker runs' ids are kept in ``<run>/trackers.json``, so a requeued or resumed job goes on
logging to the same MLflow and W&B runs. Rows logged after the last checkpoint are logged again
by the resumed job (trackers keep both; metrics.csv keeps the latest).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ..config import ConfigError, RunConfig
from ..files import write_json

EXTRA = "trackers"
# logger name → the module it needs (installed by `pip install 'flashnet[trackers]'`)
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
PROJECT = "flashnet"
STATE_FILE = "trackers.json"
# Run keys that choose where metrics go, not what is trained: a resume checkpoint survives their change.
TRACKER_KEYS = ("loggers", "mlflow_tracking_uri", "wandb_mode")


def require_packages(run: RunConfig, name: str) -> None:
    """Fail with the pip extra to install when a configured tracker's package is missing."""
    for logger in run.loggers:
        module = MODULES.get(logger)
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"runs.{name}.loggers: {logger} needs the {module} package, which is not installed; "
                              f"install it with: pip install 'flashnet[{EXTRA}]'") from None


# Seconds a tracker has to answer before submission. A reachable server answers in milliseconds;
# inside the job an unanswered MLflow URI held the allocation ~4.5 min (its HTTP retries) and W&B
# online without network ~2 min before failing (issue 22, case 6).
ANSWER_TIMEOUT_S = 5.0
WANDB_DEFAULT_URL = "https://api.wandb.ai"


def check_trackers(run: RunConfig, name: str, timeout_s: float | None = None) -> None:
    """Before submission, on the submitting host: every configured tracker's package is installed,
    a remote MLflow server answers, and W&B online has credentials and its server answers. Fails in
    seconds with a ConfigError naming the key and the URL, instead of minutes into the allocation."""
    require_packages(run, name)
    timeout_s = ANSWER_TIMEOUT_S if timeout_s is None else timeout_s
    if "mlflow" in run.loggers and is_http_url(run.mlflow_tracking_uri):
        require_answer(run.mlflow_tracking_uri, f"runs.{name}.mlflow_tracking_uri", timeout_s)
    if "wandb" in run.loggers and run.wandb_mode == "online":
        url = os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL
        require_wandb_credentials(url, f"runs.{name}.wandb_mode")
        require_answer(url, f"runs.{name}.wandb_mode: online, but the W&B server", timeout_s)


def is_http_url(uri: str | None) -> bool:
    return bool(uri) and uri.split("://", 1)[0].lower() in ("http", "https")


def require_answer(url: str, what: str, timeout_s: float) -> None:
    """An HTTP GET of ``url`` gets an answer (any status: 401 or 404 still shows a server there)
    within ``timeout_s``; else ConfigError naming ``url``."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"{what} {url} does not answer ({reason}; waited at most {timeout_s:g} s); "
                          "start it, correct the URL, or drop the tracker from loggers") from None


def require_wandb_credentials(url: str, key: str) -> None:
    """W&B online needs an API key: WANDB_API_KEY, or the netrc entry `wandb login` writes for the
    server's host (wandb reads ~/.netrc, or the file NETRC names)."""
    if os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        if netrc.netrc(str(path)).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(f"{key}: online, but no W&B credentials for {host}: neither WANDB_API_KEY is set nor "
                      f"{path} has an entry for it; run `wandb login`, or set wandb_mode: offline")


def default_mlflow_uri(out_dir: Path) -> str:
    """``results/mlruns`` for a run folder ``results/runs/<name>``: one file store for all runs."""
    return (Path(out_dir).resolve().parent.parent / "mlruns").as_uri()


def read_state(out_dir: Path) -> dict[str, str]:
    try:
        state = json.loads((Path(out_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(out_dir: Path, state: dict[str, str]) -> None:
    write_json(Path(out_dir) / STATE_FILE, state, sort_keys=True)


def build_loggers(run: RunConfig, name: str, out_dir: Path) -> list[pl.loggers.Logger]:
    """Lightning loggers for the run's trackers (an empty list for csv alone)."""
    require_packages(run, name)
    state = read_state(out_dir)
    loggers: list[pl.loggers.Logger] = []
    if "tensorboard" in run.loggers:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard", version="",
                                         default_hp_metric=False))
    if "mlflow" in run.loggers:
        from pytorch_lightning.loggers import MLFlowLogger

        uri = run.mlflow_tracking_uri or default_mlflow_uri(out_dir)
        if uri.startswith("file:") or "://" not in uri:  # a file URI or a plain path
            # MLflow 3 refuses its file store (in "maintenance mode") unless told; a database
            # store would need the full mlflow package, and a file store is what a run folder wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        loggers.append(MLFlowLogger(experiment_name=PROJECT, run_name=name, tracking_uri=uri,
                                    run_id=state.get("mlflow_run_id")))
    if "wandb" in run.loggers:
        from pytorch_lightning.loggers import WandbLogger

        # The id is chosen here, not by W&B, so that the resumed job can name the same run.
        loggers.append(WandbLogger(project=PROJECT, name=name, save_dir=str(out_dir),
                                   id=state.get("wandb_id") or secrets.token_hex(4),
                                   offline=run.wandb_mode == "offline", mode=run.wandb_mode))
    return loggers


def tracker_ids(loggers: list[pl.loggers.Logger]) -> dict[str, str]:
    from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

    ids = {}
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            ids["mlflow_run_id"] = logger.run_id
        elif isinstance(logger, WandbLogger):
            ids["wandb_id"] = logger.experiment.id
    return ids


class ForwardRecords(pl.Callback):
    """Sends each new row of ``records`` (a RunRecords, placed before this callback) to the trainer's
    loggers: steps.csv rows as ``steps/<column>``, metrics.csv rows as ``epochs/<column>``, at the
    row's global step."""

    def __init__(self, records, hyperparameters: dict[str, Any], out_dir: Path):
        self.records, self.hyperparameters, self.out_dir = records, hyperparameters, Path(out_dir)
        self._last_step = self._last_epoch = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.loggers or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.hyperparameters)
        write_state(self.out_dir, {**read_state(self.out_dir), **tracker_ids(trainer.loggers)})
        # RunRecords has just dropped the rows after the checkpoint: those are sent again.
        self._last_step = max((r["step"] for r in self.records.steps), default=0)
        self._last_epoch = max((r["epoch"] for r in self.records.epochs), default=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._last_step is None:
            return
        for row in [r for r in self.records.steps if r["step"] > self._last_step]:
            self._send(trainer, "steps", row)
            self._last_step = row["step"]

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._last_epoch is None or trainer.sanity_checking:
            return
        for row in [r for r in self.records.epochs if r["epoch"] > self._last_epoch]:
            self._send(trainer, "epochs", row)
            self._last_epoch = row["epoch"]
        for logger in trainer.loggers:
            logger.save()  # a job killed later keeps what was logged up to here

    def on_fit_end(self, trainer, pl_module) -> None:
        # W&B keeps the run open until the process exits; a finished fit closes it (and its file).
        from pytorch_lightning.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.finish()

    @staticmethod
    def _send(trainer, prefix: str, row: dict[str, Any]) -> None:
        metrics = {f"{prefix}/{key}": float(value) for key, value in row.items() if key != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row["step"])
