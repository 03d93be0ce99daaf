"""The layouts that hold one file per image: extracted ``train/<wnid>/`` and ``val/<wnid>/`` folders,
and Kaggle's ``ILSVRC/Data/CLS-LOC`` with its val solution CSV and synset mapping."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path

from .index import WNID, DataError, Sample, full_imagenet_count

KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"


def _class_dirs(root: Path, where: str) -> list[str]:
    try:
        entries = sorted(os.listdir(root))
    except OSError as error:
        raise DataError(f"{root}: cannot be read ({error.strerror})") from None
    for name in entries:
        if not (root / name).is_dir():
            raise DataError(f"{where}/{name}: expected only <wnid>/ class folders here")
        if not WNID.fullmatch(name):
            raise DataError(f"{where}/{name}: folder name is not a WNID (n########)")
    return entries


def _files_in(folder: Path, where: str, data_dir: Path, wnid: str | None) -> list[Sample]:
    samples = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        raise DataError(f"{folder}: cannot be read ({error.strerror})") from None
    for entry in entries:
        if not entry.is_file():
            raise DataError(f"{where}/{entry.name}: expected an image file")
        relative = str(Path(entry.path).relative_to(data_dir))
        samples.append(Sample(Path(entry.name).stem, wnid or "", relative, 0, entry.stat().st_size, relative))
    return samples


def read_extracted(data_dir: Path, split: str):
    wnids = _class_dirs(data_dir / "train", "train")
    samples = []
    for wnid in _class_dirs(data_dir / split, split):
        if wnid not in wnids:
            raise DataError(f"{split}/{wnid}: unknown WNID (no train/{wnid} folder)")
        samples += _files_in(data_dir / split / wnid, f"{split}/{wnid}", data_dir, wnid)
    return wnids, samples, full_imagenet_count(wnids, split)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable ({error})") from None


def _kaggle_synsets(data_dir: Path) -> list[str]:
    path = data_dir / KAGGLE_SYNSETS
    wnids = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        wnid = line.split()[0]
        if not WNID.fullmatch(wnid):
            raise DataError(f"{path}:{number}: {wnid!r} is not a WNID")
        wnids.append(wnid)
    return sorted(wnids)


def _kaggle_val_labels(data_dir: Path, wnids: set[str]) -> dict[str, str]:
    path = data_dir / KAGGLE_VAL_SOLUTION
    labels = {}
    with io.StringIO(_read_text(path), newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["ImageId", "PredictionString"]:
            raise DataError(f"{path}: expected the header ImageId,PredictionString, got {header}")
        for number, row in enumerate(rows, 2):
            if len(row) != 2 or not row[1].split():
                raise DataError(f"{path}:{number}: expected ImageId,PredictionString")
            wnid = row[1].split()[0]
            if row[0] in labels:
                raise DataError(f"{path}:{number}: {row[0]} is listed a second time")
            if wnid not in wnids:
                raise DataError(f"{path}:{number}: {row[0]} is labelled with the unknown WNID {wnid}")
            labels[row[0]] = wnid
    return labels


def read_kaggle(data_dir: Path, split: str):
    wnids = _kaggle_synsets(data_dir)
    root = data_dir / KAGGLE_ROOT / split
    where = f"{KAGGLE_ROOT}/{split}"
    if split == "train":
        samples = []
        for wnid in _class_dirs(root, where):
            if wnid not in wnids:
                raise DataError(f"{where}/{wnid}: unknown WNID (not in {KAGGLE_SYNSETS})")
            samples += _files_in(root / wnid, f"{where}/{wnid}", data_dir, wnid)
        return wnids, samples, full_imagenet_count(wnids, split)
    labels = _kaggle_val_labels(data_dir, set(wnids))
    samples = []
    for sample in _files_in(root, where, data_dir, None):
        if sample.key not in labels:
            raise DataError(f"{sample.source}: no label in {KAGGLE_VAL_SOLUTION}")
        samples.append(dataclasses.replace(sample, wnid=labels[sample.key]))
    if len(samples) != len(labels):
        raise DataError(
            f"{data_dir / KAGGLE_VAL_SOLUTION}: lists {len(labels)} images but {where} holds {len(samples)}"
        )
    return wnids, samples, len(labels)
