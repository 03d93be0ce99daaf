"""The resume checkpoint on disk: written so that an intact one always survives, and chosen so that
a damaged one never blocks a rerun.

``checkpoints/last.ckpt`` is the newest; the one before it is kept as ``last.prev.ckpt`` until the
new one is complete and durable (written to a temporary name, fsynced, then renamed). A job killed
mid-write, a full disk or a node that lost its page cache can still leave ``last.ckpt`` truncated;
torch then fails on every rerun with "PytorchStreamReader failed reading zip archive", naming no
file. A checkpoint is a zip archive whose members carry CRC-32s, so reading it through (about a
second per GB) tells an intact one from a damaged one before Lightning loads it.

Writing off the critical path (issue 20). Training waits only for a copy of the state in host memory
(:func:`host_copy`: ResNet-50 with momentum is ~200 MB, a device-to-host copy of ~10 ms on a GPU, a
memcpy on the CPU); a :class:`BackgroundWriter` thread on rank 0 serialises and writes it while the
next steps run (0.3-2 s on a cluster file system, once per ``checkpoint_every_minutes``). The file
is written by ``torch.save`` beside its target in the run folder, never through ``$TMPDIR`` as
Lightning's fsspec atomic save does (issue 22: a small or RAM-backed ``/tmp`` failed with ENOSPC
naming no path, and the I/O doubled). Lightning still loads it through ``ckpt_path``: the dict is
the one ``Trainer.save_checkpoint`` would write.

The run's settings travel inside the checkpoint (:data:`SETTINGS_KEY`, :func:`run_settings`), so
the submitting side can decide per key whether it may resume (``train/launch.py``) and no file
beside it can go missing.
"""

from __future__ import annotations

import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.checksums import sha256_file
from ..files import atomic_path

SETTINGS_KEY = "flashnet_settings"  # top-level key of the checkpoint dict; Lightning ignores it
SETTINGS_FORMAT = 1


def previous_path(path: Path) -> Path:
    """``last.ckpt`` → ``last.prev.ckpt``: the checkpoint before the newest."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_settings(run: dict[str, Any], train_manifest: str | Path, val_manifest: str | Path) -> dict[str, Any]:
    """What a checkpoint was made with: every run key, and the manifests (so other shards are seen)."""
    return {"format": SETTINGS_FORMAT, "run": dict(run), "train": sha256_file(Path(train_manifest)),
            "val": sha256_file(Path(val_manifest))}


def saved_settings(path: Path) -> dict[str, Any] | None:
    """The settings inside checkpoint ``path`` (None for a checkpoint without them). Memory-mapped:
    only the pickled structure is read, not the ~200 MB of tensors."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get(SETTINGS_KEY) if isinstance(state, dict) else None


def host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to host memory (cloned where it already is there) and every
    container rebuilt, so training may go on changing the originals while a thread writes the copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((key, host_copy(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


def write_resume(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` as the resume checkpoint ``path``, keeping the previous one as
    :func:`previous_path` until the new one is complete and durable: ``torch.save`` to a temporary
    name beside it, fsync, rotate, rename, fsync the folder. A kill at any point leaves an intact
    ``last.ckpt`` or ``last.prev.ckpt`` (:func:`choose_resume` picks it)."""
    remove_partial(path)  # one writer per run, one write at a time: any temporary file is a killed job's
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        _fsync(tmp)
        if path.exists():
            os.replace(path, previous_path(path))
    _fsync(path.parent, directory=True)


class BackgroundWriter:
    """Writes resume checkpoints on a thread, one at a time (rank 0 only).

    A periodic checkpoint due while the previous write still runs is skipped, not waited for: the
    write in flight is itself a checkpoint at most one period old, and waiting would stall every
    rank on the file system, the cost the thread exists to remove. A checkpoint that must exist
    before the job ends (stop signal, end of training) waits for the write in flight, then for its
    own. A write that failed (full disk, lost mount) fails the run at the next checkpoint or wait,
    naming the file; the previous checkpoint is intact."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, state: dict[str, Any]) -> None:
        """Write ``state`` (a :func:`host_copy`) in the background; the caller checks :attr:`busy`."""
        self.wait()
        # not a daemon: a run failing in the main thread still finishes (and so keeps) this write
        self._thread = threading.Thread(target=self._write, args=(state,), name="resume-checkpoint")
        self._thread.start()

    def _write(self, state: dict[str, Any]) -> None:
        try:
            write_resume(state, self.path)
        except BaseException as error:  # reported by wait(), in the training thread
            self._error = error

    def wait(self) -> None:
        """Until the write in flight (if any) is on disk; raises what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"writing the resume checkpoint {self.path} failed: {error}") from error


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
