"""The resume checkpoint on disk: written so that an intact one always survives, and chosen so that
a damaged one never blocks a rerun.

``checkpoints/last.ckpt`` is the newest; the one before it is kept as ``last.prev.ckpt`` until the
new one is complete and durable (written to a temporary name, fsynced, then renamed). A job killed
mid-write, a full disk or a node that lost its page cache can still leave ``last.ckpt`` truncated;
torch then fails on every rerun with "PytorchStreamReader failed reading zip archive", naming no
file. A checkpoint is a zip archive whose members carry CRC-32s, so reading it through (about a
second per GB) tells an intact one from a damaged one before Lightning loads it.
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Callable

from ..files import atomic_path


def previous_path(path: Path) -> Path:
    """``last.ckpt`` → ``last.prev.ckpt``: the checkpoint before the newest."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_resume(trainer, path: Path) -> None:
    """Write the resume checkpoint (every rank calls this; rank 0 writes), keeping the previous one
    as :func:`previous_path` until the new one is complete."""
    if not trainer.is_global_zero:
        trainer.save_checkpoint(path)  # writes nothing here; joins rank 0's collectives
    else:
        remove_partial(path)
        with atomic_path(path) as tmp:
            trainer.save_checkpoint(tmp)
            _fsync(tmp)
            if path.exists():
                os.replace(path, previous_path(path))
        _fsync(path.parent, directory=True)
    trainer.strategy.barrier("resume-checkpoint")


def remove_partial(path: Path) -> None:
    """Temporary files of a job killed while writing ``path`` (one job per run writes it, so none is
    in progress); each is as large as a checkpoint."""
    for leftover in path.parent.glob(f".{path.name}.tmp*"):
        leftover.unlink(missing_ok=True)


def damage(path: Path) -> str | None:
    """Why ``path`` is not a whole checkpoint archive, or None if it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return f"member {bad} fails its CRC check" if bad else None


def choose_resume(path: Path, set_aside: bool = False, say: Callable[[str], None] | None = print) -> Path | None:
    """The newest intact resume checkpoint (``last.ckpt``, else ``last.prev.ckpt``), or None.

    With ``set_aside`` a damaged one is renamed ``<name>.damaged-<time>`` (kept for a post-mortem,
    never loaded again); ``say`` reports what was skipped and what is used instead."""
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        problem = damage(candidate)
        if problem is None:
            return candidate
        note = f"{candidate}: damaged resume checkpoint ({problem})"
        if set_aside:
            aside = candidate.with_name(f"{candidate.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(candidate, aside)
            note += f", moved to {aside}"
        if say:
            say(f"{note}; trying the previous one, else training starts from scratch")
    return None


def has_resume(path: Path) -> bool:
    return path.exists() or previous_path(path).exists()


def remove_resume(path: Path) -> None:
    """The run finished: a rerun (``--forcerun train``) trains afresh, not from these."""
    for candidate in (path, previous_path(path)):
        candidate.unlink(missing_ok=True)
