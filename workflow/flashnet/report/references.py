"""Published large-batch ImageNet/ResNet-50 records, shown beside our runs: published, not measured here.

The records are data (``references.yaml`` beside this file), each with its citation. The figures are
the ones the papers (or the MLPerf results) state; where a source gives no number (Sony's batch size
changes during training; MLPerf's results table gives no batch size) the field is None and the
report leaves the cell empty rather than guess.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

PUBLISHED_LABEL = "published, not measured here"


@dataclasses.dataclass(frozen=True)
class Reference:
    """One published time-to-accuracy result for ResNet-50 on ImageNet-1k."""

    name: str
    authors: str
    devices: int
    device_name: str
    batch_size: int | None
    time_s: float
    top1: float  # 0..1
    top1_is_target: bool  # True: the benchmark's quality threshold, not the accuracy the run reached
    citation: str
    url: str

    @property
    def accuracy_meaning(self) -> str:
        return "quality target" if self.top1_is_target else "reached"


def load_references(path: Path = Path(__file__).with_name("references.yaml")) -> tuple[Reference, ...]:
    """The published records, as data: one entry a record, its fields those of :class:`Reference`."""
    entries = yaml.safe_load(path.read_text())
    try:
        return tuple(Reference(**entry) for entry in entries)
    except TypeError as error:  # a key Reference lacks, or one missing
        raise ValueError(f"{path}: {error}") from None


REFERENCES = load_references()


def reference(name: str) -> Reference:
    """The published reference called ``name`` (e.g. ``"Fujitsu 2019"``)."""
    for entry in REFERENCES:
        if entry.name == name:
            return entry
    raise KeyError(f"no published reference called {name!r}; known: {', '.join(r.name for r in REFERENCES)}")


# The projection compares with the fastest ResNet-50 result on V100s at 2,048 devices.
FUJITSU = reference("Fujitsu 2019")

REFERENCE_CSV_COLUMNS = ("name", "authors", "devices", "device_name", "batch_size", "time_s", "top1",
                         "top1_meaning", "citation", "url", "source")


def reference_csv_rows() -> list[dict[str, object]]:
    """One row per reference for references.csv (raw numbers; empty where the source gives none)."""
    return [
        {
            "name": r.name, "authors": r.authors, "devices": r.devices, "device_name": r.device_name,
            "batch_size": "" if r.batch_size is None else r.batch_size, "time_s": r.time_s, "top1": r.top1,
            "top1_meaning": r.accuracy_meaning, "citation": r.citation, "url": r.url, "source": PUBLISHED_LABEL,
        }
        for r in REFERENCES
    ]
