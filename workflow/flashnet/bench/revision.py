"""Another git revision of the package, timed beside the current code in processes of its own.

``flashnet bench loader|shards --also REV`` times the code of a revision (say, the commit before a
change) next to the current code, in the same run and in turns, so both meet the same machine
load. The revision's ``workflow/flashnet`` is exported with ``git archive`` into a temporary folder
and imported there by a separate Python process (PYTHONPATH pointing at it) running one of the
worker scripts in ``at_revision/``, which answers one JSON line per request.

Why a process and not an import: two versions of ``flashnet`` cannot share one module table unless
one is renamed inside the other. The earlier way (a copy of one module injected into
``sys.modules`` as ``flashnet.data._bench_*``) changed the installed package for everything else in
the benchmark's process, and paired the old module with the current siblings it imports. In its
own process the revision is whole: its loader with its own epochs, tar reader and transforms.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

REPOSITORY = Path(__file__).resolve().parents[3]  # workflow/flashnet/bench/revision.py
PACKAGE = "workflow/flashnet"
WORKERS = Path(__file__).resolve().parent / "at_revision"


class RevisionError(ValueError):
    """A revision that cannot be exported (unknown, or no git checkout here)."""


SCHEMAS = "workflow/schemas"  # config.py reads the schema from beside the package


@contextlib.contextmanager
def exported(revision: str, with_schemas: bool = False) -> Iterator[Path]:
    """The package at ``revision`` in a temporary folder, removed afterwards: the folder to put on
    PYTHONPATH (it holds ``flashnet/``). ``with_schemas``: its config schema too, for code that
    validates a configuration (``flashnet train``)."""
    paths = [PACKAGE, SCHEMAS] if with_schemas else [PACKAGE]
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", "--format=tar", revision, *paths],
                             capture_output=True)
    if archive.returncode != 0:
        reason = archive.stderr.decode(errors="replace").strip().splitlines()
        raise RevisionError(f"--also {revision}: git archive of {PACKAGE} in {REPOSITORY} failed: "
                            f"{reason[-1] if reason else f'exit code {archive.returncode}'}")
    with tempfile.TemporaryDirectory(prefix="flashnet-revision-") as folder:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
        yield Path(folder) / "workflow"


class RevisionWorker:
    """One worker script of ``at_revision/`` running with the exported revision as its ``flashnet``:
    ``ask`` sends a request and returns the worker's answer (both JSON lines)."""

    def __init__(self, script: str, package_root: Path, setup: dict[str, Any], quiet: bool = False):
        self.script = script
        # -P: the script's own folder (this package's bench/at_revision) stays off sys.path, so the
        # worker imports nothing but the revision's flashnet and installed libraries.
        self.process = subprocess.Popen(
            [sys.executable, "-P", str(WORKERS / script), json.dumps(setup)],
            env={**os.environ, "PYTHONPATH": str(package_root)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None, text=True, bufsize=1,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.answer()

    def send(self, request: dict[str, Any]) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def answer(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.script} at the other revision ended (exit code {self.process.wait()}) "
                               "without answering")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.script} at the other revision: {reply['error']}")
        return reply

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
