"""``model.pt``, the trained network a run leaves behind: one writer (the end of training) and one
reader (evaluation, and anyone else).

The file holds tensors and plain values only, so it loads with ``weights_only=True`` (nothing in it
is unpickled as code): the format tag, the run's name and full settings (which name the
architecture, image size and evaluation resize), the classes it was trained on (WNIDs, in label
order) and the network's state dict.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..data.sources import DataError
from ..files import atomic_path
from .module import build_model

MODEL_FORMAT = "flashnet-model/1"


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A checked model.pt: the run that trained it, its classes, and the network with its weights."""

    name: str
    run: RunConfig
    wnids: list[str]
    network: torch.nn.Module

    @property
    def num_classes(self) -> int:
        return len(self.wnids)


def save_model(path: str | Path, name: str, run: RunConfig, wnids: list[str], network: torch.nn.Module) -> None:
    """Write model.pt atomically: a reader sees the previous file or this one, never half of one."""
    record = {
        "format": MODEL_FORMAT,
        "name": name,
        "num_classes": len(wnids),
        "wnids": list(wnids),
        "run": run.to_dict(),
        "state_dict": {key: value.detach().cpu() for key, value in network.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def load_model(path: str | Path) -> ModelFile:
    """Read and check model.pt: a flashnet model file whose weights fit the network its run names.

    The network is built on the meta device (no memory, no initialisation) and the file's tensors
    are assigned to it, so checking the weights costs nothing beyond reading them; the result is a
    usable network on the CPU."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: missing: training did not finish")
    try:
        record: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise DataError(f"{path}: not a loadable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise DataError(f"{path}: not a flashnet model file")
    run = RunConfig.from_dict(record["run"], record["name"])
    with torch.device("meta"):
        network = build_model(run, record["num_classes"])
    try:
        network.load_state_dict(record["state_dict"], assign=True)
    except RuntimeError as error:
        raise DataError(f"{path}: weights do not fit a {run.model} with {record['num_classes']} classes: "
                        f"{str(error).splitlines()[0]}") from None
    return ModelFile(record["name"], run, list(record["wnids"]), network)
