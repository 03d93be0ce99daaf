"""Published large-batch ImageNet/ResNet-50 records, shown beside our runs: published, not measured here.

Each entry carries its citation. The figures are the ones the papers (or the MLPerf results) state;
where a source gives no number (Sony's batch size changes during training; MLPerf's results table
gives no batch size) the field is None and the report leaves the cell empty rather than guess.
"""

from __future__ import annotations

import dataclasses

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


REFERENCES: tuple[Reference, ...] = (
    Reference(
        name="Goyal et al. 2017",
        authors="Goyal, Dollár, Girshick, Noordhuis, Wesolowski, Kyrola, Tulloch, Jia, He (Facebook)",
        devices=256,
        device_name="P100",
        batch_size=8_192,
        time_s=3600.0,
        top1=0.763,
        top1_is_target=False,
        citation="Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour. arXiv:1706.02677 (2017)",
        url="https://arxiv.org/abs/1706.02677",
    ),
    Reference(
        name="Sony 2018",
        authors="Mikami, Suganuma, U-chupala, Tanaka, Kageyama (Sony)",
        devices=2_176,
        device_name="V100",
        batch_size=None,  # batch-size control: the batch grows during training
        time_s=224.0,
        top1=0.7503,
        top1_is_target=False,
        citation="ImageNet/ResNet-50 Training in 224 Seconds (v2: Massively Distributed SGD: "
                 "ImageNet/ResNet-50 Training in a Flash). arXiv:1811.05233 (2018)",
        url="https://arxiv.org/abs/1811.05233",
    ),
    Reference(
        name="Fujitsu 2019",
        authors="Yamazaki, Kasagi, Tabuchi, Honda, Miwa, Fukumoto, Tabaru, Ike, Nakashima (Fujitsu)",
        devices=2_048,
        device_name="V100",
        batch_size=81_920,
        time_s=74.7,
        top1=0.7508,
        top1_is_target=False,
        citation="Yet Another Accelerated SGD: ResNet-50 Training on ImageNet in 74.7 seconds. "
                 "arXiv:1903.12650 (2019)",
        url="https://arxiv.org/abs/1903.12650",
    ),
    Reference(
        name="MLPerf Training v3.0",
        authors="NVIDIA (MLCommons submission)",
        devices=3_584,
        device_name="H100",
        batch_size=None,  # not in the results table
        time_s=10.96,
        top1=0.759,
        top1_is_target=True,
        citation="MLCommons, MLPerf Training v3.0 results, ResNet-50 closed division (June 2023)",
        url="https://mlcommons.org/benchmarks/training/",
    ),
)


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
