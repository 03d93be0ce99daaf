"""The three ways ImageNet is shipped, read into one index format.

Only this package knows the input layouts (:mod:`.official` the tars, :mod:`.folders` the
one-file-per-image layouts). Everything after it sees a :class:`SplitIndex`: one
entry per input file, each with its key (the file's stem), label and a byte range in a file under
``data_dir``. Samples inside the official tars (a tar of per-class tars for train) are located by
their byte offset once, then read with a seek: nothing is extracted to disk.

Labels follow torchvision's convention: the index of the WNID in the sorted list of WNIDs. The
devkit's ILSVRC2012_IDs are in a different order, which is the classic way to get val labels wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from .folders import KAGGLE_ROOT, KAGGLE_SYNSETS, KAGGLE_VAL_SOLUTION, read_extracted, read_kaggle
from .index import IMAGENET_CLASSES, IMAGENET_COUNTS, SPLITS, WNID, DataError, SplitIndex, build_index
from .official import (DEVKIT_META, DEVKIT_VAL_TRUTH, OFFICIAL_DEVKIT, OFFICIAL_TRAIN, OFFICIAL_VAL, read_devkit,
                       read_official)

__all__ = [
    "DEVKIT_META", "DEVKIT_VAL_TRUTH", "IMAGENET_CLASSES", "IMAGENET_COUNTS", "KAGGLE_ROOT", "KAGGLE_SYNSETS",
    "KAGGLE_VAL_SOLUTION", "OFFICIAL_DEVKIT", "OFFICIAL_TRAIN", "OFFICIAL_VAL", "SPLITS", "WNID", "DataError",
    "SplitIndex", "detect_layout", "index_split", "read_devkit",
]

READERS = {"official": read_official, "extracted": read_extracted, "kaggle": read_kaggle}


def detect_layout(data_dir: Path) -> str:
    """Return ``official``, ``extracted`` or ``kaggle``, or raise naming what was expected."""
    if not data_dir.exists():
        raise DataError(f"data_dir {data_dir}: does not exist")
    if not data_dir.is_dir():
        raise DataError(f"data_dir {data_dir}: is not a directory")
    try:
        names = set(os.listdir(data_dir))
    except OSError as error:
        raise DataError(f"data_dir {data_dir}: cannot be read ({error.strerror})") from None
    official = [OFFICIAL_TRAIN, OFFICIAL_VAL, OFFICIAL_DEVKIT]
    if any(name in names for name in official):
        missing = [name for name in official if name not in names]
        if missing:
            raise DataError(f"data_dir {data_dir}: official layout is missing {', '.join(missing)}")
        return "official"
    if (data_dir / KAGGLE_ROOT).is_dir():
        for name in (KAGGLE_VAL_SOLUTION, KAGGLE_SYNSETS):
            if name not in names:
                raise DataError(f"data_dir {data_dir}: Kaggle layout is missing {name}")
        return "kaggle"
    if (data_dir / "train").is_dir() and (data_dir / "val").is_dir():
        return "extracted"
    shown = ", ".join(sorted(names)[:10]) or "nothing"
    raise DataError(
        f"data_dir {data_dir}: matches none of the ImageNet layouts (official: {', '.join(official)}; "
        f"extracted: train/<wnid>/ and val/<wnid>/; Kaggle: {KAGGLE_ROOT}/ with {KAGGLE_VAL_SOLUTION} "
        f"and {KAGGLE_SYNSETS}); it holds {shown}"
    )


def index_split(data_dir: str | Path, split: str) -> SplitIndex:
    """Index one split of the dataset under ``data_dir``, checking labels and counts."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    reader = READERS[layout]
    wnids, samples, expected = reader(data_dir, split)
    return build_index(split, layout, wnids, samples, expected)
