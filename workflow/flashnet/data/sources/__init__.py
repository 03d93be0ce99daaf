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

import hashlib
import os
from pathlib import Path

from .folders import KAGGLE_ROOT, KAGGLE_SYNSETS, KAGGLE_VAL_SOLUTION, read_extracted, read_kaggle
from .index import IMAGENET_CLASSES, IMAGENET_COUNTS, SPLITS, WNID, DataError, SplitIndex, build_index
from .official import (DEVKIT_META, DEVKIT_VAL_TRUTH, OFFICIAL_DEVKIT, OFFICIAL_TRAIN, OFFICIAL_VAL, read_devkit,
                       read_official)

__all__ = [
    "DEVKIT_META", "DEVKIT_VAL_TRUTH", "IMAGENET_CLASSES", "IMAGENET_COUNTS", "KAGGLE_ROOT", "KAGGLE_SYNSETS",
    "KAGGLE_VAL_SOLUTION", "OFFICIAL_DEVKIT", "OFFICIAL_TRAIN", "OFFICIAL_VAL", "SPLITS", "WNID", "DataError",
    "SplitIndex", "detect_layout", "images_are_files", "index_split", "listing_fingerprint", "read_devkit",
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


def image_folder(data_dir: Path, layout: str, split: str) -> Path | None:
    """The folder holding a split's image files in a one-file-per-image layout (None for the
    official tars, which are themselves the files to watch)."""
    return {"official": None, "extracted": data_dir / split, "kaggle": data_dir / KAGGLE_ROOT / split}[layout]


def images_are_files(data_dir: str | Path) -> bool:
    """Whether the layout under ``data_dir`` holds one file per image (extracted, Kaggle), whose
    listing is worth tracking; the official tars are files to watch themselves."""
    data_dir = Path(data_dir)
    return image_folder(data_dir, detect_layout(data_dir), SPLITS[0]) is not None


def listing_fingerprint(data_dir: str | Path, split: str) -> str:
    """A short text that changes when a file of the split is added, removed or renamed: the layout,
    the file count and a hash of every file's path and of each folder's modification time, from
    directory listings alone (no file is opened or stat'ed). The index rule takes it as a param, so
    Snakemake plans the index and the shards again when the input tree changes; its input files
    (the top folders) change their times only when an entry directly in them does.

    A folder's time changes whenever an entry in it is created, removed or renamed (so also when a
    tool replaces a file by writing a new one and renaming it); only a file rewritten in place under
    its old name goes unseen. Per-file sizes and times were left out for cost: a stat per file is
    ~7× a listing here, and on a parallel file system (Lustre, GPFS) a stat of a file's size asks
    the storage servers. Measured on a generated tree of 200,000 files in 200 folders (2-core VM,
    local disk, 2026-12-05): see the README's "Adding or removing images".
    The official layout's tars are the rule's input files themselves: "official".
    """
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    root = image_folder(data_dir, layout, split)
    if root is None:
        return layout
    digest, files = hashlib.blake2b(digest_size=16), 0
    prefix = len(os.fspath(data_dir)) + 1  # paths relative to data_dir: the same data elsewhere, the same text
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
            changed = os.stat(folder).st_mtime_ns
        except OSError as error:
            raise DataError(f"{folder}: cannot be read ({error.strerror})") from None
        names = sorted(entry.name for entry in entries)
        folders += sorted((Path(entry.path) for entry in entries if entry.is_dir()), reverse=True)
        files += sum(1 for entry in entries if not entry.is_dir())
        digest.update(f"{os.fspath(folder)[prefix:]}\0{changed}\0".encode(errors="surrogateescape"))
        digest.update("\0".join(names).encode(errors="surrogateescape") + b"\n")
    return f"{layout}: {files} files, {digest.hexdigest()}"
