"""Writing files so a reader never sees half of one: write a temporary file beside the target, then
rename it over the target (atomic on POSIX within one file system). A job killed mid-write leaves
the previous file, or none, never a truncated one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends, removed
    if it raises. The name carries the pid, so two processes writing the same file do not collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, record: Any, sort_keys: bool = False) -> None:
    """``record`` as indented JSON with a final newline."""
    write_text(path, json.dumps(record, indent=1, sort_keys=sort_keys) + "\n")
