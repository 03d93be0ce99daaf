"""The one index format every layout is read into, and the error bad input raises."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# Counts of the full ILSVRC2012 classification set.
IMAGENET_COUNTS = {"train": 1_281_167, "val": 50_000}
IMAGENET_CLASSES = 1000

SPLITS = ("train", "val")
WNID = re.compile(r"n\d{8}")


class DataError(ValueError):
    """Bad input data, with the file and the problem in the message."""


@dataclasses.dataclass
class SplitIndex:
    """Every input file of one split, in a canonical order (sorted by key).

    ``files`` are paths relative to ``data_dir``; sample ``i`` is bytes
    ``offsets[i] : offsets[i] + sizes[i]`` of ``files[file_ids[i]]``, named ``sources[i]`` in messages.
    ``expected`` is the count the dataset's own metadata promises (None where it promises none).
    """

    split: str
    layout: str
    wnids: list[str]
    files: list[str]
    keys: list[str]
    labels: list[int]
    file_ids: list[int]
    offsets: list[int]
    sizes: list[int]
    sources: list[str]
    expected: int | None

    def __len__(self) -> int:
        return len(self.keys)

    def permuted(self, order: np.ndarray) -> "SplitIndex":
        pick = [int(i) for i in order]
        columns = {name: [getattr(self, name)[i] for i in pick] for name in _COLUMNS}
        return dataclasses.replace(self, **columns)


_COLUMNS = ("keys", "labels", "file_ids", "offsets", "sizes", "sources")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One input file as a layout reader finds it, before labels are numbered."""

    key: str
    wnid: str
    file: str
    offset: int
    size: int
    source: str


def build_index(split, layout, wnids, samples, expected) -> SplitIndex:
    """The split's index in key order, refusing keys WebDataset cannot hold and counts the metadata
    does not promise."""
    samples = sorted(samples, key=lambda s: s.key)
    for s in samples:
        if "." in s.key:
            # WebDataset takes everything after a sample's first dot for the field name.
            raise DataError(f"{s.source}: its key {s.key!r} (the name without its extension) holds a '.', "
                            f"which WebDataset would split the key at; rename the file")
    for a, b in zip(samples, samples[1:]):
        if a.key == b.key:
            raise DataError(f"{b.source}: duplicate sample key {b.key!r} (also {a.source})")
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    files = sorted({s.file for s in samples})
    file_id = {f: i for i, f in enumerate(files)}
    if expected is not None and expected != len(samples):
        raise DataError(
            f"{split}: the dataset's metadata promises {expected} images but {len(samples)} were found"
        )
    return SplitIndex(
        split=split,
        layout=layout,
        wnids=list(wnids),
        files=files,
        keys=[s.key for s in samples],
        labels=[label_of[s.wnid] for s in samples],
        file_ids=[file_id[s.file] for s in samples],
        offsets=[s.offset for s in samples],
        sizes=[s.size for s in samples],
        sources=[s.source for s in samples],
        expected=expected,
    )


def full_imagenet_count(wnids: list[str], split: str) -> int | None:
    return IMAGENET_COUNTS[split] if len(wnids) == IMAGENET_CLASSES else None

