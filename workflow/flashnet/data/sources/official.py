"""The official ImageNet tars, read in place: a tar of per-class tars for train, one tar for val,
and the devkit's synsets table and val ground truth for the labels. Members are located by their
byte offset once, then read with a seek: nothing is extracted to disk."""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
from pathlib import Path, PurePosixPath

from .index import DataError, Sample

OFFICIAL_TRAIN = "ILSVRC2012_img_train.tar"
OFFICIAL_VAL = "ILSVRC2012_img_val.tar"
OFFICIAL_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "ILSVRC2012_devkit_t12/data/meta.mat"
DEVKIT_VAL_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+")


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


def read_official(data_dir: Path, split: str):
    devkit = data_dir / OFFICIAL_DEVKIT
    id_to_wnid, train_counts, truth = read_devkit(devkit)
    wnids = sorted(id_to_wnid.values())
    if split == "train":
        samples = _official_train(data_dir, set(wnids), train_counts)
        return wnids, samples, sum(train_counts.values())
    samples = _official_val(data_dir, id_to_wnid, truth, devkit)
    return wnids, samples, len(truth)


def _official_train(data_dir: Path, wnids: set[str], train_counts: dict[str, int]) -> list[Sample]:
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
                    Sample(
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


def _official_val(data_dir: Path, id_to_wnid: dict[int, str], truth: list[int], devkit: Path) -> list[Sample]:
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
                Sample(PurePosixPath(name).stem, id_to_wnid[class_id], OFFICIAL_VAL, member.offset_data, member.size, where)
            )
    if len(samples) != len(truth):
        raise DataError(f"{path}: holds {len(samples)} images but the devkit's ground truth lists {len(truth)}")
    return samples


def _open_for_reading(path: Path):
    try:
        return open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from None
