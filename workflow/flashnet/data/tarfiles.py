"""The shards' tar format, written and read by hand.

Shards are plain tars of WebDataset samples (``<key>.cls``, ``<key>.jpg``). The writer produces
exactly the bytes Python's :mod:`tarfile` would, filling a header template instead of building a
``TarInfo`` per member; the reader walks the headers and reads only the fields training needs.
Both exist for speed, measured in docs/benchmarks/shards.md and docs/benchmarks/loader.md: per
sample, ``TarInfo.tobuf`` took a tenth of a conversion job's time, and ``tarfile`` parsing
(inside ``wds.tarfile_to_samples``) ~130 µs of a loader worker's CPU against ~25 µs here. The
manifest step still re-reads every shard with :mod:`tarfile` itself, an independent check of the
writer.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

TAR_BLOCK = tarfile.BLOCKSIZE  # 512: headers, and data padded to a whole block
# Every shard member gets this timestamp, so the same inputs give byte-identical shards.
SHARD_MTIME = 0


# --------------------------------------------------------------------------- writing


class ShardFile:
    """A WebDataset shard being written: a plain tar whose members are ``<key>.cls`` then
    ``<key>.jpg`` (WebDataset's TarWriter order) with the headers :mod:`tarfile` writes for them, so
    the bytes are those of a tarfile-written shard. It is hashed as it is written, so the journal's
    sha256 costs no second read of the shard (the manifest step still re-reads and checks it)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb", buffering=1 << 20)  # a write call per MiB, not per member
        self._sha256 = hashlib.sha256()
        self.size = 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self.size += len(data)

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        for extension in sorted(fields):
            data = fields[extension]
            self._write(_member_header(f"{key}.{extension}", len(data)))
            self._write(data)
            self._write(bytes(-len(data) % TAR_BLOCK))

    def finish(self) -> str:
        """End the archive as tarfile does (two zero blocks, then zeros to a whole 10 KiB record),
        make it durable, and return its sha256."""
        self._write(bytes(2 * TAR_BLOCK))
        self._write(bytes(-self.size % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sha256.hexdigest()

    def discard(self) -> None:
        """Remove the unfinished file. Closing flushes the buffer, which fails again on a full
        disk; the file goes either way, and the error that brought us here is the one to report."""
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            self.path.unlink(missing_ok=True)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, SHARD_MTIME, 0o444, "", ""
    return info


# tarfile's header for a nameless, empty member: every field but the name, size and checksum.
_HEADER_TEMPLATE = _tarinfo("", 0).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _member_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for this member, filled into a template (TarInfo.tobuf,
    twice per sample, took a tenth of a conversion job's time in profiles; see
    docs/benchmarks/shards.md). Names that tarfile gives a PAX extended header (non-ASCII, over
    100 bytes) and sizes over 8 GiB go through tarfile itself."""
    if not name.isascii() or len(name) > 100 or size >= 8 ** 11:
        return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(_HEADER_TEMPLATE)
    header[0:len(name)] = name.encode("ascii")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "  # the checksum is summed with its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


# --------------------------------------------------------------------------- reading

READ_FIELDS = frozenset({"jpg", "cls"})
_ZERO_BLOCK = bytes(TAR_BLOCK)


class ShardError(ValueError):
    """A shard that is not a readable tar of samples; the message names the shard."""


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records, position = {}, 0
    while position < len(data) and data[position] != 0:
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def tar_members(f: BinaryIO, path: str) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file of the tar ``f``, with ``f`` at the start of its data; the
    consumer reads as much of it as it wants, and the next member is found from the header's own
    position. Knows the ustar, GNU long-name and pax headers Python's tarfile (which writes the
    shards) emits; other entries (folders, links) are skipped."""
    long_name, pax = None, {}
    while True:
        start = f.tell()
        header = f.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK or header == _ZERO_BLOCK:
            if header.strip(b"\0"):
                raise ShardError(f"{path}: truncated tar header at byte {start}")
            return
        # The checksum counts its own 8-byte field as spaces (0x20 each).
        if sum(header) - sum(header[148:156]) + 8 * 0x20 != _tar_number(header[148:156]):
            raise ShardError(f"{path}: bad tar header checksum at byte {start}")
        size, kind = _tar_number(header[124:136]), header[156:157]
        data_start = start + TAR_BLOCK
        if kind == b"x":
            pax = _pax_records(f.read(size))
        elif kind == b"L":
            long_name = f.read(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            size = int(pax.get("size", size))
            yield pax.get("path", long_name or name), size
            long_name, pax = None, {}
        f.seek(data_start + size + (-size % TAR_BLOCK))


def shard_samples(path: str) -> Iterator[dict]:
    """The samples of one shard, in order: ``{"__key__", "jpg", "cls"}``. Files are grouped into
    samples as WebDataset does (key = the name up to the first dot of its last part, field = the
    rest, lower-cased); fields other than ``jpg`` and ``cls`` are never read."""
    with open(path, "rb") as f:
        yield from tar_samples(f, path)


def tar_samples(f: BinaryIO, path: str) -> Iterator[dict]:
    """:func:`shard_samples` of an open tar, or of the bytes of a run of whole samples cut out of
    one (``io.BytesIO``; byte positions in errors are then counted from the cut)."""
    sample = None
    for name, size in tar_members(f, path):
        folder, slash, base = name.rpartition("/")
        stem, dot, field = base.partition(".")
        if not dot:
            continue
        key, field = folder + slash + stem, field.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        if field in sample:
            raise ShardError(f"{path}: sample {key} has two {field!r} files")
        if field in READ_FIELDS:
            sample[field] = f.read(size)
            if len(sample[field]) != size:
                raise ShardError(f"{path}: {name} is cut short ({len(sample[field])} of {size} bytes)")
    if sample is not None:
        yield sample


def sample_byte_ranges(path: str) -> list[tuple[int, int]]:
    """[start, end) of each sample of a shard: from its first member's header to the end of its
    last member's padded data, so that reading that range and :func:`tar_samples` on it gives the
    sample. Walks the headers only (what a shard written elsewhere needs; flashnet's manifest
    step records these ranges for its own shards)."""
    ranges: list[tuple[int, int]] = []
    key = None
    with open(path, "rb") as f:
        start = 0
        for name, size in tar_members(f, path):
            folder, slash, base = name.rpartition("/")
            stem, dot, _ = base.partition(".")
            end = f.tell() + size + (-size % TAR_BLOCK)
            if not dot:
                start = end
                continue
            if folder + slash + stem != key:
                key = folder + slash + stem
                ranges.append((start, end))
            ranges[-1] = (ranges[-1][0], end)
            start = end
    return ranges
