"""The three ways ImageNet is shipped, read into one index format.

Only this module knows the input layouts. Everything after it sees a :class:`SplitIndex`: one
entry per input file, each with its key (the file's stem), label and a byte range in a file under
``data_dir``. Samples inside the official tars (a tar of per-class tars for train) are located by
their byte offset once, then read with a seek: nothing is extracted to disk.

Labels follow torchvision's convention: the index of the WNID in the sorted list of WNIDs. The
devkit's ILSVRC2012_IDs are in a different order, which is the classic way to get val labels wrong.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import os
import re
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

OFFICIAL_TRAIN = "ILSVRC2012_img_train.tar"
OFFICIAL_VAL = "ILSVRC2012_img_val.tar"
OFFICIAL_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "ILSVRC2012_devkit_t12/data/meta.mat"
DEVKIT_VAL_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"

# Counts of the full ILSVRC2012 classification set.
IMAGENET_COUNTS = {"train": 1_281_167, "val": 50_000}
IMAGENET_CLASSES = 1000

SPLITS = ("train", "val")
_WNID = re.compile(r"n\d{8}")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+")


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
class _Sample:
    key: str
    wnid: str
    file: str
    offset: int
    size: int
    source: str


# --------------------------------------------------------------------------- layout detection


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
    reader = {"official": _official, "extracted": _extracted, "kaggle": _kaggle}[layout]
    wnids, samples, expected = reader(data_dir, split)
    return _build_index(split, layout, wnids, samples, expected)


def _build_index(split, layout, wnids, samples, expected) -> SplitIndex:
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


def _full_imagenet_count(wnids: list[str], split: str) -> int | None:
    return IMAGENET_COUNTS[split] if len(wnids) == IMAGENET_CLASSES else None


# --------------------------------------------------------------------------- official tars


class _Window(io.RawIOBase):
    """A read-only view of ``size`` bytes at ``start`` of an open file (an inner tar's bytes)."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _safe_member_name(tar_path: str, name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{tar_path}: member {name!r} has an absolute path or '..'; refusing to read it")
    return name


def _tar_members(f, tar_path: str, size: int):
    """Yield the regular-file members of the tar in ``f`` (offsets relative to ``f``'s start)."""
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            last = None
            for member in tar:
                name = _safe_member_name(tar_path, member.name)
                last = name
                if member.isdir():
                    continue
                if not member.isfile():
                    raise DataError(f"{tar_path}: member {name!r} is not a regular file")
                if member.offset_data + member.size > size:
                    raise DataError(
                        f"{tar_path}: truncated: member {name!r} needs {member.offset_data + member.size} "
                        f"bytes, the archive has {size}"
                    )
                yield member
            _check_end_of_archive(f, tar_path, tar.offset, last)
    except tarfile.TarError as error:
        raise DataError(f"{tar_path}: unreadable or truncated tar ({error})") from None


def _check_end_of_archive(f, tar_path: str, offset: int, last: str | None) -> None:
    """tarfile ends its listing quietly at a missing or unreadable header after the first one, so a
    tar cut at a member boundary, or damaged there, would pass for a shorter complete archive:
    demand the zero block that ends every tar where the listing ended."""
    f.seek(offset)
    block = f.read(512)
    if len(block) < 512:
        raise DataError(f"{tar_path}: truncated: it ends after member {last!r} without the end-of-archive block")
    if block != bytes(512):
        raise DataError(f"{tar_path}: unreadable tar header at byte {offset} (after member {last!r})")


def read_devkit(devkit_path: Path) -> tuple[dict[int, str], dict[str, int], list[int]]:
    """Parse the devkit: ILSVRC2012_ID → WNID and WNID → num_train_images for the 1000 leaf
    synsets (``num_children == 0``), and the val ground truth (one ILSVRC2012_ID per val image,
    in file-number order)."""
    from scipy.io import loadmat

    try:
        with tarfile.open(devkit_path, "r:gz") as tar:
            names = {m.name: m for m in tar.getmembers()}
            for needed in (DEVKIT_META, DEVKIT_VAL_TRUTH):
                if needed not in names:
                    raise DataError(f"{devkit_path}: missing {needed}")
            meta_bytes = tar.extractfile(names[DEVKIT_META]).read()
            truth_text = tar.extractfile(names[DEVKIT_VAL_TRUTH]).read().decode()
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{devkit_path}: unreadable devkit archive ({error})") from None
    try:
        synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        train_counts = {str(s["WNID"]): int(s["num_train_images"]) for s in leaves}
    except Exception as error:  # scipy raises many kinds on a damaged file; all mean the same here
        raise DataError(f"{devkit_path}: {DEVKIT_META} has no usable synsets table "
                        f"({type(error).__name__}: {error})") from None
    try:
        truth = [int(line) for line in truth_text.split()]
    except ValueError:
        raise DataError(f"{devkit_path}: {DEVKIT_VAL_TRUTH} holds a line that is not an ILSVRC2012_ID") from None
    return id_to_wnid, train_counts, truth


def _official(data_dir: Path, split: str):
    devkit = data_dir / OFFICIAL_DEVKIT
    id_to_wnid, train_counts, truth = read_devkit(devkit)
    wnids = sorted(id_to_wnid.values())
    if split == "train":
        samples = _official_train(data_dir, set(wnids), train_counts)
        return wnids, samples, sum(train_counts.values())
    samples = _official_val(data_dir, id_to_wnid, truth, devkit)
    return wnids, samples, len(truth)


def _official_train(data_dir: Path, wnids: set[str], train_counts: dict[str, int]) -> list[_Sample]:
    path = data_dir / OFFICIAL_TRAIN
    samples, seen = [], set()
    with _open_for_reading(path) as f:
        size = os.fstat(f.fileno()).st_size
        for outer in list(_tar_members(f, OFFICIAL_TRAIN, size)):
            wnid = PurePosixPath(outer.name).name.removesuffix(".tar")
            where = f"{OFFICIAL_TRAIN}/{outer.name}"
            if not outer.name.endswith(".tar") or wnid not in wnids:
                raise DataError(f"{where}: not a <wnid>.tar of a class in the devkit's synsets")
            seen.add(wnid)
            window = _Window(f, outer.offset_data, outer.size)
            found = 0
            for inner in _tar_members(window, where, outer.size):
                name = PurePosixPath(inner.name).name
                samples.append(
                    _Sample(
                        key=PurePosixPath(name).stem,
                        wnid=wnid,
                        file=OFFICIAL_TRAIN,
                        offset=outer.offset_data + inner.offset_data,
                        size=inner.size,
                        source=f"{where}/{inner.name}",
                    )
                )
                found += 1
            if found != train_counts[wnid]:
                raise DataError(
                    f"{where}: holds {found} images but the devkit's num_train_images for {wnid} is "
                    f"{train_counts[wnid]}"
                )
    missing = sorted(set(train_counts) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        raise DataError(
            f"{path}: has no <wnid>.tar for {len(missing)} of the devkit's classes ({shown}), which should hold "
            f"{sum(train_counts[w] for w in missing)} images"
        )
    return samples


def _official_val(data_dir: Path, id_to_wnid: dict[int, str], truth: list[int], devkit: Path) -> list[_Sample]:
    path = data_dir / OFFICIAL_VAL
    samples = []
    with _open_for_reading(path) as f:
        size = os.fstat(f.fileno()).st_size
        for member in _tar_members(f, OFFICIAL_VAL, size):
            name = PurePosixPath(member.name).name
            where = f"{OFFICIAL_VAL}/{member.name}"
            match = _VAL_NAME.fullmatch(name)
            if not match or not 1 <= int(match.group(1)) <= len(truth):
                raise DataError(
                    f"{where}: no label: the devkit's ground truth covers ILSVRC2012_val_00000001 to "
                    f"ILSVRC2012_val_{len(truth):08d}"
                )
            class_id = truth[int(match.group(1)) - 1]
            if class_id not in id_to_wnid:
                raise DataError(f"{devkit}: ground truth gives {where} the unknown ILSVRC2012_ID {class_id}")
            samples.append(
                _Sample(PurePosixPath(name).stem, id_to_wnid[class_id], OFFICIAL_VAL, member.offset_data, member.size, where)
            )
    if len(samples) != len(truth):
        raise DataError(f"{path}: holds {len(samples)} images but the devkit's ground truth lists {len(truth)}")
    return samples


def _open_for_reading(path: Path):
    try:
        return open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from None


# --------------------------------------------------------------------------- folders


def _class_dirs(root: Path, where: str) -> list[str]:
    try:
        entries = sorted(os.listdir(root))
    except OSError as error:
        raise DataError(f"{root}: cannot be read ({error.strerror})") from None
    for name in entries:
        if not (root / name).is_dir():
            raise DataError(f"{where}/{name}: expected only <wnid>/ class folders here")
        if not _WNID.fullmatch(name):
            raise DataError(f"{where}/{name}: folder name is not a WNID (n########)")
    return entries


def _files_in(folder: Path, where: str, data_dir: Path, wnid: str | None) -> list[_Sample]:
    samples = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        raise DataError(f"{folder}: cannot be read ({error.strerror})") from None
    for entry in entries:
        if not entry.is_file():
            raise DataError(f"{where}/{entry.name}: expected an image file")
        relative = str(Path(entry.path).relative_to(data_dir))
        samples.append(_Sample(Path(entry.name).stem, wnid or "", relative, 0, entry.stat().st_size, relative))
    return samples


def _extracted(data_dir: Path, split: str):
    wnids = _class_dirs(data_dir / "train", "train")
    samples = []
    for wnid in _class_dirs(data_dir / split, split):
        if wnid not in wnids:
            raise DataError(f"{split}/{wnid}: unknown WNID (no train/{wnid} folder)")
        samples += _files_in(data_dir / split / wnid, f"{split}/{wnid}", data_dir, wnid)
    return wnids, samples, _full_imagenet_count(wnids, split)


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
        if not _WNID.fullmatch(wnid):
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


def _kaggle(data_dir: Path, split: str):
    wnids = _kaggle_synsets(data_dir)
    root = data_dir / KAGGLE_ROOT / split
    where = f"{KAGGLE_ROOT}/{split}"
    if split == "train":
        samples = []
        for wnid in _class_dirs(root, where):
            if wnid not in wnids:
                raise DataError(f"{where}/{wnid}: unknown WNID (not in {KAGGLE_SYNSETS})")
            samples += _files_in(root / wnid, f"{where}/{wnid}", data_dir, wnid)
        return wnids, samples, _full_imagenet_count(wnids, split)
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
